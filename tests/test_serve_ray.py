"""``sumie serve --ray`` and ``sumie batch --ray`` on a local Ray cluster: 2 CPU replicas of sumie-tiny behind Ray
Serve's HTTP proxy (one module-scoped cluster and deployment). Ray is a dev dependency here: without it these tests
fail at import, they are never skipped."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import ray
from PIL import Image
from ray import serve
from ray.cluster_utils import Cluster
from serve_helpers import running_server

from sumie.serve import ServeConfig
from sumie.serve.batch import run_batch
from sumie.serve.config import Limits
from sumie.serve.ray_app import Deployed, deploy, plan_replicas, run_batch_ray
from sumie.serve.store_actor import close_store

pytestmark = pytest.mark.slow  # a Ray cluster and two replicas: about a minute on 2 busy cores

FAST = {"width": 32, "height": 32, "sampler_name": "Euler", "cfg_scale": 5.0}
MAX_QUEUE = 3  # per replica
TERMINAL = ("done", "interrupted", "failed", "cancelled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_starts_a_cluster_serves_and_stops_on_sigint(tmp_path: Path) -> None:
    # first in the module: the module's own cluster is not up yet
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sumie", "serve", "--ray", "--replicas", "1", "--device", "cpu",
                             "--port", str(port), "--output-dir", str(tmp_path / "out")], cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stderr is not None
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any("replica(s) ready in" in x for x in lines):
            line = proc.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        assert any("replica(s) ready in" in x for x in lines), "".join(lines)
        r = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json={"prompt": "a", "steps": 3, **FAST},
                       timeout=120)
        assert r.status_code == 200 and r.headers["x-sumie-replica"] and len(r.json()["images"]) == 1
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=120)[1]
        assert proc.returncode == 0, rest
        assert "stopping the replicas" in rest and "Traceback" not in rest, rest
        assert (tmp_path / "out" / "sumie-jobs.sqlite3").is_file()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    # Two Ray nodes on this machine. The head has no CPU for replicas: it runs this process (the driver) and the job
    # store actor. The other node, with 4 logical CPUs on this 2-core machine (2 for the Serve replicas, 2 for the
    # batch actors), runs every replica and batch actor, so they reach the records and images only through the store.
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes.add_node(num_cpus=4)
    ray.init(address=nodes.address, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="module")
def serve_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deployment's --output-dir (records and images, on the head node)."""
    return tmp_path_factory.mktemp("ray-serve")


@pytest.fixture(scope="module")
def deployment(cluster: Any, serve_out: Path) -> Iterator[tuple[Deployed, str]]:
    """Two CPU replicas behind Serve's proxy: (what deploy started, the proxy's URL)."""
    plan, shared = plan_replicas(ServeConfig(output_dir=serve_out, limits=Limits(max_queue=MAX_QUEUE)), 2, 1.0,
                                 "cpu")
    assert plan.replicas == 2 and plan.gpus == 0 and shared.shared and shared.output_dir.is_absolute()
    port = _free_port()
    running = deploy(shared, plan, "127.0.0.1", port)  # holds the store actor: it ends when this is dropped
    try:
        yield running, f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        close_store(running.store)


@pytest.fixture(scope="module")
def deployed(deployment: tuple[Deployed, str]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=deployment[1], timeout=120) as client:
        yield client


def _open_files(pid: int) -> set[str]:
    """The files process ``pid`` has open (Linux /proc)."""
    fds = Path(f"/proc/{pid}/fd")
    return {os.path.realpath(fds / fd) for fd in os.listdir(fds)}


def _raylet(pid: int) -> int:
    """The pid of the Ray node (its raylet process) that started worker process ``pid``."""
    parent = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    assert "raylet" in Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace"), parent
    return parent


def test_replicas_run_on_another_node_and_reach_the_store_only_through_its_actor(
        deployment: tuple[Deployed, str], deployed: httpx.Client, serve_out: Path) -> None:
    answers = [deployed.post("/sdapi/v1/txt2img", json={"prompt": f"node {k}", "seed": k, "steps": 2,
                                                        "save_images": True, **FAST}) for k in range(4)]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    replicas = {int(r.headers["x-sumie-replica"].rpartition(":")[2]) for r in answers}
    store = ray.get(deployment[0].store.__ray_call__.remote(lambda _actor: os.getpid()))
    assert replicas and all(_raylet(p) != _raylet(store) for p in replicas)  # another Ray node than the store's
    database = os.path.realpath(serve_out / "sumie-jobs.sqlite3")
    assert database in _open_files(store)  # the store actor holds the records open ...
    for pid in replicas:  # ... and no replica does (nor its WAL): they reach them only through the actor
        assert not {f for f in _open_files(pid) if f.startswith(database)}, pid
    assert [json.loads(r.json()["info"])["seed"] for r in answers] == [0, 1, 2, 3]
    names = {p.name.split("-", 1)[1] for p in serve_out.rglob("*.png")}
    assert names >= {"0.png", "1.png", "2.png", "3.png"}  # the store wrote them where --output-dir says


def _png(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def test_a1111_txt2img_through_ray_matches_the_single_server(deployed: httpx.Client, tmp_path: Path) -> None:
    body = {"prompt": "a lighthouse", "negative_prompt": "fog", "seed": 4242, "steps": 4, **FAST}
    r = deployed.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-sumie-replica"]  # a replica answered
    with running_server(ServeConfig(output_dir=tmp_path)) as single, httpx.Client(base_url=single.url,
                                                                                     timeout=120) as local:
        want = local.post("/sdapi/v1/txt2img", json=body).json()
    got = r.json()
    assert json.loads(got["info"])["seed"] == json.loads(want["info"])["seed"] == 4242
    a, b = _png(got["images"][0]), _png(want["images"][0])
    assert a.size == (32, 32) and a.info["parameters"] == b.info["parameters"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same computation (1 torch thread), same pixels


def _post_job(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    """POST a native job, retrying after 503 (a full replica) as a client should."""
    for _ in range(600):
        r = client.post("/api/v1/jobs", json=body)
        if r.status_code != 503:
            return r
        time.sleep(0.1)
    raise AssertionError("the queue stayed full")


def test_native_jobs_run_on_both_replicas_and_any_replica_answers(deployed: httpx.Client) -> None:
    accepted: list[httpx.Response] = []
    seeds: dict[str, int] = {}
    for k in range(6):
        r = _post_job(deployed, {"prompt": f"job {k}", "seed": 100 + k, "steps": 16, **FAST})
        assert r.status_code == 202, r.text
        accepted.append(r)
        seeds[r.json()["id"]] = 100 + k
    seen: dict[str, list[tuple[str, dict[str, Any]]]] = {r.json()["id"]: [] for r in accepted}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # poll every job through the proxy: either replica answers each GET
        for jid, views in seen.items():
            g = deployed.get(f"/api/v1/jobs/{jid}")
            assert g.status_code == 200, g.text
            views.append((g.headers["x-sumie-replica"], g.json()))
        finals = [views[-1][1]["state"] for views in seen.values()]
        if all(s in TERMINAL for s in finals) and all(len({h for h, v in views if v["state"] == "done"}) == 2
                                                      for views in seen.values()):
            break
        time.sleep(0.05)
    replicas = {r.headers["x-sumie-replica"] for r in accepted}
    workers = {views[-1][1]["worker"] for views in seen.values()}
    assert len(workers) == 2 and workers == replicas, (workers, replicas)  # both replicas took and ran jobs
    for r in accepted:  # a job runs in the replica that took its POST
        assert seen[r.json()["id"]][-1][1]["worker"] == r.headers["x-sumie-replica"]
    for jid, views in seen.items():
        done = [(h, v) for h, v in views if v["state"] == "done"]
        assert {h for h, _ in done} == workers, f"{jid}: the finished job was not read through both replicas"
        first = done[0][1]
        assert all(v == first for _, v in done)  # the same record, whichever replica answers
        assert len(first["outputs"]) == 1 and first["info"]["seed"] == seeds[jid]
        image = deployed.get(first["outputs"][0])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    # a running job's progress, answered by the replica that does NOT run it
    remote = [v for views in seen.values() for h, v in views if v["state"] == "running" and h != v["worker"]
              and v["progress"] is not None]
    assert remote and all(0.0 < v["progress"]["progress"] <= 1.0 for v in remote)


def test_a_full_replica_answers_503_with_retry_after(deployed: httpx.Client) -> None:
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def post(k: int) -> None:
        r = deployed.post("/api/v1/jobs", json={"prompt": f"flood {k}", "seed": k, "steps": 500, **FAST})
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=post, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {202, 503} and codes.count(202) <= 2 * MAX_QUEUE, codes
    for r in answers:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) > 0, (r.headers, r.text)
            assert r.headers.get("content-type") == "application/json", (r.headers, r.text)
            assert "queue is full" in r.json()["errors"], (r.headers, r.text)
    for r in answers:  # cancel the accepted jobs through whichever replica answers
        if r.status_code == 202:
            assert deployed.delete(r.json()["url"]).status_code in (200, 409)
    for r in answers:
        if r.status_code == 202:
            deadline = time.monotonic() + 120
            while (state := deployed.get(r.json()["url"]).json()["state"]) not in TERMINAL:
                assert time.monotonic() < deadline, state
                time.sleep(0.1)
            assert state in ("cancelled", "done")


def test_batch_over_ray_actors_then_a_rerun_skips_finished_lines(cluster: Any, tmp_path: Path) -> None:
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out"
    lines = [{"prompt": f"p{k}", "seed": 10 + k, "steps": 4, **FAST} for k in range(4)]
    prompts.write_text("\n".join([json.dumps(b) for b in lines] + ["{oops"]) + "\n")
    log: list[str] = []
    report = run_batch_ray(prompts, ServeConfig(output_dir=out), None, 2, 1.0, "cpu", log=log.append)
    assert report.done == [1, 2, 3, 4] and report.skipped == [] and list(report.failed) == [5], log
    with sqlite3.connect(out / "sumie-jobs.sqlite3") as db:
        workers = [w for (w,) in db.execute("SELECT worker FROM jobs WHERE state='done'")]
    assert len(workers) == 4 and len(set(workers)) == 2  # both actors ran lines
    names = sorted(Path(p).name for n in report.done for p in report.outputs[n])
    assert sorted(n.split("-", 1)[1] for n in names) == ["10.png", "11.png", "12.png", "13.png"]
    assert sorted(int(n[:5]) for n in names) == [0, 1, 2, 3]  # A1111's numbering, no name taken twice
    assert not list(out.rglob("*.tmp"))
    single = run_batch(prompts, ServeConfig(output_dir=tmp_path / "single"), log=lambda _m: None)
    for n in report.done:  # the same pixels as the single-process batch
        with Image.open(report.outputs[n][0]) as a, Image.open(single.outputs[n][0]) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    address = ray.get_runtime_context().gcs_address
    rerun = subprocess.run([sys.executable, "-m", "sumie", "batch", str(prompts), "-o", str(out), "--ray", address,
                            "--replicas", "2", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert rerun.returncode == 1, rerun.stderr  # line 5 still fails
    assert "0 done, 4 skipped (done before), 1 failed" in rerun.stderr, rerun.stderr
    assert len(list(out.rglob("*.png"))) == 4
