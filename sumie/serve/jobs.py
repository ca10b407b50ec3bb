"""The job queue: bounded, round-robin between clients (FIFO within one), in front of one engine
:class:`~sumie.pipelines.worker.Worker` per device.

HTTP handlers submit a job and ``await`` it; the sampling runs in the worker's thread, so the event loop keeps
answering (``/progress``, ``/interrupt``) while a job runs. A full queue (overall, or one client's share with
``max_queue_per_client``) is refused with 503 and Retry-After, never dropped. A client is the auth user, else the
remote address (ComfyUI's ``client_id`` where given): a new job goes ahead of every job of a client with more jobs
ahead of it, so one client's batch of jobs cannot hold the others back. Each job gets a :class:`LiveState`
(A1111's ``shared.state``: job number, sampling step, the newest prediction for a live preview) while it runs, and
a row in the SQLite job records from queued to finished.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sumie.checkpoints.hashes import FileHashes
from sumie.checkpoints.manager import ModelManager
from sumie.checkpoints.precision import Precision
from sumie.errors import ConfigError
from sumie.pipelines.control import JobControl, ProgressEvent
from sumie.pipelines.engine import Engine
from sumie.pipelines.worker import JobHandle, Worker
from sumie.prompts.embeddings import EmbeddingLibrary
from sumie.serve.catalog import ServeFolders
from sumie.serve.config import ServeConfig
from sumie.serve.errors import ApiError
from sumie.serve.store import JobRecords

__all__ = ["FairWorker", "JobCancelled", "JobQueue", "LiveState", "client_of"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class JobCancelled(ApiError):
    """A running job cancelled (``DELETE /api/v1/jobs/{id}``): it ends without saving anything."""

    def __init__(self) -> None:
        super().__init__(409, "the job was cancelled")


def client_of(request: Any) -> str:
    """Who a request comes from, for fairness: ``user:NAME`` (HTTP Basic), ``token:<sha256 prefix>`` (bearer), else
    ``addr:HOST`` (the remote address; the credentials are checked by the auth dependency, not here)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic" and value:
        try:
            return "user:" + base64.b64decode(value, validate=True).decode().partition(":")[0]
        except (ValueError, UnicodeDecodeError):
            pass
    if scheme.lower() == "bearer" and value:
        return "token:" + hashlib.sha256(value.encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client is not None else "unknown")


class FairWorker(Worker):
    """A :class:`Worker` whose queue is round-robin between clients and FIFO within one client."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clients: dict[str, str] = {}  # job id -> client, while queued or running

    def submit_for(self, client: str, job: Any, *, job_id: str) -> JobHandle:
        """Queue ``job`` for ``client``: after the jobs of its round, before those of later rounds."""
        with self._cond:
            if job_id in self.clients:
                raise ConfigError(f"job id {job_id!r} is already queued or running; use another id")
            self.clients[job_id] = client
            try:
                handle = self.submit(job, job_id=job_id)
            except BaseException:
                self.clients.pop(job_id, None)
                raise
        handle.add_done_callback(lambda h: self.clients.pop(h.id, None))
        return handle

    def _place(self, handle: JobHandle) -> int:
        """The new job's round-robin place: before the first queued job of a later round than its own."""
        client = self.clients.get(handle.id)
        if client is None:  # a plain submit: last
            return len(self._queue)
        ahead: dict[str, int] = {}
        if self._running is not None and self._running.id in self.clients:
            ahead[self.clients[self._running.id]] = 1
        mine = ahead.get(client, 0) + sum(self.clients.get(h.id) == client for h in self._queue)
        for i, h in enumerate(self._queue):
            other = self.clients.get(h.id, "")
            rank = ahead.get(other, 0)
            ahead[other] = rank + 1
            if rank > mine:  # the first job of a later round than the new one's
                return i
        return len(self._queue)


@dataclass
class LiveState:
    """What ``/progress`` reports of a running job (A1111 ``shared.state``)."""

    job_id: str
    kind: str
    job_count: int = 1
    started: float = field(default_factory=time.time)
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    textinfo: str | None = None
    latent: Tensor | None = None  # the newest prediction x0 [B, C, h, w]
    previewer: Callable[[Tensor], list[Any]] | None = None
    control: JobControl | None = None
    cancelled: bool = False  # DELETE /api/v1/jobs/{id}: stop and save nothing
    listeners: list[Callable[[ProgressEvent], None]] = field(default_factory=list)

    @property
    def timestamp(self) -> str:
        """A1111's job_timestamp."""
        return time.strftime("%Y%m%d%H%M%S", time.localtime(self.started))

    def on_progress(self, ev: ProgressEvent) -> None:
        """The engine's progress callback (worker thread)."""
        self.job_no, self.job_count = ev.batch, ev.batches
        self.sampling_step, self.sampling_steps = ev.step, ev.steps
        self.latent = ev.denoised
        self.textinfo = None
        for listener in self.listeners:
            listener(ev)

    def progress(self) -> tuple[float, float]:
        """(progress, eta_relative) by A1111's formula."""
        p = 0.01
        if self.job_count > 0:
            p += self.job_no / self.job_count
            if self.sampling_steps > 0:
                p += self.sampling_step / self.sampling_steps / self.job_count
        elapsed = time.time() - self.started
        return min(p, 1.0), elapsed / p - elapsed


class JobQueue:
    """Workers (one per configured device), their model managers, the queue bound and the live job states."""

    def __init__(self, config: ServeConfig, folders: ServeFolders, hashes: FileHashes, records: JobRecords) -> None:
        self.config, self.folders, self.records = config, folders, records
        precision = Precision.of(_DTYPES[config.dtype])
        self.managers = [ModelManager(folders, device=d, dtype=precision, max_models=2, hashes=hashes)
                         for d in config.devices]
        for manager in self.managers:
            manager.set_weight_packing(config.weight_packing)
        self.workers = [FairWorker(m, d, name=f"sumie-serve-{d}") for m, d in zip(self.managers, config.devices,
                                                                              strict=True)]
        self.embeddings_dirs = folders.dirs("embedding")
        self.embeddings_dir: Path | None = self.embeddings_dirs[0] if self.embeddings_dirs else None
        self._lock = threading.Lock()
        self._handles: dict[str, JobHandle] = {}
        self._clients: dict[str, str] = {}  # job id -> client, while queued or running
        self._cancelled: set[str] = set()
        self._recorded: set[str] = set()  # jobs that ran: each wrote its end to the records itself
        self.live: dict[str, LiveState] = {}
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.finished = 0
        self._last: Engine | None = None
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"  # who ran a job, in its record

    # ---------------------------------------------------------------- engines (worker thread)
    def engine(self, manager: ModelManager, checkpoint: Path, vae: Path | None) -> Engine:
        """The engine of a checkpoint (+ VAE), cached with the model in the device's manager."""
        def build(models: Any) -> Engine:
            library = None
            if self.embeddings_dirs:  # every configured folder, in order (the engine alone reads one)
                library = EmbeddingLibrary(models.config)
                for folder in self.embeddings_dirs:
                    library.load_folder(folder)
            engine = Engine(models, embeddings=library, embeddings_dir=self.embeddings_dir, manager=manager)
            engine.show_progress = False
            return engine

        self._last = manager.derived("checkpoint", checkpoint, ("sumie.serve engine", str(self.embeddings_dir)), build,
                               vae=str(vae) if vae is not None else None)
        return self._last

    def last_embeddings(self) -> EmbeddingLibrary | None:
        """The embeddings of the engine used last (None before the first load)."""
        return self._last.embeddings if self._last is not None else None

    def preload(self, checkpoint: Path, vae: Path | None) -> None:
        """Load the default checkpoint on every device in the background; :attr:`ready` is set when all are."""
        handles = [w.submit(lambda m, c: self.engine(m, checkpoint, vae)) for w in self.workers]

        def done(_h: JobHandle) -> None:
            if all(h.done() for h in handles):
                errors = [str(h.exception()) for h in handles if h.state == "failed"]
                if any(h.state == "cancelled" for h in handles):
                    errors.append("the server stopped before the model was loaded")
                self.load_error = errors[0] if errors else None
                self.ready.set()

        for h in handles:
            h.add_done_callback(done)

    # ---------------------------------------------------------------- the queue
    def depth(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return len(self._handles)

    def submit(self, kind: str, summary: dict[str, Any], fn: Callable[[ModelManager, LiveState], Any],
               job_id: str | None = None, client: str = "") -> JobHandle:
        """Queue ``fn(manager, live)`` for ``client`` on the least busy worker; 503 with Retry-After when the queue
        (or the client's share of it) is full."""
        retry = {"Retry-After": str(self.config.retry_after_s)}
        jid = job_id or uuid.uuid4().hex
        limits = self.config.limits
        with self._lock:
            if len(self._handles) >= limits.max_queue:
                raise ApiError(503, f"the queue is full ({limits.max_queue} jobs queued or running); "
                                    "retry later", headers=retry)
            if limits.max_queue_per_client and sum(c == client for c in self._clients.values()) \
                    >= limits.max_queue_per_client:
                raise ApiError(503, f"this client has {limits.max_queue_per_client} jobs queued or running, the "
                                    "most one client may have (--max-queue-per-client); retry later", headers=retry)
            if jid in self._handles or self.records.exists(jid):
                raise ApiError(409, f"force_task_id: a job with id {jid!r} already exists; use another id",
                               field="force_task_id")
            worker = min(self.workers, key=lambda w: len(w.status().pending) + (w.status().running is not None))
            self.records.add(jid, kind, summary, self.worker_id)

            def run(manager: ModelManager, control: JobControl) -> Any:
                live = LiveState(jid, kind, control=control, textinfo="starting")
                with self._lock:
                    live.cancelled = jid in self._cancelled
                self.records.start(jid, self.worker_id)
                if self.config.shared:
                    self._share_progress(live)
                with self._lock:
                    self.live[jid] = live
                result, error = None, None
                try:
                    result = fn(manager, live)
                    return result
                except BaseException as e:
                    error = e
                    raise
                finally:
                    with self._lock:
                        self.live.pop(jid, None)
                        self._recorded.add(jid)
                    # the record ends before the handle does: a client woken by the handle reads the end
                    self._record_end(jid, result, error)

            handle = worker.submit_for(client, run, job_id=jid)
            self._handles[jid] = handle
            self._clients[jid] = client
        handle.add_done_callback(self._finished)
        return handle

    def _share_progress(self, live: LiveState) -> None:
        """Write ``live``'s progress to the records (at most every ``progress_write_s``, and its last step), so any
        process answers for it; stop it there when another process asked to cancel it."""
        last = [0.0]

        def write(ev: ProgressEvent | None) -> None:
            now = time.monotonic()
            final = ev is not None and ev.done >= ev.total
            if ev is not None and not final and now - last[0] < self.config.progress_write_s:
                return
            last[0] = now
            p, eta = live.progress()
            cancel = self.records.set_progress(live.job_id, {
                "progress": p, "eta_relative": eta, "batch": live.job_no, "batches": live.job_count,
                "step": live.sampling_step, "steps": live.sampling_steps, "job_timestamp": live.timestamp,
                "textinfo": live.textinfo})
            if cancel and not live.cancelled:
                live.cancelled = True
                if live.control is not None:
                    live.control.interrupt()

        write(None)  # at the start: a cancel asked while it was queued
        live.listeners.append(write)

    def _record_end(self, jid: str, result: Any, error: BaseException | None) -> None:
        """Write how job ``jid`` ended (its result, or the exception it raised) to the records."""
        if isinstance(error, JobCancelled):
            self.records.finish(jid, "cancelled", error="cancelled by the client")
        elif error is not None:
            self.records.finish(jid, "failed", error=str(error))
        else:
            info = getattr(result, "info", None)
            self.records.finish(jid, "interrupted" if getattr(result, "interrupted", False) else "done",
                                outputs=[str(p) for p in getattr(result, "paths", [])],
                                info=json.loads(info) if isinstance(info, str) else None)

    def _finished(self, handle: JobHandle) -> None:
        with self._lock:
            self._handles.pop(handle.id, None)
            self._clients.pop(handle.id, None)
            self._cancelled.discard(handle.id)
            self.finished += 1
            ran = handle.id in self._recorded
            self._recorded.discard(handle.id)
        if not ran:  # cancelled while queued (or the worker refused it): the job never wrote its end
            error = handle.exception() if handle.state == "failed" else None
            self._record_end(handle.id, None, error if error is not None else JobCancelled())

    @staticmethod
    async def wait(handle: JobHandle) -> Any:
        """The job's result, awaited without blocking the event loop (its exception is raised here)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def wake(_h: JobHandle) -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

        handle.add_done_callback(wake)
        await fut
        return handle.result()

    def running(self) -> LiveState | None:
        """The live state of the oldest running job, or None when idle."""
        with self._lock:
            states = sorted(self.live.values(), key=lambda s: s.started)
        return states[0] if states else None

    def handle(self, job_id: str) -> JobHandle | None:
        """The handle of a queued or running job, or None."""
        with self._lock:
            return self._handles.get(job_id)

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job, or stop a running one at its next step without saving; False when not active.
        With ``shared``, a job of another process is asked through the records (it stops within
        ``progress_write_s`` of a step, or when it would start)."""
        with self._lock:
            handle, live = self._handles.get(job_id), self.live.get(job_id)
            if handle is None:
                return self.config.shared and self.records.request_cancel(job_id)
            self._cancelled.add(job_id)
        if handle.cancel():
            return True
        if live is not None:
            live.cancelled = True
        handle.control.interrupt()
        return True

    def interrupt(self) -> int:
        """Interrupt every running job (A1111's /interrupt: queued jobs stay); returns how many."""
        with self._lock:
            states = list(self.live.values())
        for s in states:
            if s.control is not None:
                s.control.interrupt()
        return len(states)

    def skip(self) -> int:
        """Skip the current batch of every running job."""
        with self._lock:
            states = list(self.live.values())
        for s in states:
            if s.control is not None:
                s.control.skip()
        return len(states)

    def close(self) -> None:
        """Cancel queued jobs, interrupt running ones, stop the workers."""
        for w in self.workers:
            w.close(cancel_pending=True, interrupt=True, timeout=30)
