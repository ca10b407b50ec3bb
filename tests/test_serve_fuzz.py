"""``sumie serve`` under schemathesis: every operation of its own ``/openapi.json`` fuzzed with valid and invalid
requests against a real server (sumie-tiny, limits set very low so bodies that pass validation finish fast). No 5xx
but a 503 with Retry-After, every answer JSON, every 422 naming the field at fault; plus the 500s it found, pinned."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from serve_helpers import Running, running_server

from sumie.checkpoints.embedded import embedded_path
from sumie.serve import Limits, ServeConfig

LIMITS = Limits(max_pixels=64 * 64, max_steps=2, max_images=2, max_b64_bytes=20_000, max_image_pixels=64 * 64,
                max_body_bytes=100_000, max_queue=3)
FILE_TYPES = ("image/", "application/octet-stream", "text/event-stream")  # 2xx answers that are files or streams


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("serve-fuzz")
    (root / "ckpt").mkdir()
    shutil.copyfile(embedded_path(), root / "ckpt" / "tiny.safetensors")
    with running_server(ServeConfig(ckpt_dirs=(root / "ckpt",), output_dir=root / "out", limits=LIMITS)) as running:
        yield running


def names_field(body: Any) -> bool:
    """A 422 body names the field: ``field`` (Sumie's ApiError) or FastAPI's ``detail[*].loc`` (``["body"]``: the
    body as a whole)."""
    if not isinstance(body, dict):
        return False
    if isinstance(body.get("field"), str) and body["field"]:
        return True
    detail = body.get("detail")
    return isinstance(detail, list) and bool(detail) and all(
        isinstance(d, dict) and isinstance(d.get("loc"), list) and d["loc"] and d.get("msg")
        for d in detail)


def problem(status: int, headers: dict[str, Any], text: str) -> str | None:
    """What is wrong with one answer, or None."""
    ctype = (headers.get("content-type") or "").lower()
    if status >= 500 and not (status == 503 and headers.get("retry-after")):
        return f"server error {status}: {text[:300]}"
    if 200 <= status < 300 and (ctype.startswith(FILE_TYPES) or not text):
        return None  # a file, a stream, or ComfyUI's empty 200 (POST /interrupt, /free, /queue, /history)
    if "json" not in ctype:
        return f"{status} answered {ctype!r}, not JSON: {text[:200]}"
    try:
        body = httpx.Response(status, content=text.encode()).json()
    except ValueError:
        return f"{status} body is not JSON: {text[:200]}"
    if status == 422 and not names_field(body):
        return f"422 that names no field: {text[:300]}"
    if 400 <= status < 500 and not body:
        return f"{status} with an empty body"
    return None


def fuzz_operation(srv: Running, op: Any, mode: schemathesis.GenerationMode, examples: int, found: list[str]) -> None:
    """``examples`` cases of one operation in one mode; problems go to ``found`` (with a curl line)."""
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(mode))
    def run(case: schemathesis.Case) -> None:
        r = case.call(base_url=srv.url, timeout=60)
        headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in r.headers.items()}
        bad = problem(r.status_code, headers, r.text)
        if bad is not None:
            found.append(f"{op.label} ({mode.value}): {bad}\n  {case.as_curl_command()}")

    run()


def fuzz(srv: Running, examples: int) -> list[str]:
    """Run ``examples`` valid and ``examples`` invalid cases per operation of the server's schema; the problems."""
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    found: list[str] = []
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) > 50, "the schema lost its operations"
    for op in ops:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            fuzz_operation(srv, op, mode, examples, found)
    return found


def test_fuzzed_requests_get_no_500_and_json_errors_naming_the_field(srv: Running) -> None:
    found = fuzz(srv, examples=3)
    assert not found, "\n".join(found[:20])


@pytest.mark.slow
def test_fuzzed_requests_long_run(srv: Running) -> None:
    found = fuzz(srv, examples=60)
    assert not found, "\n".join(found[:20])


def test_problem_check_catches_what_it_must() -> None:
    json_h = {"content-type": "application/json"}
    assert problem(500, json_h, '{"error": "x"}') is not None
    assert problem(503, json_h, '{"detail": "full"}') is not None  # no Retry-After
    assert problem(503, {**json_h, "retry-after": "5"}, '{"detail": "full"}') is None
    assert problem(404, {"content-type": "text/plain"}, "Not Found") is not None
    assert problem(422, json_h, '{"detail": "bad"}') is not None
    assert problem(422, json_h, '{"detail": [{"loc": ["body", "steps"], "msg": "too big"}]}') is None
    assert problem(422, json_h, '{"error": "ApiError", "detail": "steps: 9 > 2", "field": "steps"}') is None
    assert problem(200, {"content-type": "image/png"}, "\x89PNG") is None
    assert problem(200, {"content-type": "text/html"}, "<html>") is not None


def _comfy_prompt(**extra: Any) -> dict[str, Any]:
    """A valid ComfyUI API prompt (32 px, 1 step) plus ``extra`` top-level fields."""
    return {"prompt": {
        "3": {"class_type": "KSampler", "inputs": {
            "cfg": 8, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0], "negative": ["7", 0],
            "positive": ["6", 0], "sampler_name": "euler", "scheduler": "normal", "seed": 1, "steps": 1}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 32, "width": 32}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a cat"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "fuzz", "images": ["8", 0]}}}, **extra}


def _drain(srv: Running, timeout: float = 120) -> None:
    """Wait until ComfyUI's queue is empty, so the valid prompts queued here cannot fill it (a 503)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        q = httpx.get(f"{srv.url}/queue", timeout=60).json()
        if not q["queue_running"] and not q["queue_pending"]:
            return
        time.sleep(0.1)
    raise AssertionError(f"the queue did not empty in {timeout} s")


def test_direct_bad_inputs_get_4xx_naming_the_field(srv: Running) -> None:
    """Hand-made bad bodies the schema does not describe (ComfyUI's free-form JSON)."""
    for path in ("/prompt", "/api/prompt"):
        _drain(srv)
        assert httpx.post(f"{srv.url}{path}", json=_comfy_prompt(), timeout=60).status_code == 200  # valid as is
        for bad in ({"number": "abc"}, {"number": [1]}, {"number": {"x": 1}}, {"number": "nan"}, {"client_id": 5},
                    {"prompt_id": [1]}, {"prompt_id": {"a": 1}}, {"extra_data": "x", "front": "yes"}):
            r = httpx.post(f"{srv.url}{path}", json=_comfy_prompt(**bad), timeout=60)
            assert problem(r.status_code, dict(r.headers), r.text) is None, (path, bad, r.text)
            assert r.status_code < 500, (path, bad, r.status_code, r.text)


@pytest.mark.parametrize(("path", "body", "field"), [
    ("txt2img", {"width": 100_000, "height": 64}, "width"),
    ("txt2img", {"steps": "many"}, "steps"),
    ("txt2img", {"sampler_name": ["Euler"]}, "sampler_name"),
    ("img2img", {"init_images": ["!!!not-base64"]}, "init_images"),
    ("img2img", {"init_images": ["data:image/png;base64,AAAA"]}, "init_images"),
    ("img2img", {"init_images": ["A" * 30_000]}, "init_images"),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}}, "sd_model_checkpoint"),
    ("png-info", {"image": "###"}, "image"),
    ("extra-single-image", {"image": "abc"}, "image"),
])
def test_a1111_bad_inputs_name_the_field(srv: Running, path: str, body: dict[str, Any], field: str) -> None:
    """Malformed base64, huge sizes, traversal names and wrong types: a 4xx whose body names the field."""
    r = httpx.post(f"{srv.url}/sdapi/v1/{path}", json={"steps": 1, "width": 32, "height": 32, **body}, timeout=60)
    assert 400 <= r.status_code < 500 and problem(r.status_code, dict(r.headers), r.text) is None, r.text
    named = r.json().get("field") or ".".join(str(x) for x in r.json()["detail"][0]["loc"])
    assert field in named, r.text
