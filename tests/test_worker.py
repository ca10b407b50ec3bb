"""The per-device worker: jobs in order one at a time, cancel before start, interrupt of the running job through its
JobControl, failures kept in the handle, clean shutdown. Jobs here are small functions (no model)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
from torch import nn

from sumie.checkpoints.manager import LoadRequest, ModelManager
from sumie.errors import ConfigError, SumieError
from sumie.pipelines.control import JobControl
from sumie.pipelines.worker import Worker

WAIT = 10.0  # seconds a test waits for something that should take milliseconds


def blocker(started: threading.Event, release: threading.Event, out: str = "blocked"):  # noqa: ANN201
    def job(resource: object, control: JobControl) -> str:
        started.set()
        assert release.wait(WAIT)
        return out

    return job


def test_jobs_run_in_order_one_at_a_time() -> None:
    manager = ModelManager()
    log: list[tuple[str, str]] = []
    busy = [0]

    def job(tag: str):  # noqa: ANN202
        def run(resource: object, control: JobControl) -> str:
            assert resource is manager
            busy[0] += 1
            assert busy[0] == 1  # never two at once
            log.append((tag, threading.current_thread().name))
            time.sleep(0.01)
            busy[0] -= 1
            return tag.upper()

        return run

    with Worker(manager, "cpu", name="w0") as worker:
        handles = [worker.submit(job(t)) for t in "abcde"]
        assert [h.result(WAIT) for h in handles] == list("ABCDE")
    assert [t for t, _ in log] == list("abcde") and {n for _, n in log} == {"w0"}
    assert all(h.state == "done" for h in handles) and worker.closed


def test_cancel_before_start_removes_the_job() -> None:
    started, release = threading.Event(), threading.Event()
    ran: list[str] = []
    with Worker(ModelManager()) as worker:
        first = worker.submit(blocker(started, release), job_id="j1")
        rest = [worker.submit(lambda r, c, i=i: ran.append(f"j{i}"), job_id=f"j{i}") for i in (2, 3, 4)]
        assert started.wait(WAIT)
        status = worker.status()
        assert (status.running, status.pending) == ("j1", ("j2", "j3", "j4"))
        assert rest[1].cancel() and rest[1].state == "cancelled"
        assert worker.pending == ["j2", "j4"] and not rest[1].cancel()
        assert not first.cancel()  # running: cancel does not apply (interrupt does)
        release.set()
        assert first.result(WAIT) == "blocked" and worker.wait_idle(WAIT)
        with pytest.raises(CancelledError):
            rest[1].result(0)
    assert ran == ["j2", "j4"] and not first.cancel()


def test_interrupt_reaches_the_running_jobs_control() -> None:
    seen: list[JobControl] = []

    def steps(started: threading.Event):  # noqa: ANN202
        def run(resource: object, control: JobControl) -> int:
            seen.append(control)
            started.set()
            n = 0
            deadline = time.monotonic() + WAIT
            while not control.interrupted and time.monotonic() < deadline:  # a sampler checking at every step
                n += 1
                time.sleep(0.001)
            return n

        return run

    first, second = threading.Event(), threading.Event()
    with Worker(ModelManager()) as worker:
        running = worker.submit(steps(first))
        queued = worker.submit(steps(second))
        assert first.wait(WAIT)
        assert running.interrupt() and running.result(WAIT) > 0 and running.control.interrupted
        assert seen[0] is running.control
        assert second.wait(WAIT) and not queued.control.interrupted  # the next job has its own control
        assert queued.interrupt() and queued.result(WAIT) >= 0
        assert not running.interrupt()  # finished: nothing to do
    assert seen[1] is queued.control and seen[1] is not seen[0]


def test_a_failing_job_goes_to_its_handle_and_the_worker_goes_on() -> None:
    def fails(resource: object, control: JobControl) -> None:
        raise ValueError("bad request")

    with Worker(ModelManager()) as worker:
        bad = worker.submit(fails)
        good = worker.submit(lambda r, c: 42)
        assert good.result(WAIT) == 42
        assert isinstance(bad.exception(WAIT), ValueError) and bad.state == "failed"
        with pytest.raises(ValueError, match="bad request"):
            bad.result()
        assert worker._thread.is_alive()


def test_factory_runs_once_in_the_worker_thread_and_retries_after_a_failure() -> None:
    calls: list[str] = []

    def factory() -> object:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return {"engine": len(calls)}

    with Worker(factory, name="gpu0") as worker:
        first = worker.submit(lambda r, c: r)
        assert isinstance(first.exception(WAIT), RuntimeError)
        assert worker.submit(lambda r, c: r).result(WAIT) == {"engine": 2}
        assert worker.submit(lambda r, c: r).result(WAIT) == {"engine": 2}
    assert calls == ["gpu0", "gpu0"]


def test_model_switches_go_through_one_thread(tmp_path: Path) -> None:
    manager = ModelManager(max_models=1)
    loads: list[tuple[str, str]] = []

    def loader(req: LoadRequest) -> nn.Module:
        loads.append((req.path.name, threading.current_thread().name))
        return nn.Linear(2, 2)

    manager.register_loader("lora", loader)
    files = [tmp_path / f"{n}.safetensors" for n in "ab"]
    for f in files:
        f.write_bytes(b"x")
    with Worker(manager, name="w") as worker:
        handles = [worker.submit(lambda m, c, f=f: m.get("lora", f)) for f in (files[0], files[1], files[0])]
        models = [h.result(WAIT) for h in handles]
    assert loads == [("a.safetensors", "w"), ("b.safetensors", "w"), ("a.safetensors", "w")]
    assert models[0] is not models[2]  # a was evicted by b (max_models=1) and loaded again


def test_close_and_bad_use() -> None:
    with pytest.raises(ConfigError, match="ModelManager or a factory"):
        Worker(object())  # type: ignore[arg-type]
    started, release = threading.Event(), threading.Event()
    worker = Worker(ModelManager())
    with pytest.raises(ConfigError, match="callable"):
        worker.submit("not a job")  # type: ignore[arg-type]

    def wait_for_interrupt(resource: object, control: JobControl) -> str:
        started.set()
        deadline = time.monotonic() + WAIT
        while not control.interrupted and time.monotonic() < deadline:
            time.sleep(0.001)
        return "stopped" if control.interrupted else "timed out"

    running = worker.submit(wait_for_interrupt, job_id="x")
    with pytest.raises(ConfigError, match="already queued or running"):
        worker.submit(lambda r, c: None, job_id="x")
    queued = worker.submit(blocker(threading.Event(), release))
    assert started.wait(WAIT)
    assert worker.close(cancel_pending=True, interrupt=True, timeout=WAIT)
    assert running.result(0) == "stopped" and queued.state == "cancelled"
    assert worker.status().closed and worker.status().pending == () and worker.running is None
    with pytest.raises(SumieError, match="closed"):
        worker.submit(lambda r, c: None)
    drained = Worker(ModelManager())
    later = [drained.submit(lambda r, c, i=i: i) for i in range(3)]
    assert drained.close(timeout=WAIT) and [h.result(0) for h in later] == [0, 1, 2]  # close runs what was queued
