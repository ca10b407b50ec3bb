"""The served ComfyUI 1.58.1 frontend in a real browser: Debian's ``chromium`` driven by Playwright (no browser
download: ``executable_path``). Needs ``apt-get install chromium`` and ``pip install playwright``; marked slow.

One ``sumie serve`` (uvicorn on a free port, the embedded sumie-tiny, a test LoRA) and one page for the module, in
order: the page loads as a fresh user with no failed request (except the frontend's release check at api.comfy.org,
which this machine cannot reach) and queues Sumie's SD txt2img; each Sumie template opens from the Templates dialog
and runs (its graph as the frontend sends it equals the API twin the API tests use); a long run is interrupted with
the run bar's cancel button; a ComfyUI PNG dropped on the canvas restores its graph (from its workflow chunk, or its
API prompt chunk alone), an A1111 PNG is imported into a graph by the frontend's A1111 importer and runs.
Screenshots of each step: ``tests/artifacts/browser/`` (git-ignored).
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from control_testfiles import random_controlnet, write_original
from lora_testfiles import write_kohya
from PIL import Image, PngImagePlugin
from playwright.sync_api import Page, sync_playwright
from serve_helpers import Running, running_server, to_api

from sumie.checkpoints.embedded import embedded_path
from sumie.checkpoints.loader import load_models
from sumie.serve import ServeConfig
from sumie.serve.frontend import TEMPLATES

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parent / "artifacts" / "browser"  # screenshots, one per step (git-ignored)
LORA = "style.safetensors"
SD_TXT2IMG = ["CLIPTextEncode", "CLIPTextEncode", "CheckpointLoaderSimple", "EmptyLatentImage", "KSampler",
              "SaveImage", "VAEDecode"]
OFFLINE = "api.comfy.org"  # the frontend's release check; no internet here
# Drop a file on the graph canvas as a user's drag and drop does: a DragEvent carrying the file in its DataTransfer.
DROP = """async ([b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, {type: 'image/png'}));
  const canvas = document.querySelector('#graph-canvas');
  const r = canvas.getBoundingClientRect();
  canvas.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true,
                                              clientX: r.x + r.width / 2, clientY: r.y + r.height / 2}));
}"""
SET_WIDGET = """([type, name, value]) => {
  const nodes = app.graph.nodes.filter(n => n.type === type);
  for (const n of nodes) n.widgets.find(w => w.name === name).value = value;
  return nodes.length;
}"""
# each node's widgets, less the frontend's own image preview ($$canvas-image-preview)
WIDGETS = ("app.graph.nodes.map(n => [n.type, Object.fromEntries((n.widgets || [])"
           ".filter(w => !w.name.startsWith('$$')).map(w => [w.name, w.value]))])")
QUEUE = "app.extensionManager._p._s.get('queue')"  # the frontend's queue store (pinia), as its job panel reads it


@dataclass
class UI:
    """The server, the page, and what the page saw: failed requests, aborted ones, console errors."""

    srv: Running
    page: Page
    bad: list[Any] = field(default_factory=list)
    aborted: list[Any] = field(default_factory=list)
    answered: list[Any] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def shot(self, name: str) -> Path:
        """A screenshot of the page as ``ARTIFACTS/name.png``."""
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def check_requests(self) -> None:
        """No request failed. Chromium reports ERR_ABORTED for POSTs whose answer the frontend does not read (its
        settings writes, ``/api/interrupt``): each must have been answered and have done its work."""
        assert self.bad == []
        assert self.console_errors == []
        settings = self.srv.app.state.sumie_user_store.settings()
        for method, url, _ in self.aborted:
            assert (method, url) in self.answered, url  # the server's answer reached the browser
            if "/api/settings/" in url:
                assert method == "POST" and url.rsplit("/", 1)[1] in settings, (url, settings)
            else:
                assert (method, url.split("?")[0]) == ("POST", self.srv.url + "/api/interrupt"), url

    def graph_types(self) -> list[str]:
        return sorted(self.page.evaluate("app.graph.nodes.map(n => n.type)"))

    def outputs(self) -> set[str]:
        return {p.name for p in self.srv.server.config.output_dir.glob("ComfyUI_*.png")}

    def run_and_wait_image(self, before: set[str]) -> str:
        """Fit the graph in view, press Run; the new image's file name once the Save Image node shows it (the node
        loads its image when drawn)."""
        self.page.get_by_role("button", name="Fit View (.)").click()
        self.page.get_by_role("button", name="Run", exact=True).click()
        try:
            self.page.wait_for_function(
                """(before) => { const n = app.graph.nodes.find(n => n.type === 'SaveImage');
                                 const out = app.nodeOutputs[String(n.id)];
                                 return n.imgs && n.imgs.length > 0 && out && !before.includes(out.images[0].filename)
                               }""", arg=sorted(before), timeout=120_000)
        except Exception:
            self.shot("failed_run")
            jobs = self.page.evaluate("fetch('/api/jobs?limit=2').then(r => r.json())")["jobs"]
            raise AssertionError(f"no new image; latest jobs: {jobs}") from None
        return self.page.evaluate(
            "app.nodeOutputs[String(app.graph.nodes.find(n => n.type === 'SaveImage').id)].images[0].filename")


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (setup.sh --dev does, as root)"
    root = tmp_path_factory.mktemp("browser")
    models = load_models(embedded_path())
    write_kohya(root / "loras" / LORA, models)
    # what the ControlNet template names: a random ControlNet at sumie-tiny's shapes
    net = random_controlnet(models.config.unet, seed=3)
    write_original(root / "controlnet" / "control_sumie-tiny.safetensors", net)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    config = ServeConfig(output_dir=root / "out", lora_dirs=(root / "loras",), controlnet_dirs=(root / "controlnet",))
    with running_server(config) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            state = UI(srv, page)

            def on_failed(request: Any) -> None:
                if OFFLINE in request.url:
                    return
                failed = (request.method, request.url, request.failure)
                (state.aborted if request.failure == "net::ERR_ABORTED" else state.bad).append(failed)

            def on_console(message: Any) -> None:
                offline = "ERR_NAME_NOT_RESOLVED" in message.text  # the release check's failed load
                if message.type == "error" and not offline:
                    state.console_errors.append(message.text)

            page.on("requestfailed", on_failed)
            page.on("response", lambda r: state.answered.append((r.request.method, r.url)))
            page.on("response", lambda r: r.status >= 400 and state.bad.append((r.request.method, r.url, r.status)))
            page.on("console", on_console)
            yield state
        finally:
            browser.close()
    print(f"browser screenshots: {ARTIFACTS}")


def _open_template(ui: UI, name: str) -> dict[str, Any]:
    """Open a Sumie template from the Templates dialog (the sidebar's Templates button, then its card); its JSON."""
    template = json.loads((Path(__file__).parents[1] / "sumie" / "serve" / "templates" / f"{name}.json").read_text())
    ui.page.get_by_role("button", name="Templates", exact=True).click()
    ui.page.get_by_text(TEMPLATES[name][0], exact=True).click()
    want = sorted(n["type"] for n in template["nodes"])
    ui.page.wait_for_function("(want) => JSON.stringify(app.graph.nodes.map(n => n.type).sort()) === "
                              "JSON.stringify(want)", arg=want, timeout=30_000)
    return template


def _frontend_prompt(ui: UI) -> dict[str, Any]:
    """The API prompt the frontend would send for the open graph (``graphToPrompt``), without its ``_meta``."""
    output = ui.page.evaluate("app.graphToPrompt().then(p => p.output)")
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in output.items()}


@pytest.mark.slow
def test_fresh_page_loads_cleanly_opens_sd_txt2img_and_queues_it(ui: UI) -> None:
    page, srv = ui.page, ui.srv
    page.goto(srv.url + "/", wait_until="load")
    page.wait_for_function("window.app && window.app.graph && app.graph.nodes.length > 0", timeout=60_000)
    page.wait_for_timeout(3000)  # the first-run settings writes and polls after the graph opens
    ui.shot("01_loaded")
    assert ui.graph_types() == SD_TXT2IMG
    ui.check_requests()
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
    ui.shot("02_txt2img_queued")
    with Image.open(srv.server.config.output_dir / image["filename"]) as png:
        assert png.size == (64, 64)
        workflow = json.loads(png.text["workflow"])
    assert sorted(n["type"] for n in workflow["nodes"]) == SD_TXT2IMG
    ui.check_requests()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_each_template_opens_from_the_templates_dialog_and_runs(ui: UI, name: str) -> None:
    template = _open_template(ui, name)
    ui.shot(f"10_{name}_opened")
    info = ui.page.evaluate("fetch('/api/object_info').then(r => r.json())")
    assert _frontend_prompt(ui) == to_api(template, info)  # the frontend's API graph is the API tests' twin
    if any(n["type"] == "LoraLoader" for n in template["nodes"]):
        # the placeholder is flagged by the frontend's missing-model check until a LoRA of the list is picked
        placeholder = next(n for n in template["nodes"] if n["type"] == "LoraLoader")["widgets_values"][0]
        ui.page.get_by_text(f"{placeholder} is missing").wait_for(timeout=30_000)
        ui.shot(f"11_{name}_placeholder_flagged")
        assert ui.page.evaluate(SET_WIDGET, ["LoraLoader", "lora_name", LORA]) == 1
    assert ui.page.evaluate(SET_WIDGET, ["KSampler", "steps", 2]) >= 1  # quick
    filename = ui.run_and_wait_image(ui.outputs())
    ui.page.wait_for_timeout(500)
    ui.shot(f"12_{name}_ran")
    with Image.open(ui.srv.server.config.output_dir / filename) as png:
        assert png.size == ((96, 96) if name == "sumie_sd_hires_fix" else (64, 64))
        workflow, prompt = json.loads(png.text["workflow"]), json.loads(png.text["prompt"])
    assert sorted(n["type"] for n in workflow["nodes"]) == sorted(n["type"] for n in template["nodes"])
    assert {v["inputs"]["steps"] for v in prompt.values() if v["class_type"] == "KSampler"} == {2}
    if name == "sumie_sd_lora":
        assert [v["inputs"]["lora_name"] for v in prompt.values() if v["class_type"] == "LoraLoader"] == [LORA]
    ui.check_requests()


@pytest.mark.slow
def test_cancel_a_long_run_from_the_run_bar(ui: UI) -> None:
    page = ui.page
    _open_template(ui, "sumie_sd_txt2img")
    ui.page.evaluate(SET_WIDGET, ["KSampler", "steps", 500])
    ui.page.evaluate(SET_WIDGET, ["EmptyLatentImage", "width", 256])
    ui.page.evaluate(SET_WIDGET, ["EmptyLatentImage", "height", 256])
    page.get_by_role("button", name="Run", exact=True).click()
    page.wait_for_function(f"{QUEUE}.runningTasks.length === 1", timeout=30_000)
    page.get_by_text("1 active").wait_for(timeout=30_000)
    ui.shot("20_long_run_running")
    [running] = page.evaluate("fetch('/api/jobs?status=in_progress').then(r => r.json())")["jobs"]
    page.get_by_role("button", name="Cancel current run").click()
    page.get_by_text("0 active").wait_for(timeout=30_000)
    page.wait_for_function(f"{QUEUE}.historyTasks.some(t => t.jobId === '{running['id']}')", timeout=30_000)
    ui.shot("21_long_run_cancelled")
    tasks = page.evaluate(f"""(() => {{ const q = {QUEUE};
        return {{running: q.runningTasks.length, pending: q.pendingTasks.length,
                 history: q.historyTasks.map(t => [t.jobId, t.displayStatus])}} }})()""")
    assert tasks["running"] == tasks["pending"] == 0
    assert [running["id"], "Cancelled"] in tasks["history"]  # the frontend's reading of the job
    # the 1.58 job panel counts a cancelled job with the failed ones ("Job failed"), as it does ComfyUI's
    page.get_by_role("button", name="Expand job queue").click()
    page.get_by_text("Job Queue", exact=True).wait_for(timeout=10_000)
    ui.shot("22_long_run_job_panel")
    page.get_by_role("button", name="Expand job queue").click()  # the same toggle closes the panel
    page.get_by_text("Job Queue", exact=True).wait_for(state="hidden", timeout=10_000)
    queue = page.evaluate("fetch('/api/queue').then(r => r.json())")
    assert queue == {"queue_running": [], "queue_pending": []}
    history = page.evaluate(f"fetch('/api/history/{running['id']}').then(r => r.json())")[running["id"]]
    events = [m[0] for m in history["status"]["messages"]]
    assert "execution_interrupted" in events and "execution_success" not in events
    assert any(url.startswith(ui.srv.url + "/api/interrupt") for _, url in ui.answered)
    ui.check_requests()


def _comfy_png(ui: UI, info: dict[str, Any], seed: int, with_workflow: bool = True) -> tuple[bytes, dict[str, Any]]:
    """A PNG made by Sumie's ComfyUI API from the txt2img template with distinctive values, and that workflow (in the
    PNG's ``workflow`` chunk when ``with_workflow``, as the frontend sends it; else only the API ``prompt`` chunk). Each
    call needs its own seed: an unchanged prompt is answered from the cache, without a new file."""
    workflow = json.loads((Path(__file__).parents[1] / "sumie" / "serve" / "templates" /
                           "sumie_sd_txt2img.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "KSampler":
            node["widgets_values"] = [seed, "fixed", 3, 5.5, "euler", "karras", 1.0]
        if node["type"] == "CLIPTextEncode" and node["id"] == 6:
            node["widgets_values"] = ["a red fox in the snow, dropped from a PNG"]
    body: dict[str, Any] = {"prompt": to_api(workflow, info)}
    if with_workflow:
        body["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
    prompt_id = ui.page.evaluate("(b) => fetch('/api/prompt', {method: 'POST', body: JSON.stringify(b)})"
                                 ".then(r => r.json())", body)["prompt_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        entry = ui.page.evaluate(f"fetch('/api/history/{prompt_id}').then(r => r.json())")
        if entry:
            [image] = entry[prompt_id]["outputs"]["9"]["images"]
            return (ui.srv.server.config.output_dir / image["filename"]).read_bytes(), workflow
        time.sleep(0.2)
    raise AssertionError("the PNG's prompt did not finish")


@pytest.mark.slow
def test_dropping_a_comfyui_png_restores_its_graph(ui: UI) -> None:
    info = ui.page.evaluate("fetch('/api/object_info').then(r => r.json())")
    png, workflow = _comfy_png(ui, info, 4242)
    with Image.open(io.BytesIO(png)) as img:
        assert set(img.text) >= {"prompt", "workflow"}
    _open_template(ui, "sumie_sd_img2img")  # another graph on the canvas first
    ui.page.evaluate(DROP, [base64.b64encode(png).decode("ascii"), "ComfyUI_fox.png"])
    ui.page.wait_for_function("app.graph.nodes.some(n => n.type === 'EmptyLatentImage')", timeout=30_000)
    ui.shot("30_comfyui_png_dropped")
    assert ui.graph_types() == SD_TXT2IMG
    widgets = dict(ui.page.evaluate(WIDGETS))
    assert widgets["KSampler"] == {"seed": 4242, "control_after_generate": "fixed", "steps": 3, "cfg": 5.5,
                                   "sampler_name": "euler", "scheduler": "karras", "denoise": 1}
    texts = ui.page.evaluate("app.graph.nodes.filter(n => n.type === 'CLIPTextEncode').map(n => n.widgets[0].value)")
    assert sorted(texts) == sorted(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "CLIPTextEncode")
    assert _frontend_prompt(ui) == to_api(workflow, info)
    # a PNG made through the API without a workflow: the frontend builds the graph from its API ``prompt`` chunk
    png, workflow = _comfy_png(ui, info, 4343, with_workflow=False)
    with Image.open(io.BytesIO(png)) as img:
        assert "prompt" in img.text and "workflow" not in img.text
    _open_template(ui, "sumie_sd_img2img")
    ui.page.evaluate(DROP, [base64.b64encode(png).decode("ascii"), "ComfyUI_api.png"])
    ui.page.wait_for_function("app.graph.nodes.some(n => n.type === 'EmptyLatentImage')", timeout=30_000)
    ui.shot("31_api_png_dropped")
    assert ui.graph_types() == SD_TXT2IMG
    assert _frontend_prompt(ui) == to_api(workflow, info)
    ui.check_requests()


A1111_PARAMETERS = ("a lighthouse on a cliff, watercolor <lora:style:0.8>\nNegative prompt: blurry, text\n"
                    "Steps: 3, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 64x64, Model hash: "
                    "0123456789, Model: sumie-tiny, Clip skip: 2, Version: v1.10.1")


@pytest.mark.slow
def test_dropping_an_a1111_png_imports_its_parameters_as_a_graph_that_runs(ui: UI) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_PARAMETERS)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 200)).save(buf, format="PNG", pnginfo=info)
    ui.page.evaluate(DROP, [base64.b64encode(buf.getvalue()).decode("ascii"), "a1111.png"])
    ui.page.wait_for_function("app.graph.nodes.some(n => n.type === 'CLIPSetLastLayer')", timeout=30_000)
    ui.shot("40_a1111_png_imported")
    assert ui.graph_types() == sorted([*SD_TXT2IMG, "CLIPSetLastLayer", "LoraLoader"])
    widgets = dict(ui.page.evaluate(WIDGETS))
    assert widgets["KSampler"] == {"seed": 1234, "control_after_generate": "randomize", "steps": 3, "cfg": 6.5,
                                   "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1}
    assert widgets["CheckpointLoaderSimple"] == {"ckpt_name": "sumie-tiny"}
    assert widgets["CLIPSetLastLayer"] == {"stop_at_clip_layer": -2}
    assert widgets["LoraLoader"] == {"lora_name": LORA, "strength_model": 0.8, "strength_clip": 0.8}
    assert widgets["EmptyLatentImage"] == {"width": 64, "height": 64, "batch_size": 1}
    prompt = _frontend_prompt(ui)
    texts = {v["inputs"]["text"] for v in prompt.values() if v["class_type"] == "CLIPTextEncode"}
    assert texts == {"a lighthouse on a cliff, watercolor ", "blurry, text"}  # the <lora:...> tag became the node
    filename = ui.run_and_wait_image(ui.outputs())
    ui.page.wait_for_timeout(500)
    ui.shot("41_a1111_graph_ran")
    with Image.open(ui.srv.server.config.output_dir / filename) as png:
        sent = json.loads(png.text["prompt"])
    [sampler] = [v["inputs"] for v in sent.values() if v["class_type"] == "KSampler"]
    assert (sampler["seed"], sampler["steps"], sampler["sampler_name"]) == (1234, 3, "dpmpp_2m")
    ui.check_requests()
