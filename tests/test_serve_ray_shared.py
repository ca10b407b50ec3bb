"""Several servers on one output folder and job records (``ServeConfig.shared``: what each replica of ``sumie serve
--ray`` is), without Ray: a job queued on one is seen, followed and cancelled through the other; two processes'
image numbering never overwrites; ``--ray`` without Ray installed, and bad ``--ray`` flags, are one-line errors
(before any cluster is started or joined)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from serve_helpers import Running, running_server

from sumie.serve import ServeConfig
from sumie.serve.store import JobRecords, OutputStore, prepare_shared

FAST = {"width": 32, "height": 32, "sampler_name": "Euler", "cfg_scale": 5.0}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Running]]:
    out = tmp_path_factory.mktemp("shared")
    config = ServeConfig(output_dir=out, shared=True, progress_write_s=0.05)
    with running_server(config) as a, running_server(config) as b:
        yield a, b


def _poll(client: httpx.Client, url: str, until: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(url).json()
        if until(view):
            return view
        time.sleep(0.02)
    raise AssertionError(f"{url}: condition not met in {timeout} s; last: {view}")


def test_a_job_of_one_server_is_followed_and_cancelled_through_the_other(pair: tuple[Running, Running]) -> None:
    a, b = pair
    with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
        long = ca.post("/api/v1/jobs", json={"prompt": "long", "seed": 5, "steps": 200, **FAST}).json()
        url = long["url"]
        assert b.server.queue.handle(long["id"]) is None  # b does not hold it: what b answers comes from the records
        seen = _poll(cb, url, lambda v: v["state"] == "running" and v["progress"] and v["progress"]["step"] >= 2)
        assert seen["progress"]["steps"] == 200 and 0.0 < seen["progress"]["progress"] < 1.0
        assert seen["worker"] == a.server.queue.worker_id
        progress = cb.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()  # A1111's, on b
        assert progress["state"]["sampling_steps"] == 200 and progress["state"]["job"] == "txt2img"
        assert progress["progress"] > 0.0
        gone = cb.delete(url)
        assert gone.status_code == 200, gone.text
        ended = _poll(ca, url, lambda v: v["state"] in ("done", "failed", "cancelled", "interrupted"), timeout=60)
        assert ended["state"] == "cancelled" and ended["outputs"] == [] and ended["progress"] is None
        assert cb.delete(url).status_code == 409  # ended: nothing to cancel on either


def test_finished_job_outputs_info_and_events_through_the_other(pair: tuple[Running, Running]) -> None:
    a, b = pair
    with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
        job = ca.post("/api/v1/jobs", json={"prompt": "short", "seed": 77, "steps": 12, **FAST}).json()
        events: list[tuple[str, dict[str, Any]]] = []
        with cb.stream("GET", job["events"]) as r:  # b's stream of a's job
            kind = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind is not None:
                    events.append((kind, json.loads(line[6:])))
        kinds = [k for k, _ in events]
        assert kinds[-1] == "done" and "progress" in kinds, kinds
        steps = [d["step"] for k, d in events if k == "progress"]
        assert steps == sorted(steps) and steps[-1] >= 1  # as a wrote them (its first write: before step 1)
        assert all(d["steps"] == 12 for k, d in events if k == "progress" and d["step"] > 0)
        done = events[-1][1]
        assert done["state"] == "done" and done["info"]["seed"] == 77 and len(done["outputs"]) == 1
        assert done["worker"] == a.server.queue.worker_id
        image = cb.get(done["outputs"][0])
        assert image.status_code == 200 and image.content == ca.get(done["outputs"][0]).content
        assert cb.get(job["url"]).json() == ca.get(job["url"]).json()


def test_a_job_cancelled_while_queued_on_the_other_never_runs(pair: tuple[Running, Running]) -> None:
    a, b = pair
    with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
        first = ca.post("/api/v1/jobs", json={"prompt": "first", "seed": 1, "steps": 30, **FAST}).json()
        queued = ca.post("/api/v1/jobs", json={"prompt": "queued", "seed": 2, "steps": 30, **FAST}).json()
        assert cb.get(queued["url"]).json()["state"] == "queued"
        assert cb.delete(queued["url"]).status_code == 200
        ended = _poll(ca, queued["url"], lambda v: v["state"] not in ("queued", "running"))
        assert ended["state"] == "cancelled" and ended["outputs"] == []
        assert _poll(ca, first["url"], lambda v: v["state"] not in ("queued", "running"))["state"] == "done"


def test_two_stores_on_one_folder_never_overwrite(tmp_path: Path) -> None:
    stores = [OutputStore(tmp_path), OutputStore(tmp_path)]  # two processes: two locks, one folder
    saved: list[Path] = []
    lock = threading.Lock()

    def save(k: int) -> None:
        for j in range(6):
            path = stores[k % 2].save("txt2img", Image.new("RGB", (8, 8), (k, j, 0)), seed=k * 10 + j,
                                      infotext=f"seed {k * 10 + j}", when=0)
            with lock:
                saved.append(path)

    threads = [threading.Thread(target=save, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(saved) == len(set(saved)) == 36
    for path in saved:
        with Image.open(path) as im:
            seed = int(im.info["parameters"].split()[1])
            assert path.name.endswith(f"-{seed}.png") and im.getpixel((0, 0))[:2] == (seed // 10, seed % 10)


def test_prepare_shared_recovers_once_and_shared_servers_only_dead_processes(tmp_path: Path) -> None:
    db = tmp_path / "sumie-jobs.sqlite3"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    host = socket.gethostname()
    dead, alive = f"{host}:{int(gone.stdout)}", f"{host}:{os.getpid()}"
    records = JobRecords(db)
    records.add("other-host", "txt2img", {}, "elsewhere:1")
    records.start("other-host", "elsewhere:1")
    records.add("alive", "txt2img", {}, alive)
    records.start("alive", alive)
    records.add("dead-running", "txt2img", {}, dead)
    records.start("dead-running", dead)
    records.add("dead-queued", "txt2img", {}, dead)
    records.close()
    from sumie.serve.server import Server

    server = Server(ServeConfig(output_dir=tmp_path, shared=True, preload=False))
    try:  # a replica starting beside running ones fails only the jobs of this host's dead processes
        assert server.recovered == 2
        assert [server.records.get(j).state for j in ("other-host", "alive", "dead-running", "dead-queued")] == \
            ["running", "running", "failed", "failed"]
        assert dead in server.records.get("dead-queued").error
    finally:
        server.close()
    assert prepare_shared(tmp_path, db) == (2, [])  # before replicas start: every unfinished job
    again = JobRecords(db)
    assert again.get("other-host").state == "failed" and again.get("alive").state == "failed"
    again.close()


@pytest.mark.parametrize("command", ["serve", "batch"])
def test_ray_flag_without_ray_is_a_one_line_error(command: str, tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"prompt": "a"}\n')
    code = "import sys; sys.modules['ray'] = None; from sumie.cli.main import main; sys.exit(main(sys.argv[1:]))"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["serve", "--ray", "--port", str(port), "--output-dir", "out"] if command == "serve" else \
        ["batch", "x.jsonl", "-o", "out", "--ray"]
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "--ray needs Ray: pip install 'sumie[ray]'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("flags", "message"), [
    (["--ray", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
    (["--ray", "no-port"], "--ray no-port: give HOST:PORT"),
    (["--ray", "--replicas", "0"], "--replicas must be at least 1, got 0"),
    (["--ray", "--device", "cuda:0,cuda:1"], "with --ray each replica has one device"),
])
def test_bad_ray_flags_are_one_line_errors(flags: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"prompt": "a"}\n')
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "sumie", "batch", "x.jsonl", "-o", "out", *flags], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"sumie: error: {message}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - t0 < 60  # no cluster started, no minutes of retries
