"""The native jobs API (``/api/v1/jobs``, Server-Sent Events, outputs by URL) and bearer tokens, over real HTTP."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from serve_helpers import Running, running_server

from sumie.serve import ServeConfig

FAST = {"width": 32, "height": 32, "steps": 3, "sampler_name": "Euler", "cfg_scale": 5.0}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("serve_jobs")
    with running_server(ServeConfig(output_dir=root / "out")) as running:
        yield running


@pytest.fixture(scope="module")
def http(srv: Running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=120) as client:
        yield client


def _wait(http: httpx.Client, job_id: str, states: tuple[str, ...], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/api/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not in {states}: {job}")


def _events(http: httpx.Client, url: str) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    with http.stream("GET", url) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                assert event is not None
                out.append((event, json.loads(line[len("data: "):])))
    return out


def test_job_runs_saves_and_serves_its_outputs(srv: Running, http: httpx.Client) -> None:
    r = http.post("/api/v1/jobs", json={"task": "txt2img", "prompt": "a fox", "seed": 321, "batch_size": 2, **FAST})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("queued", "running", "done") and job["task"] == "txt2img"
    assert job["url"] == f"/api/v1/jobs/{job['id']}" and job["events"] == f"/api/v1/jobs/{job['id']}/events"
    done = _wait(http, job["id"], ("done", "failed"))
    assert done["state"] == "done" and done["error"] is None and done["finished"] >= done["started"]
    assert done["info"]["all_seeds"] == [321, 322] and len(done["outputs"]) == 2
    for url, text in zip(done["outputs"], done["info"]["infotexts"], strict=True):
        assert url.startswith("/api/v1/outputs/txt2img-images/") and url.endswith(".png")
        got = http.get(url)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(got.content)) as im:
            assert im.size == (32, 32) and im.info["parameters"] == text
    again = _wait(http, http.post("/api/v1/jobs", json={"prompt": "a fox", "seed": 321, "batch_size": 2,
                                                        **FAST}).json()["id"], ("done",))
    assert [http.get(u).content for u in again["outputs"]] == [http.get(u).content for u in done["outputs"]]
    assert again["outputs"] != done["outputs"]  # new files, numbered on


def test_events_one_progress_per_step_then_done(http: httpx.Client) -> None:
    job = http.post("/api/v1/jobs", json={"prompt": "a fox", "seed": 5, "n_iter": 2, **{**FAST, "steps": 4}}).json()
    events = _events(http, job["events"] + "?previews=true")
    names = [e for e, _ in events]
    assert names[-1] == "done" and names.count("done") == 1
    progress = [d for e, d in events if e == "progress"]
    assert [(d["batch"], d["step"]) for d in progress] == [(b, s) for b in range(2) for s in range(1, 5)]
    assert all(d["steps"] == 4 and d["batches"] == 2 and 0 < d["fraction"] <= 1 for d in progress)
    assert progress[-1]["fraction"] == 1.0
    assert any(d.get("current_image") for d in progress)  # a live preview came with the stream
    final = events[-1][1]
    assert final["state"] == "done" and len(final["outputs"]) == 2
    replay = _events(http, job["events"])  # a finished job: its recorded steps replayed, then done at once
    assert replay[-1] == ("done", http.get(job["url"]).json())
    assert [d for e, d in replay[:-1]] == [{k: v for k, v in d.items() if k != "current_image"} for d in progress]


def test_cancel_queued_and_running_jobs_saves_nothing(srv: Running, http: httpx.Client) -> None:
    slow = http.post("/api/v1/jobs", json={"prompt": "slow", "seed": 9001, **{**FAST, "steps": 400}}).json()
    queued = http.post("/api/v1/jobs", json={"prompt": "queued", "seed": 9002, **FAST}).json()
    running = _wait(http, slow["id"], ("running",))
    deadline = time.monotonic() + 60
    while (running.get("progress") or {}).get("step", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        running = http.get(slow["url"]).json()
    assert running["progress"]["steps"] == 400 and 0 < running["progress"]["progress"] < 0.5
    r = http.delete(queued["url"])
    assert r.status_code == 200 and r.json()["state"] == "cancelled"  # removed from the queue at once
    assert http.delete(slow["url"]).status_code == 200
    ended = _wait(http, slow["id"], ("cancelled", "interrupted", "done", "failed"), 60)
    assert ended["state"] == "cancelled" and ended["outputs"] == [] and "cancelled" in ended["error"]
    out = Path(srv.server.config.output_dir)
    assert not list(out.rglob("*-9001.png")) and not list(out.rglob("*-9002.png"))
    assert http.delete(slow["url"]).status_code == 409  # already ended
    assert http.get("/api/v1/jobs/nope").status_code == 404 and http.delete("/api/v1/jobs/nope").status_code == 404


def test_outputs_only_inside_the_output_folder(srv: Running, http: httpx.Client, tmp_path: Path) -> None:
    out = Path(srv.server.config.output_dir)
    assert (out / "sumie-jobs.sqlite3").is_file()
    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    os.symlink(outside, out / "escape.png")
    for path in ("sumie-jobs.sqlite3", "%2e%2e/secret.png", "..%2Fsecret.png", "escape.png", "missing.png",
                 "%2Fetc%2Fpasswd"):
        r = http.get(f"/api/v1/outputs/{path}")
        assert r.status_code == 404, (path, r.status_code)
        assert r.json()["detail"].startswith("no output file")


def test_bad_requests_name_the_field_and_schema_lists_the_routes(http: httpx.Client) -> None:
    r = http.post("/api/v1/jobs", json={"task": "upscale", **FAST})
    assert r.status_code == 422 and "task" in r.text
    r = http.post("/api/v1/jobs", json={"task": "txt2img", "prompt": "x", **{**FAST, "sampler_name": "Nope"}})
    assert r.status_code == 422 and r.json()["field"] == "sampler_name"
    r = http.post("/api/v1/jobs", json={"task": "img2img", "init_images": ["@@@"], **FAST})
    assert r.status_code == 422 and r.json()["field"] == "init_images[0]"
    paths = http.get("/openapi.json").json()["paths"]
    assert {"post"} <= set(paths["/api/v1/jobs"]) and {"get", "delete"} <= set(paths["/api/v1/jobs/{job_id}"])
    assert "/api/v1/jobs/{job_id}/events" in paths and "/api/v1/outputs/{path}" in paths


def test_bearer_tokens_besides_basic_auth(tmp_path: Path) -> None:
    config = ServeConfig(output_dir=tmp_path / "out", auth={"user": "pass"}, api_tokens=("tok-1", "tok-2"),
                         preload=False)
    with running_server(config, wait_ready=False) as running, httpx.Client(base_url=running.url) as http:
        r = http.get("/api/v1/jobs/x")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic, Bearer"
        assert http.get("/api/v1/jobs/x", headers={"Authorization": "Bearer tok-2"}).status_code == 404
        assert http.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer tok-1"}).status_code == 200
        assert http.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/sdapi/v1/samplers", auth=("user", "pass")).status_code == 200
        assert http.get("/controlnet/version", auth=("user", "nope")).status_code == 401
