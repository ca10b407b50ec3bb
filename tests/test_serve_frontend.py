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
import numpy as np
import pytest
from control_testfiles import random_controlnet, write_original
from lora_testfiles import write_kohya
from PIL import Image
from serve_helpers import Running, running_server, to_api

from sumie.checkpoints.embedded import embedded_path
from sumie.checkpoints.loader import load_models
from sumie.checkpoints.manager import ModelManager
from sumie.comfy.env import ComfyEnvironment
from sumie.comfy.nodes.base import RunContext
from sumie.comfy.nodes.image import LoadImage
from sumie.pipelines.control import JobControl
from sumie.serve import ServeConfig
from sumie.serve.frontend import EXAMPLE_INPUTS, INPAINT_BOX, TEMPLATES, frontend_static, write_example_inputs

LORA = "style.safetensors"  # the test LoRA the LoRA template's placeholder is swapped for


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("front")
    write_kohya(root / "loras" / LORA, load_models(embedded_path()))
    # what the ControlNet template names: a random ControlNet at sumie-tiny's shapes (its image: the example input)
    unet = ModelManager().get("checkpoint", "sumie-tiny").config.unet
    write_original(root / "controlnet" / "control_sumie-tiny.safetensors", random_controlnet(unet, seed=3))
    with running_server(ServeConfig(output_dir=root / "out", lora_dirs=(root / "loras",),
                                    controlnet_dirs=(root / "controlnet",))) as running:
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
    long_name = "e%CC%81" * 90  # 90 x "é" as e + combining accent: 270 bytes, over a file name's 255
    for method, url, field in (("GET", f"/api/userdata/{long_name}", "file"),
                               ("POST", f"/api/userdata/{long_name}", "file"),
                               ("DELETE", f"/api/userdata/{long_name}", "file"),
                               ("POST", f"/api/userdata/workflows%2Fours.json/move/{long_name}", "dest"),
                               ("POST", f"/api/userdata/{long_name}/move/workflows%2Fx.json", "file"),
                               ("GET", f"/api/userdata?dir={long_name}", "dir"),
                               ("GET", "/api/userdata/" + "%2F".join(["a" * 200] * 6), "file")):
        r = httpx.request(method, srv.url + url, content=b"x", timeout=60)
        assert r.status_code == 400 and r.json()["field"] == field, (method, url, r.status_code, r.text)
        assert "bytes" in r.json()["detail"]
    assert (root / "workflows" / "ours.json").read_bytes() == body  # not moved
    assert httpx.delete(f"{srv.url}/api/userdata/workflows%2Fours.json", timeout=60).status_code == 204
    assert _get(srv, "/api/userdata/workflows%2Fours.json").status_code == 404


def _object_info(srv: Running) -> dict[str, Any]:
    return _get(srv, "/object_info").json()


def _wait_job(srv: Running, prompt_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = _get(srv, f"/history/{prompt_id}").json()
        if entry:
            return entry[prompt_id]
        time.sleep(0.1)
    raise AssertionError("the prompt did not finish")


def _lora_node(workflow: dict[str, Any]) -> dict[str, Any] | None:
    return next((n for n in workflow["nodes"] if n["type"] == "LoraLoader"), None)


def test_templates_index_lists_sumies_templates_and_each_runs(srv: Running) -> None:
    [category] = _get(srv, "/templates/index.json").json()
    assert category["moduleName"] == "default"
    names = [t["name"] for t in category["templates"]]
    assert names == list(TEMPLATES) and "sumie_sd_txt2img" in names
    assert {"sumie_sd_img2img", "sumie_sd_inpaint", "sumie_sd_lora", "sumie_sd_hires_fix"} <= set(names)
    info = _object_info(srv)
    for template in category["templates"]:
        thumb = _get(srv, f"/templates/{template['name']}-1.{template['mediaSubtype']}")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
        r = _get(srv, f"/templates/{template['name']}.json")
        assert r.status_code == 200
        workflow = r.json()
        assert {n["type"] for n in workflow["nodes"]} <= set(info)
        lora = _lora_node(workflow)
        if lora is not None:  # a placeholder name: refused until the user picks a LoRA of the list
            answer = _post(srv, "/prompt", json={"prompt": to_api(workflow, info)})
            assert answer.status_code == 400, answer.text
            [error] = answer.json()["node_errors"][str(lora["id"])]["errors"]
            assert error["type"] == "value_not_in_list" and error["extra_info"]["input_name"] == "lora_name"
            assert lora["widgets_values"][0] not in info["LoraLoader"]["input"]["required"]["lora_name"][0]
            lora["widgets_values"][0] = LORA
        prompt = to_api(workflow, info)
        for node in prompt.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = 2  # quick; the template's own values validated below
        answer = _post(srv, "/prompt", json={"prompt": to_api(workflow, info)})
        assert answer.status_code == 200 and answer.json()["node_errors"] == {}, answer.text
        _post(srv, "/queue", json={"delete": [answer.json()["prompt_id"]]})
        _post(srv, "/interrupt", json={"prompt_id": answer.json()["prompt_id"]})
        run = _post(srv, "/prompt", json={"prompt": prompt})
        entry = _wait_job(srv, run.json()["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry["status"]
        [images] = [o["images"] for o in entry["outputs"].values()]
        assert len(images) == 1 and images[0]["type"] == "output"
        with Image.open(srv.server.config.output_dir / images[0]["filename"]) as png:
            assert png.size == ((96, 96) if template["name"] == "sumie_sd_hires_fix" else (64, 64))  # hires: x1.5
    basic = _get(srv, "/templates/sumie_sd_txt2img.json").json()
    assert sorted(n["type"] for n in basic["nodes"]) == sorted(
        ["CheckpointLoaderSimple", "CLIPTextEncode", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
         "SaveImage"])
    assert to_api(basic, info)["4"]["inputs"]["ckpt_name"] == "sumie-tiny"
    assert to_api(basic, info)["5"]["inputs"] == {"width": 64, "height": 64, "batch_size": 1}
    assert _get(srv, "/templates/nothing.json").status_code == 404
    assert _get(srv, "/templates/..%2Fapp.py").status_code == 404


def _graph(srv: Running, name: str, info: dict[str, Any]) -> dict[str, Any]:
    prompt = to_api(_get(srv, f"/templates/{name}.json").json(), info)
    return {node["class_type"]: (node_id, node["inputs"]) for node_id, node in prompt.items()}


def test_img2img_inpaint_and_lora_templates_are_wired_as_comfyui_users_expect(srv: Running) -> None:
    info = _object_info(srv)
    g = _graph(srv, "sumie_sd_img2img", info)
    load, encode, sampler = g["LoadImage"], g["VAEEncode"], g["KSampler"]
    assert load[1] == {"image": "example.png"} and encode[1]["pixels"] == [load[0], 0]
    assert sampler[1]["latent_image"] == [encode[0], 0] and 0 < sampler[1]["denoise"] < 1
    assert "EmptyLatentImage" not in g
    g = _graph(srv, "sumie_sd_inpaint", info)
    load, encode, masked, sampler = g["LoadImage"], g["VAEEncode"], g["SetLatentNoiseMask"], g["KSampler"]
    assert load[1] == {"image": "example_inpaint.png"} and encode[1]["pixels"] == [load[0], 0]
    assert masked[1] == {"samples": [encode[0], 0], "mask": [load[0], 1]}  # LoadImage's MASK (the alpha)
    assert sampler[1]["latent_image"] == [masked[0], 0] and 0 < sampler[1]["denoise"] < 1
    g = _graph(srv, "sumie_sd_lora", info)
    ckpt, lora, sampler = g["CheckpointLoaderSimple"], g["LoraLoader"], g["KSampler"]
    assert lora[1]["model"] == [ckpt[0], 0] and lora[1]["clip"] == [ckpt[0], 1]
    assert sampler[1]["model"] == [lora[0], 0] and lora[1]["strength_model"] == lora[1]["strength_clip"] == 1.0
    prompt = to_api(_get(srv, "/templates/sumie_sd_lora.json").json(), info)
    assert [n["inputs"]["clip"] for n in prompt.values() if n["class_type"] == "CLIPTextEncode"] == [[lora[0], 1]] * 2


def test_the_example_inputs_are_written_into_an_empty_input_folder_only(srv: Running, tmp_path: Path) -> None:
    folder = srv.server.comfy.folders.input
    assert sorted(p.name for p in folder.iterdir()) == sorted(EXAMPLE_INPUTS)  # written at start, no .part left
    listed = _object_info(srv)["LoadImage"]["input"]["required"]["image"][0]
    assert set(EXAMPLE_INPUTS) <= set(listed)
    with Image.open(folder / "example.png") as img:
        assert img.mode == "RGB" and img.size == (64, 64)
        rgb = img.copy()
    env = ComfyEnvironment(srv.server.comfy.folders, srv.server.queue.managers[0])
    image, mask = LoadImage().run(RunContext(env, "1", {}, None, JobControl()),
                                  "example_inpaint.png").outputs
    x0, y0, x1, y1 = INPAINT_BOX
    assert image.shape == (1, 64, 64, 3) and mask.shape == (1, 64, 64)
    assert mask[0, y0:y1, x0:x1].min() == 1 and mask.sum() == (x1 - x0) * (y1 - y0)  # 1 in the box, 0 elsewhere
    outside = image[0].clone()
    outside[y0:y1, x0:x1] = 0
    expect = np.asarray(rgb).astype(np.float32) / 255.0
    expect[y0:y1, x0:x1] = 0
    assert (outside.numpy() == expect).all()  # the same picture as example.png around the hole
    # a folder in use is left alone; an empty or missing one gets both files
    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.png").write_bytes(b"x")
    assert write_example_inputs(used) == [] and [p.name for p in used.iterdir()] == ["mine.png"]
    fresh = tmp_path / "fresh" / "input"
    assert [p.name for p in write_example_inputs(fresh)] == list(EXAMPLE_INPUTS)
    assert sorted(p.name for p in fresh.iterdir()) == sorted(EXAMPLE_INPUTS)
    assert (fresh / "example.png").read_bytes() == (folder / "example.png").read_bytes()  # deterministic
    blocked = tmp_path / "a-file"
    blocked.write_bytes(b"x")  # the input folder's path is taken by a file: a warning, no exception
    with pytest.warns(UserWarning, match="could not write the example input images"):
        assert write_example_inputs(blocked / "input") == []


def test_internal_folder_paths_name_each_model_folder(srv: Running) -> None:
    paths = _get(srv, "/internal/folder_paths").json()
    assert paths["loras"] == [str(srv.server.config.lora_dirs[0].resolve())]
    assert paths["checkpoints"] == [] and set(paths) >= {"checkpoints", "loras", "vae", "embeddings", "controlnet"}


def test_jobs_list_a_finished_run_with_its_image(srv: Running) -> None:
    info = _object_info(srv)
    workflow = _get(srv, "/templates/sumie_sd_txt2img.json").json()
    workflow["id"] = "wf-123"
    prompt = to_api(workflow, info)
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
    prompt = to_api(_get(srv, "/templates/sumie_sd_txt2img.json").json(), info)
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
