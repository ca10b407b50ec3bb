"""The job queue is fair between clients: round-robin between clients, FIFO within one, bounded overall and per
client; ``/progress``-side listings (the worker's pending order) are the order jobs will run."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from serve_helpers import Running, running_server

from sumie.checkpoints.embedded import embedded_path
from sumie.serve import Limits, ServeConfig
from sumie.serve.jobs import FairWorker, client_of

USERS = {"alice": "pa", "bob": "pb", "carol": "pc"}


def _job(log: list[str], name: str, gate: threading.Event | None = None) -> Any:
    def job(_resource: object, _control: object) -> str:
        log.append(name)
        if gate is not None:
            assert gate.wait(30)
        return name
    return job


def test_fair_worker_is_round_robin_between_clients_and_fifo_within_one() -> None:
    worker = FairWorker(lambda: None, "cpu", name="fair-test")
    log: list[str] = []
    gate = threading.Event()
    try:
        worker.submit_for("A", _job(log, "a1", gate), job_id="a1")
        deadline = time.monotonic() + 10
        while worker.status().running != "a1":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for jid in ("a2", "a3", "a4"):
            worker.submit_for("A", _job(log, jid), job_id=jid)
        worker.submit_for("B", _job(log, "b1"), job_id="b1")
        worker.submit_for("C", _job(log, "c1"), job_id="c1")
        worker.submit_for("B", _job(log, "b2"), job_id="b2")
        worker.submit_for("A", _job(log, "a5"), job_id="a5")
        # A has one running: its next jobs are in rounds 1, 2, 3, 4; B's and C's first jobs are in round 0.
        assert worker.status().pending == ("b1", "c1", "a2", "b2", "a3", "a4", "a5")
        gate.set()
        assert worker.wait_idle(30)
        assert log == ["a1", "b1", "c1", "a2", "b2", "a3", "a4", "a5"]  # the listed order is the run order
        assert worker.clients == {}
    finally:
        gate.set()
        worker.close()


def test_client_of_names_the_auth_user_the_token_or_the_address() -> None:
    class Req:
        def __init__(self, auth: str | None) -> None:
            self.headers = {"authorization": auth} if auth else {}
            self.client = type("C", (), {"host": "10.0.0.7"})()

    assert client_of(Req("Basic YWxpY2U6cGE=")) == "user:alice"  # alice:pa
    assert client_of(Req("Bearer s3cret")).startswith("token:")
    assert client_of(Req("Bearer s3cret")) != client_of(Req("Bearer other"))
    assert client_of(Req(None)) == "addr:10.0.0.7"
    assert client_of(Req("Basic !!!not-base64")) == "addr:10.0.0.7"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("serve-fair")
    (root / "ckpt").mkdir()
    shutil.copyfile(embedded_path(), root / "ckpt" / "tiny.safetensors")
    limits = Limits(max_steps=10000, max_queue=7, max_queue_per_client=5)
    with running_server(ServeConfig(ckpt_dirs=(root / "ckpt",), output_dir=root / "out", limits=limits,
                                    auth=USERS)) as running:
        yield running


def _post(srv: Running, user: str, steps: int) -> httpx.Response:
    body = {"prompt": "a cat", "width": 32, "height": 32, "steps": steps, "sampler_name": "Euler", "seed": 1}
    return httpx.post(f"{srv.url}/api/v1/jobs", json=body, auth=(user, USERS[user]), timeout=60)


def _view(srv: Running, jid: str) -> dict[str, Any]:
    return httpx.get(f"{srv.url}/api/v1/jobs/{jid}", auth=("alice", "pa"), timeout=60).json()


def test_a_second_client_runs_second_not_fifth_and_queues_are_bounded(srv: Running) -> None:
    a = [_post(srv, "alice", 10000 if i == 0 else 1).json()["id"] for i in range(4)]  # a long first job
    deadline = time.monotonic() + 60
    while _view(srv, a[0])["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    b = _post(srv, "bob", 1).json()["id"]
    queue = httpx.get(f"{srv.url}/queue", auth=("alice", "pa"), timeout=60).json()
    assert [item[1] for item in queue["queue_running"]] == [a[0]]
    assert [item[1] for item in queue["queue_pending"]] == [b, a[1], a[2], a[3]]  # the order they will run
    # bounds: alice has 4 of her 5; a 5th is fine, a 6th is the per-client 503; then the overall limit (7).
    assert _post(srv, "alice", 1).status_code == 202
    r = _post(srv, "alice", 1)
    assert r.status_code == 503 and r.headers["retry-after"] and "--max-queue-per-client" in r.json()["detail"]
    assert _post(srv, "carol", 1).status_code == 202  # 7 queued or running now
    r = _post(srv, "carol", 1)
    assert r.status_code == 503 and r.headers["retry-after"] and "queue is full" in r.json()["detail"]
    assert httpx.delete(f"{srv.url}/api/v1/jobs/{a[0]}", auth=("alice", "pa"), timeout=60).status_code == 200
    jobs = a + [b]
    deadline = time.monotonic() + 120
    while not all(_view(srv, j)["state"] in ("done", "cancelled") for j in jobs):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    started = sorted(jobs, key=lambda j: _view(srv, j)["started"])
    assert started == [a[0], b, a[1], a[2], a[3]], started  # bob's job ran second, not fifth


def test_max_queue_per_client_flag(tmp_path: Any) -> None:
    from sumie.cli.main import build_parser
    from sumie.cli.serve import build_config
    from sumie.errors import ConfigError

    parse = build_parser().parse_args
    out = ["--output-dir", str(tmp_path), "--device", "cpu"]
    assert build_config(parse(["serve", *out])).limits.max_queue_per_client == 0
    assert build_config(parse(["serve", *out, "--max-queue-per-client", "3"])).limits.max_queue_per_client == 3
    with pytest.raises(ConfigError, match="--max-queue-per-client"):
        build_config(parse(["serve", *out, "--max-queue-per-client", "-1"]))


def test_comfyui_client_id_is_the_fair_client() -> None:
    from sumie.serve.comfy_service import _fair_client

    assert _fair_client("tab-1", "user:alice") == "comfy:tab-1"
    assert _fair_client(None, "user:alice") == "user:alice"
