"""ComfyUI's web frontend on ``sumie serve``: its files at ``/`` and every request the 1.58.1 frontend makes.

A real server (uvicorn, the embedded sumie-tiny). The routes and shapes follow the requests the 1.58.1 frontend makes
(``/work/shared/reference/comfyui.md``) and ComfyUI's ``server.py`` / ``app/user_manager.py`` /
``app/app_settings.py`` / ``app/model_manager.py`` and its jobs API (the frontend's zod schema of ``/api/jobs``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from control_testfiles import random_controlnet, write_original
from PIL import Image
from serve_helpers import Running, running_server

from sumie.checkpoints.manager import ModelManager
from sumie.serve import ServeConfig
from sumie.serve.frontend import TEMPLATES, frontend_static

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("front")
    # what the ControlNet template names: a random ControlNet at sumie-tiny's shapes and a control image
    unet = ModelManager().get("checkpoint", "sumie-tiny").config.unet
    write_original(root / "controlnet" / "control_sumie-tiny.safetensors", random_controlnet(unet, seed=3))
    (root / "input").mkdir()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(root / "input" / "sumie_control_example.png")
    with running_server(ServeConfig(output_dir=root / "out", controlnet_dirs=(root / "controlnet",))) as running:
        yield running


def _get(srv: Running, path: str, **kw: Any) -> httpx.Response:
    return httpx.get(srv.url + path, timeout=60, **kw)


def _post(srv: Running, path: str, **kw: Any) -> httpx.Response:
    return httpx.post(srv.url + path, timeout=60, **kw)


def test_index_page_and_an_asset_are_served_without_shadowing_the_api(srv: Running) -> None:
    static = frontend_static()
    assert static is not None and (static / "index.html").is_file()
    page = _get(srv, "/", follow_redirects=True)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == (static / "index.html").read_text(encoding="utf-8")
    assert "<title>ComfyUI</title>" in page.text and 'id="vue-app"' in page.text
    script = re.search(r'src="\./(assets/index-[^"]+\.js)"', page.text)
    assert script is not None
    asset = _get(srv, "/" + script.group(1))
    assert asset.status_code == 200 and "javascript" in asset.headers["content-type"]
    assert asset.content == (static / script.group(1)).read_bytes()
    # the API routes still answer JSON, the frontend's folder is only the fallback
    for path in ("/prompt", "/api/prompt"):
        assert _get(srv, path).json()["exec_info"]["queue_remaining"] >= 0
    assert "KSampler" in _get(srv, "/object_info").json()
    assert _get(srv, "/no-such-file.js").status_code == 404


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_every_startup_request_answers_200_in_comfyuis_shape(srv: Running, prefix: str) -> None:
    def ok(path: str) -> Any:
        r = _get(srv, prefix + path)
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.json()

    assert ok("/users") == {"storage": "server", "migrated": True}
    assert isinstance(ok("/settings"), dict)
    assert isinstance(ok("/userdata?dir=workflows&recurse=true&split=false&full_info=true"), list)
    assert ok("/userdata?dir=subgraphs&recurse=true&split=false&full_info=true") == []
    assert ok("/userdata/comfy.templates.json") == []  # no saved node templates
    user_css = _get(srv, prefix + "/userdata/user.css")
    assert user_css.status_code == 200 and user_css.text == ""
    assert ok("/i18n") == {}
    assert ok("/features")["supports_preview_metadata"] is False
    models = ok("/experiment/models")
    assert {"name": "checkpoints", "folders": []} in models and all(set(m) == {"name", "folders"} for m in models)
    assert ok("/global_subgraphs") == {}
    assert ok("/workflow_templates") == {}
    assert ok("/extensions") == []
    assert "sumie" in ok("/system_stats")
    jobs = ok("/jobs?status=in_progress,pending&limit=200&offset=0")
    assert set(jobs) == {"jobs", "pagination"}
    assert set(jobs["pagination"]) == {"offset", "limit", "total", "has_more"}
    index = _get(srv, "/templates/index.json")
    assert index.status_code == 200 and index.headers["content-type"] == "application/json"
    assert _get(srv, "/templates/index_logo.json").json() == {}
    css = _get(srv, "/user.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


def test_settings_round_trip_through_the_json_file(srv: Running) -> None:
    r = _post(srv, "/api/settings/Comfy.TutorialCompleted", content=b"true")
    assert r.status_code == 200
    r = _post(srv, "/api/settings/Comfy.Templates.SortBy", json="newest")
    assert r.status_code == 200
    assert _post(srv, "/settings", json={"Comfy.Sidebar.Size": "small", "x.y": [1, 2]}).status_code == 200
    settings = _get(srv, "/api/settings").json()
    assert settings["Comfy.TutorialCompleted"] is True and settings["Comfy.Templates.SortBy"] == "newest"
    assert settings["x.y"] == [1, 2]
    assert _get(srv, "/api/settings/Comfy.Templates.SortBy").json() == "newest"
    assert _get(srv, "/api/settings/Not.Set").json() is None
    path = srv.server.config.output_dir.parent / "user" / "default" / "comfy.settings.json"
    assert json.loads(path.read_text(encoding="utf-8")) == settings
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".part")]  # written via a temporary file
    assert _post(srv, "/api/settings/Bad", content=b"{not json").status_code == 400
    assert _post(srv, "/api/settings", json=[1]).status_code == 400


def test_userdata_files_stay_inside_the_user_folder(srv: Running) -> None:
    root = srv.server.config.output_dir.parent / "user" / "default"
    body = json.dumps({"nodes": []}).encode()
    r = _post(srv, "/api/userdata/workflows%2Fmine.json?overwrite=true&full_info=false", content=body)
    assert r.status_code == 200 and r.json() == "workflows/mine.json"
    assert (root / "workflows" / "mine.json").read_bytes() == body
    assert _post(srv, "/api/userdata/workflows%2Fmine.json?overwrite=false", content=b"x").status_code == 409
    assert _get(srv, "/api/userdata/workflows%2Fmine.json").content == body
    assert _get(srv, "/api/userdata?dir=workflows").json() == ["mine.json"]
    [info] = _get(srv, "/api/userdata?dir=workflows&recurse=true&full_info=true").json()
    assert info["path"] == "mine.json" and info["size"] == len(body) and info["modified"] > 0
    assert _get(srv, "/api/userdata?dir=workflows&split=true").json() == [["mine.json", "mine.json"]]
    r = _post(srv, "/api/userdata/workflows%2Fmine.json/move/workflows%2Fours.json")
    assert r.status_code == 200 and r.json() == "workflows/ours.json"
    assert _get(srv, "/api/userdata?dir=workflows").json() == ["ours.json"]
    secret = root.parent.parent / "secret.txt"
    secret.write_text("no")
    for name in ("..%2F..%2Fsecret.txt", "%2E%2E%2F%2E%2E%2Fsecret.txt", "%2Fetc%2Fpasswd", "workflows%2F..%2F..%2F.."):
        for method in ("GET", "POST", "DELETE"):
            r = httpx.request(method, f"{srv.url}/api/userdata/{name}", content=b"x", timeout=60)
            assert 400 <= r.status_code < 500 and r.status_code != 404, (method, name, r.status_code)
    assert _get(srv, "/api/userdata?dir=..").status_code == 403
    assert _get(srv, "/api/userdata").status_code == 400
    assert _get(srv, "/api/userdata?dir=nothing-here").status_code == 404
    assert secret.read_text() == "no"
    assert httpx.delete(f"{srv.url}/api/userdata/workflows%2Fours.json", timeout=60).status_code == 204
    assert _get(srv, "/api/userdata/workflows%2Fours.json").status_code == 404


def _object_info(srv: Running) -> dict[str, Any]:
    return _get(srv, "/object_info").json()


def _to_api(workflow: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """The frontend's graph -> API format: widgets in object_info's input order (a seed's control value skipped, as the
    1.58.1 frontend adds one after ``seed`` / ``noise_seed`` or an input with ``control_after_generate``)."""
    links = {lk[0]: lk for lk in workflow["links"]}
    prompt: dict[str, Any] = {}
    for node in workflow["nodes"]:
        spec = info[node["type"]]["input"]
        inputs: dict[str, Any] = {}
        linked = {i["name"]: links[i["link"]] for i in node["inputs"] if i["link"] is not None}
        values = list(node["widgets_values"])
        for name, entry in [*spec["required"].items(), *spec.get("optional", {}).items()]:
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            elif isinstance(entry[0], list) or entry[0] in WIDGET_TYPES:
                inputs[name] = values.pop(0)
                opts = entry[1] if len(entry) > 1 else {}
                if opts.get("control_after_generate", name in ("seed", "noise_seed")):  # the frontend's rule
                    assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert values == [], (node["type"], values)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _wait_job(srv: Running, prompt_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = _get(srv, f"/history/{prompt_id}").json()
        if entry:
            return entry[prompt_id]
        time.sleep(0.1)
    raise AssertionError("the prompt did not finish")


def test_templates_index_lists_sumies_templates_and_each_runs(srv: Running) -> None:
    [category] = _get(srv, "/templates/index.json").json()
    assert category["moduleName"] == "default"
    names = [t["name"] for t in category["templates"]]
    assert names == list(TEMPLATES) and "sumie_sd_txt2img" in names
    info = _object_info(srv)
    for template in category["templates"]:
        thumb = _get(srv, f"/templates/{template['name']}-1.{template['mediaSubtype']}")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
        r = _get(srv, f"/templates/{template['name']}.json")
        assert r.status_code == 200
        workflow = r.json()
        assert {n["type"] for n in workflow["nodes"]} <= set(info)
        prompt = _to_api(workflow, info)
        for node in prompt.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = 2  # quick; the template's own values validated below
        answer = _post(srv, "/prompt", json={"prompt": _to_api(workflow, info)})
        assert answer.status_code == 200 and answer.json()["node_errors"] == {}, answer.text
        _post(srv, "/queue", json={"delete": [answer.json()["prompt_id"]]})
        _post(srv, "/interrupt", json={"prompt_id": answer.json()["prompt_id"]})
        run = _post(srv, "/prompt", json={"prompt": prompt})
        entry = _wait_job(srv, run.json()["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry["status"]
        [images] = [o["images"] for o in entry["outputs"].values()]
        assert len(images) == 1 and images[0]["type"] == "output"
    basic = _get(srv, "/templates/sumie_sd_txt2img.json").json()
    assert sorted(n["type"] for n in basic["nodes"]) == sorted(
        ["CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
         "SaveImage"])
    assert _to_api(basic, info)["4"]["inputs"]["ckpt_name"] == "sumie-tiny"
    assert _to_api(basic, info)["5"]["inputs"] == {"width": 64, "height": 64, "batch_size": 1}
    assert _get(srv, "/templates/nothing.json").status_code == 404
    assert _get(srv, "/templates/..%2Fapp.py").status_code == 404


def test_jobs_list_a_finished_run_with_its_image(srv: Running) -> None:
    info = _object_info(srv)
    workflow = _get(srv, "/templates/sumie_sd_txt2img.json").json()
    workflow["id"] = "wf-123"
    prompt = _to_api(workflow, info)
    prompt["3"]["inputs"]["steps"] = 2
    r = _post(srv, "/api/prompt", json={"prompt": prompt, "client_id": "c1",
                                       "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
    prompt_id = r.json()["prompt_id"]
    entry = _wait_job(srv, prompt_id)
    [image] = entry["outputs"]["9"]["images"]
    listing = _get(srv, "/api/jobs?status=completed,failed,cancelled&limit=200&offset=0").json()
    ids = [j["id"] for j in listing["jobs"]]
    assert prompt_id in ids and listing["pagination"]["total"] == len(ids) >= 1
    assert listing["pagination"] == {"offset": 0, "limit": 200, "total": len(ids), "has_more": False}
    job = listing["jobs"][ids.index(prompt_id)]
    assert job["status"] == "completed" and job["workflow_id"] == "wf-123"
    assert job["preview_output"] == {**image, "nodeId": "9", "mediaType": "images"}
    assert job["outputs_count"] == job["previewable_outputs_count"] == 1
    assert job["create_time"] <= job["execution_start_time"] <= job["execution_end_time"]
    assert job["execution_error"] is None
    creates = [j["create_time"] for j in listing["jobs"]]
    assert creates == sorted(creates, reverse=True)  # newest first
    assert prompt_id not in [j["id"] for j in _get(srv, "/api/jobs?status=pending,in_progress").json()["jobs"]]
    if len(ids) > 1:
        page = _get(srv, "/api/jobs?status=completed&limit=1&offset=0").json()
        assert len(page["jobs"]) == 1 and page["pagination"]["has_more"] is True
    detail = _get(srv, f"/api/jobs/{prompt_id}").json()
    assert detail["workflow"]["id"] == "wf-123" and detail["outputs"] == entry["outputs"]
    assert detail["execution_status"]["status_str"] == "success"
    assert _get(srv, "/api/jobs/nope").status_code == 404
    assert _get(srv, "/api/jobs?status=bogus").status_code == 400
    assert _post(srv, "/api/jobs/cancel", json={"job_ids": ["nope"]}).status_code == 200
    assert _post(srv, "/api/jobs/cancel", json={"ids": 1}).status_code == 400


def test_cancel_a_queued_job_through_the_jobs_api(srv: Running) -> None:
    info = _object_info(srv)
    prompt = _to_api(_get(srv, "/templates/sumie_sd_txt2img.json").json(), info)
    prompt["3"]["inputs"]["steps"] = 200
    first = _post(srv, "/api/prompt", json={"prompt": prompt}).json()["prompt_id"]
    prompt["3"]["inputs"]["seed"] = 7
    second = _post(srv, "/api/prompt", json={"prompt": prompt}).json()["prompt_id"]
    queue = _get(srv, "/api/jobs?status=in_progress,pending").json()["jobs"]
    assert {j["id"]: j["status"] for j in queue}.get(second) == "pending"
    assert _post(srv, "/api/jobs/cancel", json={"job_ids": [second]}).status_code == 200
    assert _post(srv, f"/api/jobs/{first}/cancel").status_code == 200
    entry = _wait_job(srv, first)
    assert entry["status"]["status_str"] == "error"  # interrupted
    job = _get(srv, f"/api/jobs/{first}").json()
    assert job["status"] == "cancelled" and job["execution_end_time"] is not None
    assert second not in [j["id"] for j in _get(srv, "/api/jobs").json()["jobs"]]


def test_a_fresh_user_is_sent_to_the_txt2img_template_then_gets_the_page(tmp_path: Path) -> None:
    config = ServeConfig(output_dir=tmp_path / "out", preload=False)
    with running_server(config, wait_ready=False) as s:
        first = _get(s, "/")
        assert first.status_code == 302 and first.headers["location"] == "/?template=sumie_sd_txt2img"
        page = _get(s, "/?template=sumie_sd_txt2img")
        assert page.status_code == 200 and 'id="vue-app"' in page.text
        # a saved workflow (or the frontend's first-run setting) means the user's own graph is restored instead
        assert _post(s, "/api/userdata/workflows%2Fa.json", content=b"{}").status_code == 200
        assert _get(s, "/").status_code == 200
        assert httpx.delete(f"{s.url}/api/userdata/workflows%2Fa.json", timeout=60).status_code == 204
        assert _get(s, "/").status_code == 302
        assert _post(s, "/api/settings/Comfy.TutorialCompleted", json=True).status_code == 200
        assert _get(s, "/").status_code == 200


def test_user_css_is_the_users_file(srv: Running, tmp_path: Path) -> None:
    path = srv.server.config.output_dir.parent / "user" / "default" / "user.css"
    path.write_text("body { color: red; }")
    try:
        assert _get(srv, "/user.css").text == "body { color: red; }"
    finally:
        path.unlink()
    assert _get(srv, "/user.css").text == ""
