"""``kill -9`` of a real ``sumie serve`` process, during a job and during an image write, then a restart on the same
``--output-dir``: finished jobs keep their records and files, queued and running ones are marked failed with the
reason, and no half-written file is visible (temporary files are removed at start)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

FAST = {"width": 32, "height": 32, "steps": 3, "sampler_name": "Euler", "cfg_scale": 5.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server(out: Path, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client]]:
    """``sumie serve`` as a subprocess; yields it and a client once a job can be queued (the model loaded)."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "sumie", "serve", "--port", str(port), "--output-dir",
                                 str(out), "--device", "cpu", "--log-level", "warning"], env=env, stdout=logf,
                                stderr=logf)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if client.post("/sdapi/v1/options", json={}).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        model = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        while client.post("/sdapi/v1/options", json={"sd_model_checkpoint": model}).status_code == 503:  # loading
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.2)
        yield proc, client
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _wait(http: httpx.Client, job_id: str, pred: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/api/v1/jobs/{job_id}").json()
        if pred(job):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id}: {job}")


def _visible_images(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and p.suffix == ".png" and not p.name.startswith("."))


def _temp_files(out: Path) -> list[Path]:
    return sorted(out.rglob("*.tmp"))


def _check_whole(paths: list[Path]) -> None:
    for p in paths:
        with Image.open(p) as im:
            im.load()  # a truncated file raises here
            assert "Steps: " in im.info["parameters"]


@pytest.mark.slow
def test_kill_during_a_job_then_restart(tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "serve.log"
    with _server(out, log) as (proc, http):
        done = http.post("/api/v1/jobs", json={"prompt": "kept", "seed": 111, "batch_size": 2, **FAST}).json()
        done = _wait(http, done["id"], lambda j: j["state"] == "done")
        kept = {u: http.get(u).content for u in done["outputs"]}
        slow = http.post("/api/v1/jobs", json={"prompt": "slow", "seed": 222, **{**FAST, "steps": 500}}).json()
        queued = http.post("/api/v1/jobs", json={"prompt": "queued", "seed": 333, **FAST}).json()
        _wait(http, slow["id"], lambda j: (j.get("progress") or {}).get("step", 0) >= 2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    with _server(out, log) as (_proc, http):
        again = http.get(f"/api/v1/jobs/{done['id']}").json()
        assert again["state"] == "done" and again["outputs"] == done["outputs"]
        assert {u: http.get(u).content for u in again["outputs"]} == kept  # the finished job's files, unchanged
        ran = http.get(f"/api/v1/jobs/{slow['id']}").json()
        assert ran["state"] == "failed" and ran["error"] == "the server stopped while the job ran"
        waiting = http.get(f"/api/v1/jobs/{queued['id']}").json()
        assert waiting["state"] == "failed" and "before the job started" in waiting["error"]
        assert _temp_files(out) == []
        new = http.post("/api/v1/jobs", json={"prompt": "after", "seed": 444, **FAST}).json()
        new = _wait(http, new["id"], lambda j: j["state"] in ("done", "failed"))
        assert new["state"] == "done" and not set(new["outputs"]) & set(done["outputs"])  # numbered on
        _check_whole(_visible_images(out))


@pytest.mark.slow
def test_kill_during_a_write_leaves_no_half_file(tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "serve.log"
    caught: list[Path] = []
    for _attempt in range(4):  # the kill must land while a temporary file exists; retry when it was too late
        with _server(out, log) as (proc, http):
            # 128x128 PNGs of a random-weight model compress slowly: each write takes tens of milliseconds
            body = {"prompt": "big", "seed": 555, "batch_size": 4, **{**FAST, "width": 128, "height": 128,
                                                                      "steps": 1}}
            job = http.post("/api/v1/jobs", json=body).json()
            day = out / "txt2img-images" / time.strftime("%Y-%m-%d")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if day.is_dir() and any(e.name.endswith(".tmp") for e in os.scandir(day)):
                    break
                time.sleep(0.0002)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            caught = _temp_files(out)
        if caught:
            break
    assert caught, "no kill landed during a write in 4 tries"
    assert all(p.name.startswith(".") for p in caught)  # a temporary name, never an image name
    _check_whole(_visible_images(out))  # what is visible is whole, even before the restart
    with _server(out, log) as (_proc, http):
        assert _temp_files(out) == []  # cleaned at start
        rec = http.get(f"/api/v1/jobs/{job['id']}").json()
        assert rec["state"] == "failed" and rec["error"] == "the server stopped while the job ran"
        _check_whole(_visible_images(out))


def test_clean_temp_removes_only_interrupted_writes(tmp_path: Path) -> None:
    from sumie.serve.store import JobRecords, OutputStore

    day = tmp_path / "txt2img-images" / "2026-01-02"
    day.mkdir(parents=True)
    left = day / ".00003-42.png.0badc0de.tmp"
    left.write_bytes(b"\x89PNG half")
    keep = [day / "00002-41.png", day / ".notes.tmp", tmp_path / ".00001-1.png.0badc0de.tmp"]
    for p in keep:
        p.write_bytes(b"x")
    assert OutputStore(tmp_path).clean_temp() == [left]
    assert not left.exists() and all(p.exists() for p in keep)
    records = JobRecords(tmp_path / "jobs.sqlite3")
    records.add("a", "txt2img", {})
    records.add("b", "txt2img", {})
    records.start("b")
    records.add("c", "txt2img", {})
    records.start("c")
    records.finish("c", "done", outputs=[str(day / "00002-41.png")])
    assert records.recover() == 2
    a, b, c = (records.get(j) for j in "abc")
    assert a is not None and a.state == "failed" and "before the job started" in (a.error or "")
    assert b is not None and b.state == "failed" and b.error == "the server stopped while the job ran"
    assert c is not None and c.state == "done" and c.outputs == [str(day / "00002-41.png")]
    records.close()
