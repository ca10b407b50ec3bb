"""Newer ComfyUI's ``partial_execution_targets`` (server.py ``post_prompt`` -> ``validate_prompt``: only the listed
output nodes count) and ``progress_state`` messages (comfy_execution/progress.py ``WebUIProgressHandler``: every
touched node's ``{value, max, state, node_id, prompt_id, display_node_id, parent_node_id, real_node_id}``), through
the executor and over a real server's WebSocket; and the model folders the server lists (``/models/{folder}`` and
the loaders' option lists) from ``--models-dir`` and the flat ``--*-dir`` folders.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from serve_helpers import Running, running_server, ws_drain, ws_until
from test_comfy_execution import STEPS, example_prompt, run
from websockets.sync.client import connect

from sumie.checkpoints.embedded import embedded_path
from sumie.checkpoints.manager import ModelFolders, ModelManager
from sumie.comfy import ComfyEnvironment, ComfyFolders, PromptExecutor, check_request
from sumie.serve import ServeConfig


def two_outputs() -> dict[str, Any]:
    """LoadImage -> SaveImage (9) and LoadImage -> ImageInvert -> PreviewImage (10), plus a broken SaveImage (11)
    whose images input links to a missing node."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "a"}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["99", 0], "filename_prefix": "b"}},
    }


@pytest.fixture
def env(tmp_path: Path) -> ComfyEnvironment:
    """Folders with one input image; the embedded model."""
    folders = ComfyFolders.under(tmp_path)
    folders.input.mkdir(parents=True)
    Image.new("RGB", (16, 16), (10, 200, 30)).save(folders.input / "in.png")
    return ComfyEnvironment(folders, ModelManager())


def test_partial_execution_targets_run_only_the_listed_outputs(env: ComfyEnvironment) -> None:
    """Only output 10 (and what it needs) runs; the broken output 11 is not validated; the whole prompt fails."""
    whole = check_request({"prompt": two_outputs()}, env)
    assert whole.ok and whole.outputs == ["9", "10"] and "11" in whole.node_errors  # ComfyUI: 11 reported, others run
    check = check_request({"prompt": two_outputs(), "partial_execution_targets": ["10", "2", "nothere"]}, env)
    assert check.ok and check.outputs == ["10"] and check.node_errors == {}
    result = PromptExecutor(env).execute(check.prompt, "p", check.outputs)
    assert result.success and result.executed == ["1", "2", "10"] and list(result.outputs) == ["10"]
    assert not any(env.folders.folder("output").glob("*.png"))
    only_broken = check_request({"prompt": two_outputs(), "partial_execution_targets": ["11"]}, env)
    assert not only_broken.ok and only_broken.body["error"]["type"] == "prompt_outputs_failed_validation"
    none = check_request({"prompt": two_outputs(), "partial_execution_targets": ["2"]}, env)
    assert none.body == {"error": {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "",
                                   "extra_info": {}}, "node_errors": {}}
    bad = check_request({"prompt": two_outputs(), "partial_execution_targets": "10"}, env)
    assert not bad.ok and bad.body["error"]["type"] == "invalid_prompt"
    assert "partial_execution_targets must be a list" in bad.body["error"]["message"]
    assert check_request({"prompt": two_outputs(), "partial_execution_targets": None}, env).outputs == ["9", "10"]


def _states(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, tuple[str, float, float]]]:
    return [{n: (s["state"], s["value"], s["max"]) for n, s in d["nodes"].items()}
            for e, d in events if e == "progress_state"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI folder with the tiny SD1 checkpoint."""
    from safetensors.torch import save_file

    from sumie.checkpoints.save import random_single_file
    from sumie.configs import TINY

    root = tmp_path_factory.mktemp("progress_state")
    (root / "models" / "checkpoints").mkdir(parents=True)
    save_file(random_single_file(TINY["sd1"], seed=0), str(root / "models" / "checkpoints" / "tiny_sd1.safetensors"))
    return root


def test_progress_state_events_of_a_run(tiny_root: Path, tmp_path: Path) -> None:
    """Each node: running 0/1 before its ``executing``, running k/STEPS before each ``progress``, finished (value =
    max) after its outputs; every message holds every node touched so far; a cached output node is only finished."""
    env = ComfyEnvironment(ComfyFolders.under(tmp_path), ModelManager(ModelFolders(tiny_root)))
    executor = PromptExecutor(env)
    result, events = run(env, example_prompt("tiny_sd1.safetensors"), executor, prompt_id="ps", progress_state=True)
    assert result.success
    kinds = [e for e, _ in events]
    for k, e in enumerate(kinds):
        if e in ("executing", "progress") and events[k][1].get("node") is not None:
            assert kinds[k - 1] == "progress_state"  # the state first, as the registry's handlers run first
    states = _states(events)
    sampler = [s["3"] for s in states if "3" in s]
    sampler = [v for k, v in enumerate(sampler) if k == 0 or v != sampler[k - 1]]  # later messages repeat it
    assert sampler == [("running", 0.0, 1.0), *[("running", k, STEPS) for k in range(1, STEPS + 1)],
                       ("finished", STEPS, STEPS)]
    assert states[-1] == {n: ("finished", *((STEPS, STEPS) if n == "3" else (1.0, 1.0)))
                          for n in ("4", "6", "7", "5", "3", "8", "9")}
    first = next(d for e, d in events if e == "progress_state")
    assert first == {"prompt_id": "ps", "nodes": {"4": {
        "value": 0.0, "max": 1.0, "state": "running", "node_id": "4", "prompt_id": "ps", "display_node_id": "4",
        "parent_node_id": None, "real_node_id": "4"}}}
    again, events = run(env, example_prompt("tiny_sd1.safetensors"), executor, prompt_id="ps2", progress_state=True)
    assert again.success and _states(events) == [{"9": ("finished", 1.0, 1.0)}]


# ---------------------------------------------------------------- over a real server


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Path]]:
    """A server on a ComfyUI folder (the embedded model as its checkpoint, a file in each adapter folder) plus flat
    --upscaler-dir / --clip-vision-dir / --ipadapter-dir / --controlnet-dir folders."""
    root = tmp_path_factory.mktemp("serve-partial")
    models = root / "ComfyUI" / "models"
    (models / "checkpoints").mkdir(parents=True)
    shutil.copy(embedded_path(), models / "checkpoints" / "tiny.safetensors")
    for folder, name in (("controlnet", "cn.safetensors"), ("upscale_models", "4x.pth"),
                         ("ipadapter", "ip.bin"), ("clip_vision", "vit.safetensors")):
        (models / folder).mkdir()
        (models / folder / name).write_bytes(b"x")
    flat = {k: root / k for k in ("more_cn", "more_up", "more_cv", "more_ip")}
    for k, d in flat.items():
        d.mkdir()
        (d / f"{k}.safetensors").write_bytes(b"x")
    config = ServeConfig(models_dir=root / "ComfyUI", output_dir=root / "out", controlnet_dirs=(flat["more_cn"],),
                         upscaler_dirs=(flat["more_up"],), clip_vision_dirs=(flat["more_cv"],),
                         ipadapter_dirs=(flat["more_ip"],))
    (root / "input").mkdir()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(root / "input" / "in.png")
    with running_server(config) as running:
        yield running, root


def _get(srv: Running, path: str) -> Any:
    with urllib.request.urlopen(srv.url + path) as r:
        return json.loads(r.read())


def _post(srv: Running, path: str, body: Any) -> tuple[int, Any]:
    req = urllib.request.Request(srv.url + path, data=json.dumps(body).encode("utf-8"))
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_folders_and_option_lists(srv: tuple[Running, Path]) -> None:
    """/models names the folders; /models/{folder} and the loaders' lists hold the folder's files and the flat
    folder's, sorted by name."""
    s, _ = srv
    assert {"checkpoints", "controlnet", "upscale_models", "ipadapter", "clip_vision"} <= set(_get(s, "/models"))
    want = {"controlnet": ["cn.safetensors", "more_cn.safetensors"],
            "upscale_models": ["4x.pth", "more_up.safetensors"], "ipadapter": ["ip.bin", "more_ip.safetensors"],
            "clip_vision": ["more_cv.safetensors", "vit.safetensors"]}
    for folder, names in want.items():
        assert _get(s, f"/models/{folder}") == names
        assert _get(s, f"/api/models/{folder}") == names
    info = _get(s, "/object_info")
    assert info["ControlNetLoader"]["input"]["required"]["control_net_name"][0] == want["controlnet"]
    assert info["DiffControlNetLoader"]["input"]["required"]["control_net_name"][0] == want["controlnet"]
    assert info["UpscaleModelLoader"]["input"]["required"]["model_name"][0] == want["upscale_models"]
    assert info["IPAdapterModelLoader"]["input"]["required"]["ipadapter_file"][0] == want["ipadapter"]
    assert info["CLIPVisionLoader"]["input"]["required"]["clip_name"][0] == want["clip_vision"]


def test_partial_targets_and_progress_state_over_the_websocket(srv: tuple[Running, Path]) -> None:
    """POST /prompt with partial_execution_targets ["10"]: progress_state messages for nodes 1, 2 and 10 only (on
    every socket, as ComfyUI broadcasts them), executing for those nodes only, the history has output 10 only; a bad
    targets value is a 400."""
    s, _ = srv
    me, other = uuid.uuid4().hex, uuid.uuid4().hex
    with connect(f"ws://{s.host}:{s.port}/ws?clientId={me}", max_size=None) as ws, \
            connect(f"ws://{s.host}:{s.port}/ws?clientId={other}", max_size=None) as ws2:
        assert json.loads(ws.recv(timeout=10))["type"] == "status"
        assert json.loads(ws2.recv(timeout=10))["type"] == "status"
        status, body = _post(s, "/prompt", {"prompt": two_outputs(), "client_id": me,
                                            "partial_execution_targets": ["10"]})
        assert status == 200 and body["node_errors"] == {}
        pid = body["prompt_id"]
        msgs = ws_until(ws, lambda msg: msg["type"] == "executing" and msg["data"]["node"] is None)
        seen_by_other = ws_drain(ws2)  # progress_state goes to every socket (send_sync without a sid), the rest not
    assert "progress_state" in seen_by_other and set(seen_by_other) <= {"status", "progress_state"}
    states = [m["data"] for m in msgs if m["type"] == "progress_state"]
    assert states and all(d["prompt_id"] == pid for d in states)
    assert {n: v["state"] for n, v in states[-1]["nodes"].items()} == {"1": "finished", "2": "finished",
                                                                        "10": "finished"}
    assert [m["data"]["node"] for m in msgs if m["type"] == "executing"] == ["1", "2", "10", None]
    history = _get(s, f"/history/{pid}")[pid]
    assert list(history["outputs"]) == ["10"] and history["prompt"][4] == ["10"]
    status, body = _post(s, "/prompt", {"prompt": two_outputs(), "partial_execution_targets": [10]})
    assert status == 400 and body["error"]["type"] == "invalid_prompt"


def test_serve_flags_for_the_new_folders(tmp_path: Path) -> None:
    """``--upscaler-dir`` / ``--clip-vision-dir`` / ``--ipadapter-dir`` reach the config (repeatable); a missing
    folder is a clear error naming the flag."""
    from sumie.cli.main import build_parser
    from sumie.cli.serve import build_config
    from sumie.errors import ConfigError

    dirs = {k: tmp_path / k for k in ("up1", "up2", "cv", "ip")}
    for d in dirs.values():
        d.mkdir()
    args = build_parser().parse_args(["serve", "--upscaler-dir", str(dirs["up1"]), "--upscaler-dir", str(dirs["up2"]),
                                      "--clip-vision-dir", str(dirs["cv"]), "--ipadapter-dir", str(dirs["ip"])])
    config = build_config(args)
    assert config.upscaler_dirs == (dirs["up1"], dirs["up2"])
    assert config.clip_vision_dirs == (dirs["cv"],) and config.ipadapter_dirs == (dirs["ip"],)
    with pytest.raises(ConfigError, match="--ipadapter-dir .*: no such folder"):
        build_config(build_parser().parse_args(["serve", "--ipadapter-dir", str(tmp_path / "nope")]))
