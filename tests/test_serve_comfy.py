"""ComfyUI's server API on ``sumie serve``, over a real uvicorn server: ComfyUI's websocket example client, the
WebSocket message sequence, 400 bodies, queue delete / clear, ``/object_info``, ``/view``, uploads, and prompts
sharing the queue with A1111 jobs. The embedded sumie-tiny at 32 px and a few steps.

What each test pins, from ComfyUI v0.3.64 (``server.py``, ``main.py``, ``execution.py``,
``script_examples/websockets_api_example.py``): see the test docstrings.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import Running, running_server, ws_drain, ws_until
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from sumie.checkpoints.manager import ModelManager
from sumie.cli.main import build_parser
from sumie.cli.serve import build_config
from sumie.comfy import ComfyEnvironment, ComfyFolders, PromptExecutor, check_request
from sumie.errors import ConfigError
from sumie.serve import ServeConfig

SIZE, STEPS = 32, 3
LONG = 10000  # KSampler's most steps: a run that only ends by interruption


def api_prompt(seed: int = 5, steps: int = STEPS, text: str = "masterpiece best quality man") -> dict[str, Any]:
    """ComfyUI's ``script_examples`` API-format default graph (ids and links as there), small."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "cfg": 8, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0], "negative": ["7", 0],
            "positive": ["6", 0], "sampler_name": "euler", "scheduler": "normal", "seed": seed, "steps": steps}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sumie-tiny"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": SIZE, "width": SIZE}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": text}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "bad hands"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("serve-comfy")
    with running_server(ServeConfig(output_dir=root / "out", preview_method="latent2rgb")) as running:
        yield running


def _post(srv: Running, path: str, body: Any) -> tuple[int, Any]:
    """urllib POST of JSON (as the example scripts): (status, parsed JSON or raw text)."""
    req = urllib.request.Request(srv.url + path, data=json.dumps(body).encode("utf-8"))
    try:
        with urllib.request.urlopen(req) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode()


def _get(srv: Running, path: str) -> Any:
    with urllib.request.urlopen(srv.url + path) as r:
        return json.loads(r.read())


def _ws(srv: Running, client_id: str) -> ClientConnection:
    return connect(f"ws://{srv.host}:{srv.port}/ws?clientId={client_id}", max_size=None)


def _read_until_done(ws: ClientConnection, prompt_id: str, *, timeout: float = 120) -> list[Any]:
    """Every message (dicts; bytes for binary frames) up to ``executing {node: None}`` of ``prompt_id``."""
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while True:
        m = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(m, bytes):
            out.append(m)
            continue
        msg = json.loads(m)
        out.append(msg)
        if msg["type"] == "executing" and msg["data"]["node"] is None and msg["data"].get("prompt_id") == prompt_id:
            return out


def _wait_for(ws: ClientConnection, kind: str, *, timeout: float = 120) -> list[Any]:
    """Messages up to and including the first of type ``kind``."""
    return ws_until(ws, lambda msg: msg["type"] == kind, timeout=timeout)


def _types(messages: list[Any]) -> list[str]:
    """The event types, without status broadcasts and progress_state (test_comfy_partial_progress.py checks it)."""
    return [m["type"] for m in messages if isinstance(m, dict) and m["type"] not in ("status", "progress_state")]


def _direct_image(tmp: Path, prompt: dict[str, Any]) -> np.ndarray:
    """The same graph through PromptExecutor in this process (the embedded model, fp32 on the CPU as served)."""
    env = ComfyEnvironment(ComfyFolders.under(tmp), ModelManager())
    check = check_request({"prompt": copy.deepcopy(prompt)}, env)
    assert check.ok, check.body
    result = PromptExecutor(env).execute(check.prompt, "direct", check.outputs)
    assert result.success, result.error
    info = result.outputs["9"]["images"][0]
    return np.array(Image.open(env.folders.folder("output") / info["subfolder"] / info["filename"]))


# ---------------------------------------------------------------- (1) ComfyUI's websocket example client
def test_websocket_example_flow_gives_the_direct_runs_image(srv: Running, tmp_path: Path) -> None:
    """websockets_api_example.py: queue with a client_id and prompt_id, read messages until ``executing`` with node
    None for that prompt, then /history/{id} and each image through /view. The image is bit-equal to the same graph
    run through PromptExecutor directly (same model file, dtype and device: the same computation). Preview frames
    (type 1, JPEG) arrive during sampling with a preview method on; the PNG carries the ``prompt`` text chunk."""
    server_address = f"{srv.host}:{srv.port}"
    client_id = str(uuid.uuid4())

    def queue_prompt(prompt: dict[str, Any], prompt_id: str) -> None:
        p = {"prompt": prompt, "client_id": client_id, "prompt_id": prompt_id}
        data = json.dumps(p).encode("utf-8")
        req = urllib.request.Request(f"http://{server_address}/prompt", data=data)
        urllib.request.urlopen(req).read()

    def get_image(filename: str, subfolder: str, folder_type: str) -> bytes:
        url_values = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": folder_type})
        with urllib.request.urlopen(f"http://{server_address}/view?{url_values}") as response:
            return response.read()

    def get_history(prompt_id: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{server_address}/history/{prompt_id}") as response:
            return json.loads(response.read())

    previews: list[bytes] = []

    def get_images(ws: ClientConnection, prompt: dict[str, Any]) -> dict[str, list[bytes]]:
        prompt_id = str(uuid.uuid4())
        queue_prompt(prompt, prompt_id)
        output_images = {}
        while True:
            out = ws.recv(timeout=120)
            if isinstance(out, str):
                message = json.loads(out)
                if message["type"] == "executing":
                    data = message["data"]
                    if data["node"] is None and data["prompt_id"] == prompt_id:
                        break
            else:
                previews.append(out)
                continue
        history = get_history(prompt_id)[prompt_id]
        for node_id in history["outputs"]:
            node_output = history["outputs"][node_id]
            images_output = []
            if "images" in node_output:
                for image in node_output["images"]:
                    images_output.append(get_image(image["filename"], image["subfolder"], image["type"]))
            output_images[node_id] = images_output
        return output_images

    prompt = api_prompt(seed=5, text="masterpiece best quality man")
    with connect(f"ws://{server_address}/ws?clientId={client_id}") as ws:
        images = get_images(ws, prompt)
    assert list(images) == ["9"] and len(images["9"]) == 1
    served = Image.open(io.BytesIO(images["9"][0]))
    assert json.loads(served.text["prompt"]) == prompt
    np.testing.assert_array_equal(np.array(served), _direct_image(tmp_path, prompt))
    assert len(previews) == STEPS
    for frame in previews:
        assert frame[:8] == b"\x00\x00\x00\x01\x00\x00\x00\x01"  # PREVIEW_IMAGE, JPEG
        assert Image.open(io.BytesIO(frame[8:])).format == "JPEG"


# ---------------------------------------------------------------- (2) the message sequence
def test_websocket_sequence_of_a_run_and_of_an_interrupted_run(srv: Running) -> None:
    """server.py / main.py / execution.py: status (with sid) first; per run execution_start, execution_cached
    (what an earlier run left: same inputs), executing per node, progress per step, executed for the output node,
    execution_success, then executing None; an interrupted run ends with execution_interrupted. Another client gets
    none of these events (only the status and progress_state broadcasts)."""
    me, other = uuid.uuid4().hex, uuid.uuid4().hex
    with _ws(srv, me) as ws, _ws(srv, other) as ws2:
        first = json.loads(ws.recv(timeout=10))
        assert first["type"] == "status" and first["data"]["sid"] == me
        assert first["data"]["status"]["exec_info"]["queue_remaining"] == 0
        assert json.loads(ws2.recv(timeout=10))["data"]["sid"] == other
        ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        flags = json.loads(ws.recv(timeout=10))
        assert flags["type"] == "feature_flags" and flags["data"]["supports_preview_metadata"] is False

        status, body = _post(srv, "/prompt", {"prompt": api_prompt(seed=11), "client_id": me})
        assert status == 200 and set(body) == {"prompt_id", "number", "node_errors"}
        pid = body["prompt_id"]
        msgs = _read_until_done(ws, pid)
        json_msgs = [m for m in msgs if isinstance(m, dict)]
        assert json_msgs[0] == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}}}
        types = _types(msgs)
        executed_nodes = [m["data"]["node"] for m in json_msgs if m["type"] == "executing"][:-1]
        cached = next(m for m in json_msgs if m["type"] == "execution_cached")["data"]["nodes"]
        assert sorted(cached + executed_nodes) == sorted(api_prompt())
        assert "3" in executed_nodes and "9" in executed_nodes  # the new seed re-runs the sampler and what follows
        kinds = ["binary" if isinstance(m, bytes) else m["type"] for m in msgs if not (
            isinstance(m, dict) and m["type"] == "progress_state")]
        assert kinds.count("binary") == STEPS
        assert all(kinds[k - 1] == "progress" for k, t in enumerate(kinds) if t == "binary")  # as main.py's hook
        assert types == ["execution_start", "execution_cached", *["executing"] * executed_nodes.index("3"),
                         "executing", *["progress"] * STEPS, *["executing"] * (len(executed_nodes)
                                                                              - executed_nodes.index("3") - 1),
                         "executed", "execution_success", "executing"]
        progress = [m["data"] for m in json_msgs if m["type"] == "progress"]
        assert [(p["value"], p["max"], p["node"], p["prompt_id"]) for p in progress] == \
            [(k, STEPS, "3", pid) for k in range(1, STEPS + 1)]
        executed = next(m for m in json_msgs if m["type"] == "executed")["data"]
        assert executed["node"] == "9" and executed["output"]["images"][0]["type"] == "output"
        finished = [m for m in json_msgs if m["type"] == "status"][-1]
        assert finished["data"]["status"]["exec_info"]["queue_remaining"] == 0
        assert all(m["data"].get("prompt_id") == pid for m in json_msgs if m["type"] != "status")

        status, body = _post(srv, "/prompt", {"prompt": api_prompt(seed=12, steps=LONG), "client_id": me})
        long_id = body["prompt_id"]
        _wait_for(ws, "progress")
        assert _post(srv, "/interrupt", {"prompt_id": long_id}) == (200, None)
        msgs = _read_until_done(ws, long_id)
        assert _types(msgs)[-2:] == ["execution_interrupted", "executing"]
        interrupted = next(m for m in msgs if isinstance(m, dict) and m["type"] == "execution_interrupted")["data"]
        assert interrupted["node_id"] == "3" and interrupted["node_type"] == "KSampler"
        entry = _get(srv, f"/history/{long_id}")[long_id]
        assert entry["status"]["status_str"] == "error" and not entry["status"]["completed"]
        assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached",
                                                               "execution_interrupted"]
        ws2_types = set(ws_drain(ws2, quiet=0.3))
        assert ws2_types == {"status", "progress_state"}  # WebUIProgressHandler sends it to every socket


# ---------------------------------------------------------------- (3) 400 bodies
@pytest.mark.parametrize("prefix", ["", "/api"])
def test_invalid_graphs_answer_comfyuis_400_bodies(srv: Running, prefix: str) -> None:
    """server.py post_prompt / execution.validate_prompt: no prompt -> no_prompt; unknown class -> invalid_prompt
    with empty node_errors; bad inputs -> prompt_outputs_failed_validation with per-node errors."""
    status, body = _post(srv, f"{prefix}/prompt", {"client_id": "x"})
    assert status == 400 and body["error"]["type"] == "no_prompt" and body["node_errors"] == {}

    bad = api_prompt()
    bad["4"]["class_type"] = "NoSuchLoader"
    status, body = _post(srv, f"{prefix}/prompt", {"prompt": bad})
    assert status == 400 and body["error"]["type"] == "invalid_prompt" and body["node_errors"] == {}
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}

    bad = api_prompt()
    del bad["3"]["inputs"]["seed"]
    bad["3"]["inputs"]["sampler_name"] = "no_such_sampler"
    bad["5"]["inputs"]["width"] = 10**9
    status, body = _post(srv, f"{prefix}/prompt", {"prompt": bad})
    assert status == 400 and body["error"]["type"] == "prompt_outputs_failed_validation"
    errors = {e["type"]: e for node in body["node_errors"].values() for e in node["errors"]}
    assert set(errors) == {"required_input_missing", "value_not_in_list", "value_bigger_than_max"}
    assert errors["required_input_missing"]["extra_info"]["input_name"] == "seed"
    assert body["node_errors"]["3"]["class_type"] == "KSampler" and body["node_errors"]["3"]["dependent_outputs"] \
        == ["9"]
    assert _get(srv, f"{prefix}/queue") == {"queue_running": [], "queue_pending": []}


# ---------------------------------------------------------------- (4) queue delete / clear
def test_queue_delete_and_clear_while_a_long_job_runs(srv: Running) -> None:
    """server.py /queue: GET lists [number, id, prompt, extra_data, outputs]; delete removes queued prompts by id,
    clear removes all queued ones; the running one stays (an interrupt for another prompt_id leaves it running)
    until /interrupt; status broadcasts follow each change; deleted prompts get no history."""
    me = uuid.uuid4().hex
    with _ws(srv, me) as ws:
        ws.recv(timeout=10)
        _, body = _post(srv, "/prompt", {"prompt": api_prompt(seed=21, steps=LONG), "client_id": me})
        long_id = body["prompt_id"]
        _wait_for(ws, "progress")
        queued = [_post(srv, "/api/prompt", {"prompt": api_prompt(seed=30 + k), "client_id": me})[1]["prompt_id"]
                  for k in range(3)]
        q = _get(srv, "/queue")
        assert [item[1] for item in q["queue_running"]] == [long_id]
        assert [item[1] for item in q["queue_pending"]] == queued
        item = q["queue_pending"][0]
        assert item[2]["3"]["inputs"]["seed"] == 30 and item[3]["client_id"] == me and item[4] == ["9"]
        assert _get(srv, "/prompt")["exec_info"]["queue_remaining"] == 4

        assert _post(srv, "/queue", {"delete": [queued[1]]}) == (200, None)
        assert [item[1] for item in _get(srv, "/queue")["queue_pending"]] == [queued[0], queued[2]]
        assert _post(srv, "/interrupt", {"prompt_id": queued[0]}) == (200, None)  # not running: nothing stops
        assert _post(srv, "/api/queue", {"clear": True}) == (200, None)
        q = _get(srv, "/queue")
        assert q["queue_pending"] == [] and [item[1] for item in q["queue_running"]] == [long_id]
        remaining: list[int] = []
        while remaining[-1:] != [1]:
            m = _wait_for(ws, "status", timeout=30)[-1]
            remaining.append(m["data"]["status"]["exec_info"]["queue_remaining"])
        deduplicated = [r for k, r in enumerate(remaining) if k == 0 or r != remaining[k - 1]]
        assert deduplicated == [2, 3, 4, 3, 2, 1]  # three queued, one deleted, two cleared

        assert _post(srv, "/interrupt", {}) == (200, None)
        msgs = _read_until_done(ws, long_id)
        assert "execution_interrupted" in _types(msgs)
    assert _get(srv, "/prompt")["exec_info"]["queue_remaining"] == 0
    history = _get(srv, "/history")
    assert long_id in history and not any(q in history for q in queued)


# ---------------------------------------------------------------- (5) object_info
def test_object_info_shape(srv: Running) -> None:
    """server.py node_info: one entry per class with input / input_order / output / output_is_list / output_name /
    name / display_name / description / python_module / category / output_node."""
    info = _get(srv, "/object_info/KSampler")
    assert list(info) == ["KSampler"]
    k = info["KSampler"]
    assert {"input", "input_order", "output", "output_is_list", "output_name", "name", "display_name", "description",
            "python_module", "category", "output_node"} <= set(k)
    assert k["output"] == ["LATENT"] and k["output_node"] is False and k["name"] == "KSampler"
    seed = k["input"]["required"]["seed"]
    assert seed[0] == "INT" and seed[1]["min"] == 0 and seed[1]["max"] == 0xFFFFFFFFFFFFFFFF
    assert "euler" in k["input"]["required"]["sampler_name"][0]
    assert k["input_order"]["required"][:2] == ["model", "seed"]
    everything = _get(srv, "/api/object_info")
    assert {"CheckpointLoaderSimple", "SaveImage", "LoadImage", "KSampler"} <= set(everything)
    assert everything["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["sumie-tiny"]
    assert _get(srv, "/object_info/NoSuchNode") == {}


# ---------------------------------------------------------------- (6) /view
def test_view_serves_only_inside_the_folders(srv: Running) -> None:
    """server.py view_image: '..' or a leading '/' in the name -> 400, an unknown type -> 400, a subfolder leaving
    the folder -> 403, a missing file -> 404."""
    out = srv.server.comfy.folders.folder("output")
    out.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(out / "probe.png")
    secret = out.parent / "secret.txt"
    secret.write_text("no")
    with httpx.Client(base_url=srv.url) as http:
        assert http.get("/view", params={"filename": "probe.png"}).content == (out / "probe.png").read_bytes()
        assert http.get("/api/view", params={"filename": "probe.png", "type": "output"}).status_code == 200
        assert http.get("/view", params={"filename": "../secret.txt"}).status_code == 400
        assert http.get("/view", params={"filename": "/etc/passwd"}).status_code == 400
        assert http.get("/view", params={"filename": "secret.txt", "subfolder": ".."}).status_code == 403
        assert http.get("/view", params={"filename": "passwd", "subfolder": "../../../../../../etc"}).status_code \
            == 403
        assert http.get("/view", params={"filename": "probe.png", "type": "models"}).status_code == 400
        assert http.get("/view", params={"filename": "nothing.png"}).status_code == 404
        for params in ({"filename": "x" * 300 + ".png"}, {"filename": "probe.png", "subfolder": "d" * 300}):
            long = http.get("/view", params=params)  # over a name's 255 bytes: the request's fault, not a 500
            assert long.status_code in (400, 403, 404) and "error" in long.json(), (params, long.text)
        long = http.post("/upload/image", files={"image": ("y" * 300 + ".png", b"x", "image/png")})
        assert long.status_code == 400 and "255 bytes" in long.json()["detail"]
        rgb = http.get("/view", params={"filename": "probe.png", "channel": "rgb"})
        assert Image.open(io.BytesIO(rgb.content)).getpixel((0, 0)) == (1, 2, 3)


# ---------------------------------------------------------------- (7) uploads
def test_upload_then_load_image_uses_it(srv: Running) -> None:
    """server.py image_upload: multipart image -> {name, subfolder, type} in the input folder; another file with the
    same name becomes "name (1).png", the same bytes keep the name; LoadImage lists and reads the upload;
    upload_mask puts the mask's alpha on the original."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    other = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(other, format="PNG")
    name = f"upload-{uuid.uuid4().hex[:8]}.png"
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        r = http.post("/upload/image", files={"image": (name, png.getvalue(), "image/png")})
        assert r.status_code == 200 and r.json() == {"name": name, "subfolder": "", "type": "input"}
        again = http.post("/api/upload/image", files={"image": (name, png.getvalue(), "image/png")})
        assert again.json()["name"] == name
        renamed = http.post("/upload/image", files={"image": (name, other.getvalue(), "image/png")})
        assert renamed.json()["name"] == name.replace(".png", " (1).png")
        over = http.post("/upload/image", files={"image": (name, png.getvalue(), "image/png")},
                         data={"overwrite": "true", "subfolder": "sub"})
        assert over.json() == {"name": name, "subfolder": "sub", "type": "input"}
        assert http.post("/upload/image", files={"image": (name, b"x", "image/png")},
                         data={"subfolder": "../.."}).status_code == 400
        assert name in _get(srv, "/object_info/LoadImage")["LoadImage"]["input"]["required"]["image"][0]

        prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
                  "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "loaded"}}}
        body = _post(srv, "/prompt", {"prompt": prompt})[1]
        entry = _wait_history(srv, body["prompt_id"])
        image = entry["outputs"]["2"]["images"][0]
        saved = np.array(Image.open(io.BytesIO(http.get("/view", params=image).content)))
        assert np.abs(saved.astype(int) - pixels.astype(int)).max() <= 1  # float32 /255 then *255 truncated

        mask = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
        mask.paste((0, 0, 0, 200), (0, 0, SIZE // 2, SIZE))
        mbuf = io.BytesIO()
        mask.save(mbuf, format="PNG")
        ref = json.dumps({"filename": name, "subfolder": "", "type": "input"})
        m = http.post("/upload/mask", files={"image": ("clipspace-mask.png", mbuf.getvalue(), "image/png")},
                      data={"original_ref": ref, "type": "input"})
        assert m.status_code == 200
        masked = Image.open(srv.server.comfy.folders.folder("input") / m.json()["name"])
        alpha = np.array(masked.getchannel("A"))
        assert (alpha[:, : SIZE // 2] == 200).all() and (alpha[:, SIZE // 2 :] == 0).all()
        np.testing.assert_array_equal(np.array(masked.convert("RGB")), pixels)


def _wait_history(srv: Running, prompt_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = _get(srv, f"/history/{prompt_id}")
        if h:
            return h[prompt_id]
        time.sleep(0.05)
    raise AssertionError(f"no history for {prompt_id}")


# ---------------------------------------------------------------- (8) both APIs on one queue
def test_a1111_job_and_comfy_prompt_share_the_queue_in_order(srv: Running) -> None:
    """One FIFO for both APIs: a prompt queued first runs first, the txt2img waits its turn and both complete;
    /queue lists the waiting A1111 job and A1111's /progress shows the running prompt."""
    me = uuid.uuid4().hex
    task = f"a1111-{uuid.uuid4().hex[:8]}"
    answer: dict[str, Any] = {}
    with _ws(srv, me) as ws, httpx.Client(base_url=srv.url, timeout=120) as http:
        ws.recv(timeout=10)
        _, body = _post(srv, "/prompt", {"prompt": api_prompt(seed=41, steps=30), "client_id": me})
        pid = body["prompt_id"]
        _wait_for(ws, "progress")

        def txt2img() -> None:
            answer["r"] = http.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "width": SIZE, "height": SIZE,
                                                               "steps": 2, "force_task_id": task})

        thread = threading.Thread(target=txt2img)
        thread.start()
        deadline = time.monotonic() + 30
        while not (q := _get(srv, "/queue"))["queue_pending"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [i[1] for i in q["queue_running"]] == [pid]
        assert [(i[1], i[3]) for i in q["queue_pending"]] == [(task, {"sumie_job": {"kind": "txt2img"}})]
        progress = http.get("/sdapi/v1/progress").json()
        assert progress["state"]["job"] == "comfyui" and progress["state"]["sampling_steps"] == 30
        assert progress["current_image"]  # the running prompt's live preview
        msgs = _read_until_done(ws, pid)
        thread.join(120)
    assert answer["r"].status_code == 200 and len(answer["r"].json()["images"]) == 1
    statuses = [m["data"]["status"]["exec_info"]["queue_remaining"] for m in msgs
                if isinstance(m, dict) and m["type"] == "status"]
    assert 2 in statuses  # the A1111 job queued behind the prompt is announced as ComfyUI's status
    records = srv.server.records
    comfy, a1111 = records.get(pid), records.get(task)
    assert comfy.state == "done" and a1111.state == "done"
    assert comfy.finished <= a1111.started
    assert _get(srv, f"/history/{pid}")[pid]["status"]["status_str"] == "success"


# ---------------------------------------------------------------- the other routes
def test_other_routes_answer_in_comfyuis_shapes(srv: Running) -> None:
    """/embeddings, /models[/{folder}], /system_stats (with Sumie's entry), /extensions, /history delete / clear,
    /free: each with and without /api."""
    for p in ("", "/api"):
        assert _get(srv, f"{p}/extensions") == []
        assert isinstance(_get(srv, f"{p}/embeddings"), list)
        assert "checkpoints" in _get(srv, f"{p}/models")
        assert _get(srv, f"{p}/models/checkpoints") == ["sumie-tiny"]
        stats = _get(srv, f"{p}/system_stats")
        assert {"os", "ram_total", "ram_free", "comfyui_version", "python_version", "pytorch_version"} <= \
            set(stats["system"])
        assert stats["devices"][0]["type"] == "cpu" and stats["sumie"]["version"]
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(srv, "/models/no_such_folder")
    assert e.value.code == 404

    done = []
    for k in range(2):
        name = f"tiny-{uuid.uuid4().hex[:6]}.png"
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (k, k, k)).save(buf, format="PNG")
        httpx.post(srv.url + "/upload/image", files={"image": (name, buf.getvalue(), "image/png")})
        prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
                  "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
        pid = _post(srv, "/prompt", {"prompt": prompt})[1]["prompt_id"]
        entry = _wait_history(srv, pid)
        assert entry["outputs"]["2"]["images"][0]["type"] == "temp"
        done.append(pid)
    status, body = _post(srv, "/prompt", {"prompt": prompt, "prompt_id": done[0]})
    assert status == 409 and body["field"] == "prompt_id"
    newest = _get(srv, "/history?max_items=1")
    assert list(newest) == [done[-1]]
    assert _post(srv, "/api/history", {"delete": [done[0]]}) == (200, None)
    assert _get(srv, f"/history/{done[0]}") == {} and _get(srv, f"/history/{done[1]}") != {}
    assert _post(srv, "/history", {"clear": True}) == (200, None)
    assert _get(srv, "/history") == {}
    assert _post(srv, "/free", {"unload_models": True, "free_memory": True}) == (200, None)


def test_auth_covers_the_comfy_routes_and_the_websocket(tmp_path: Path) -> None:
    """--api-auth applies to every ComfyUI route and to the WebSocket upgrade."""
    config = ServeConfig(output_dir=tmp_path / "out", auth={"ann": "secret"}, preload=False)
    with running_server(config, wait_ready=False) as s:
        assert httpx.get(s.url + "/api/object_info/KSampler").status_code == 401
        assert httpx.post(s.url + "/prompt", json={"prompt": api_prompt()}).status_code == 401
        assert httpx.get(s.url + "/queue", auth=("ann", "secret")).json() == {"queue_running": [],
                                                                             "queue_pending": []}
        with pytest.raises(InvalidStatus):
            connect(f"ws://{s.host}:{s.port}/ws?clientId=x")
        token = base64.b64encode(b"ann:secret").decode()
        with connect(f"ws://{s.host}:{s.port}/api/ws?clientId=x",
                     additional_headers={"Authorization": f"Basic {token}"}) as ws:
            assert json.loads(ws.recv(timeout=10))["data"]["sid"] == "x"


def test_cli_flags_for_the_comfy_folders_and_previews(srv: Running, tmp_path: Path) -> None:
    """--input-dir (default OUTPUT_DIR/../input) and --preview-method (default none, as ComfyUI's)."""
    parse = build_parser().parse_args
    config = build_config(parse(["serve", "--output-dir", str(tmp_path / "o"), "--input-dir", str(tmp_path / "in"),
                                 "--preview-method", "auto"]))
    assert config.input_dir == tmp_path / "in" and config.preview_method == "auto"
    assert build_config(parse(["serve"])).preview_method == "none"
    folders = srv.server.comfy.folders
    out = srv.server.config.output_dir.resolve()
    assert (folders.output, folders.input, folders.temp) == (out, out.parent / "input", out.parent / "temp")
    with pytest.raises(ConfigError, match="preview method"):
        ServeConfig(preview_method="taesd")


def test_a_prompt_without_client_id_broadcasts_only_what_comfyui_does(srv: Running) -> None:
    """main.py / execution.py with ``server.client_id`` None: ``progress`` and preview frames go to every socket
    (sid None), ``executing`` / ``executed`` / ``execution_success`` to none."""
    with _ws(srv, uuid.uuid4().hex) as ws:
        ws.recv(timeout=10)
        status, body = _post(srv, "/prompt", {"prompt": api_prompt(seed=51)})
        assert status == 200
        _wait_history(srv, body["prompt_id"])
        kinds = ws_drain(ws)
    assert [k for k in kinds if k not in ("status", "progress_state")] == ["progress", "binary"] * STEPS
    assert "progress_state" in kinds
