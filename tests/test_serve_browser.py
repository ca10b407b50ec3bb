"""The served ComfyUI 1.58.1 frontend in a real browser: Debian's ``chromium`` driven by Playwright (no browser
download: ``executable_path``). Needs ``apt-get install chromium`` and ``pip install playwright``; marked slow.

Loads the page as a fresh user (no request fails except the frontend's release check at api.comfy.org, which this
machine cannot reach), sees Sumie's SD txt2img graph open, queues it with ``app.queuePrompt(0, 1)`` and finds its
image in the jobs list and in the PNG's ``workflow`` chunk. Screenshots go to the test's tmp folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import sync_playwright
from serve_helpers import running_server

from sumie.serve import ServeConfig

CHROMIUM = "/usr/bin/chromium"
SD_TXT2IMG = ["CLIPTextEncode", "CLIPTextEncode", "CheckpointLoaderSimple", "EmptyLatentImage", "KSampler",
              "SaveImage", "VAEDecode"]


@pytest.mark.slow
def test_fresh_page_loads_cleanly_opens_sd_txt2img_and_queues_it(tmp_path: Path) -> None:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (setup.sh --dev does, as root)"
    with running_server(ServeConfig(output_dir=tmp_path / "out")) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            bad: list[Any] = []
            aborted: list[Any] = []

            def on_failed(request: Any) -> None:
                if "api.comfy.org" in request.url:
                    return
                (aborted if request.failure == "net::ERR_ABORTED" else bad).append(
                    (request.method, request.url, request.failure))

            page.on("requestfailed", on_failed)
            page.on("response", lambda r: r.status >= 400 and bad.append((r.request.method, r.url, r.status)))
            page.goto(srv.url + "/", wait_until="load")
            page.wait_for_function("window.app && window.app.graph && app.graph.nodes.length > 0", timeout=60_000)
            page.wait_for_timeout(3000)  # the first-run settings writes and polls after the graph opens
            page.screenshot(path=str(tmp_path / "loaded.png"))
            assert sorted(page.evaluate("app.graph.nodes.map(n => n.type)")) == SD_TXT2IMG
            assert bad == []
            # The frontend drops the responses of its first-run settings writes (Chromium reports ERR_ABORTED
            # after the server answered): each such write must have reached the settings file.
            settings = srv.app.state.sumie_user_store.settings()
            for method, url, _ in aborted:
                assert method == "POST" and "/api/settings/" in url, url
                assert url.rsplit("/", 1)[1] in settings, (url, settings)

            page.evaluate("app.queuePrompt(0, 1)")
            deadline = time.monotonic() + 120
            done: list[dict[str, Any]] = []
            while not done and time.monotonic() < deadline:
                jobs = page.evaluate("fetch('/api/jobs?status=completed,failed').then(r => r.json())")["jobs"]
                done = [j for j in jobs if j["status"] == "completed" and j["preview_output"]]
                time.sleep(0.5)
            assert done, "no finished job with an image"
            image = done[0]["preview_output"]
            view = page.evaluate(f"fetch('/api/view?filename={image['filename']}&type=output').then(r => r.status)")
            assert view == 200
            page.wait_for_timeout(1000)
            page.screenshot(path=str(tmp_path / "queued.png"))
            with Image.open(srv.server.config.output_dir / image["filename"]) as png:
                assert png.size == (64, 64)
                workflow = json.loads(png.text["workflow"])
            assert sorted(n["type"] for n in workflow["nodes"]) == SD_TXT2IMG
            assert bad == []
        finally:
            browser.close()
