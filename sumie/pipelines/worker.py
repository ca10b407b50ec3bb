"""One worker thread per device: a queue of jobs run one at a time, each with its own :class:`JobControl`.

A job is any callable ``job(resource, control) -> result``: ``resource`` is what the worker was given (a
:class:`~sumie.checkpoints.manager.ModelManager`, or what a factory built in the worker's thread, e.g. an engine) and
``control`` the job's interrupt / skip flags, to hand to ``Engine.generate(..., control=control)``. The worker knows
nothing of the generation API, so the CLI, a server or a test can queue anything.

::

    with Worker(manager, "cuda:0") as worker:
        handle = worker.submit(lambda manager, control: make_images(manager, request, control))
        handle.interrupt()        # running: stop at the next step; pending: removed from the queue
        images = handle.result()  # the job's return value, or its exception raised here
"""

from __future__ import annotations

import threading
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sumie.checkpoints.manager import ModelManager
from sumie.errors import ConfigError, SumieError
from sumie.pipelines.control import JobControl

__all__ = ["Job", "JobHandle", "JobState", "Worker", "WorkerStatus"]

Job = Callable[[Any, JobControl], Any]
JobState = Literal["pending", "running", "done", "failed", "cancelled"]


class JobHandle:
    """A submitted job: its id, its :class:`JobControl`, its state and (once finished) its result or exception."""

    def __init__(self, job_id: str, job: Job, worker: Worker) -> None:
        self.id = job_id
        self.job = job
        self.control = JobControl()
        self._future: Future[Any] = Future()
        self._worker = worker

    @property
    def state(self) -> JobState:
        """pending, running, done, failed (the job raised) or cancelled."""
        f = self._future
        if f.cancelled():
            return "cancelled"
        if f.done():
            return "failed" if f.exception() is not None else "done"
        return "running" if f.running() else "pending"

    def cancel(self) -> bool:
        """Remove a job that has not started from the queue; False if it is running or finished."""
        return self._worker._cancel(self)

    def interrupt(self) -> bool:
        """Running: ``control.interrupt()`` (the job stops at its next step); pending: cancel. False if finished."""
        if self.cancel():
            return True
        if self._future.done():
            return False
        self.control.interrupt()
        return True

    def done(self) -> bool:
        """Whether the job finished, failed or was cancelled."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> Any:
        """The job's return value (waits); raises the job's exception, CancelledError or TimeoutError."""
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The job's exception, or None if it returned (waits)."""
        return self._future.exception(timeout)

    def add_done_callback(self, fn: Callable[[JobHandle], object]) -> None:
        """Call ``fn(handle)`` when the job finishes (at once if it has); runs in the worker thread."""
        self._future.add_done_callback(lambda _f: fn(self))

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r}, {self.state})"


@dataclass(frozen=True)
class WorkerStatus:
    """A snapshot of a worker's queue."""

    device: str
    running: str | None
    pending: tuple[str, ...]
    closed: bool


class Worker(AbstractContextManager["Worker"]):
    """A thread that runs submitted jobs one after another on one device.

    ``resource``: a :class:`ModelManager` handed to every job as it is, or a factory ``() -> object`` called once in
    the worker's thread before the first job (an engine built there, on the device); if the factory raises, that
    job fails and the next one calls it again. ``device``: jobs run with it as torch's current CUDA device (a
    label otherwise). An exception in a job goes to its handle; the worker goes on with the next job.
    """

    def __init__(self, resource: ModelManager | Callable[[], object], device: str | torch.device = "cpu",
                 *, name: str | None = None) -> None:
        if not isinstance(resource, ModelManager) and not callable(resource):
            raise ConfigError("Worker needs a ModelManager or a factory function that builds the jobs' resource")
        self.device = torch.device(device)
        self._factory = None if isinstance(resource, ModelManager) else resource
        self._resource: object = resource if isinstance(resource, ModelManager) else None
        self._queue: deque[JobHandle] = deque()
        self._ids: set[str] = set()
        self._running: JobHandle | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=name or f"sumie-worker-{self.device}", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the queue
    def submit(self, job: Job, *, job_id: str | None = None) -> JobHandle:
        """Queue ``job(resource, control)``; returns its handle at once. ``job_id``: unique among queued jobs."""
        if not callable(job):
            raise ConfigError("a job must be a callable job(resource, control)")
        with self._cond:
            if self._closed:
                raise SumieError("the worker is closed; start a new one")
            jid = job_id if job_id is not None else uuid.uuid4().hex
            if jid in self._ids:
                raise ConfigError(f"job id {jid!r} is already queued or running; use another id")
            handle = JobHandle(jid, job, self)
            self._ids.add(jid)
            self._queue.insert(self._place(handle), handle)
            self._cond.notify_all()
        return handle

    def _place(self, handle: JobHandle) -> int:
        """Where a new job goes in the pending queue (called under the lock): last, FIFO. Subclasses order it."""
        return len(self._queue)

    def _cancel(self, handle: JobHandle) -> bool:
        with self._cond:
            if handle not in self._queue:
                return False
            self._queue.remove(handle)
            self._ids.discard(handle.id)
            handle._future.cancel()
            self._cond.notify_all()
            return True

    def status(self) -> WorkerStatus:
        """The running job's id and the pending ids in queue order."""
        with self._cond:
            running = self._running.id if self._running is not None else None
            return WorkerStatus(str(self.device), running, tuple(h.id for h in self._queue), self._closed)

    @property
    def running(self) -> str | None:
        """The id of the job running now, or None."""
        return self.status().running

    @property
    def pending(self) -> list[str]:
        """The ids of the queued jobs, next first."""
        return list(self.status().pending)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job is queued or running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._running is None, timeout)

    # ---------------------------------------------------------------- the thread
    def _device_context(self) -> AbstractContextManager[Any]:
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return  # closed and drained
                handle = self._queue.popleft()
                self._running = handle
                started = handle._future.set_running_or_notify_cancel()
            try:
                if started:
                    self._run(handle)
            finally:
                with self._cond:
                    self._running = None
                    self._ids.discard(handle.id)
                    self._cond.notify_all()

    def _run(self, handle: JobHandle) -> None:
        try:
            with self._device_context():
                if self._resource is None and self._factory is not None:
                    self._resource = self._factory()
                result = handle.job(self._resource, handle.control)
        except BaseException as e:  # noqa: BLE001 - the job's failure is the caller's to see, not the worker's
            handle._future.set_exception(e)
        else:
            handle._future.set_result(result)

    # ---------------------------------------------------------------- shutting down
    def close(self, *, cancel_pending: bool = False, interrupt: bool = False, timeout: float | None = None) -> bool:
        """Accept no more jobs; run the queued ones (or cancel them) and stop the thread; False on timeout.

        ``interrupt``: also interrupt the running job (it returns what it made so far).
        """
        with self._cond:
            self._closed = True
            if cancel_pending:
                while self._queue:
                    handle = self._queue.popleft()
                    self._ids.discard(handle.id)
                    handle._future.cancel()
            if interrupt and self._running is not None:
                self._running.control.interrupt()
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def __exit__(self, *exc: object) -> None:
        self.close(cancel_pending=exc[0] is not None, interrupt=exc[0] is not None)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

