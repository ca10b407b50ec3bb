"""Sumie's native API: jobs with ids, their progress as Server-Sent Events, and their outputs by URL.

* ``POST /api/v1/jobs``: a txt2img / img2img request body (A1111's fields) plus ``"task"``; checked like the A1111
  routes (422 naming the field, 503 when the queue is full) and answered 202 at once with the job's id and URLs. A
  native job always saves its images (``save_images`` is implied; no base64 in the answer) under ``--output-dir``.
* ``GET /api/v1/jobs/{id}``: state (queued, running, done, interrupted, failed, cancelled), progress while it runs,
  error, output URLs, A1111's ``info`` and the process that ran it (``worker``). Any job in the records answers,
  A1111 ones too (``force_task_id``), whichever process (Ray replica) runs it.
* ``DELETE /api/v1/jobs/{id}``: a queued job is removed, a running one stops at its next step and saves nothing;
  both end ``cancelled``.
* ``GET /api/v1/jobs/{id}/events``: ``text/event-stream``: ``state`` (queued / running), one ``progress`` per sampler
  step (``?previews=true``: with a live preview PNG), then ``done`` with the job as ``GET`` shows it, whatever the
  final state. A client that connects late gets the steps so far replayed first (kept for the last 256 jobs). A job
  that another process runs (``sumie serve --ray``'s replicas share the records) streams the progress that process
  writes to the records (every ``progress_write_s``: ``step``, ``steps``, ``batch``, ``batches``, ``progress``).
* ``GET /api/v1/outputs/{path}``: an image file inside the output folder (no other file, nothing outside it).
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
import os
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from sumie.pipelines.control import ProgressEvent
from sumie.serve.errors import ApiError
from sumie.serve.jobs import client_of
from sumie.serve.models import Img2ImgRequest, Txt2ImgRequest
from sumie.serve.server import Server

__all__ = ["JobRequest", "JobView", "NativeJobs", "router"]

TERMINAL = ("done", "interrupted", "failed", "cancelled")
_KEEP = 256  # finished jobs whose events and info stay in memory


class JobRequest(Img2ImgRequest, Txt2ImgRequest):
    """``POST /api/v1/jobs``: ``task`` plus the fields of A1111's txt2img or img2img request."""

    model_config = ConfigDict(extra="ignore")
    task: Literal["txt2img", "img2img"] = "txt2img"


class JobProgress(BaseModel):
    """Where a running job is (A1111's formula for ``progress`` / ``eta_relative``)."""

    model_config = ConfigDict(extra="ignore")

    progress: float
    eta_relative: float
    batch: int
    batches: int
    step: int
    steps: int


class JobView(BaseModel):
    """A job as ``GET /api/v1/jobs/{id}`` shows it."""

    id: str
    task: str
    state: str
    created: float
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    progress: JobProgress | None = None
    outputs: list[str]
    info: dict[str, Any] | None = None
    worker: str | None = None  # the process that ran it (HOST:PID): one of the replicas under Ray
    url: str
    events: str


class NativeJobs:
    """The native jobs of one server: their progress events and results while in memory (see the module doc)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._lock = threading.Lock()
        self._events: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    async def create(self, body: JobRequest, client: str = "") -> JobView:
        """Plan and queue a job for ``client``; its view (state queued)."""
        fields = body.model_dump(exclude_unset=True, exclude={"task"})
        req = (Txt2ImgRequest if body.task == "txt2img" else Img2ImgRequest).model_validate(fields)
        plan = await self.server.plan(body.task, req)
        plan.save, plan.send_images = True, False
        events: list[dict[str, Any]] = []

        def listener(ev: ProgressEvent) -> None:
            with self._lock:
                events.append({"pass": ev.pass_name, "batch": ev.batch, "batches": ev.batches, "step": ev.step,
                               "steps": ev.steps, "done": ev.done, "total": ev.total, "fraction": ev.fraction,
                               "eta": ev.eta})

        handle = self.server.submit(plan, req.force_task_id, listener, client)
        with self._lock:
            self._events[handle.id] = events
            self._trim(self._events)
        return self.view(handle.id)

    @staticmethod
    def _trim(d: OrderedDict[str, Any]) -> None:
        while len(d) > _KEEP:
            d.popitem(last=False)

    def events_of(self, job_id: str) -> list[dict[str, Any]]:
        """The progress events recorded so far (a copy)."""
        with self._lock:
            return list(self._events.get(job_id, ()))

    def view(self, job_id: str) -> JobView:
        """The job's record, progress, outputs and info; 404 for an unknown id."""
        rec = self.server.records.get(job_id)
        if rec is None:
            raise ApiError(404, f"no job with id {job_id!r}", field="id")
        progress = None
        live = self.server.queue.live.get(job_id)
        if live is not None and rec.state == "running":
            p, eta = live.progress()
            progress = JobProgress(progress=p, eta_relative=eta, batch=live.job_no, batches=live.job_count,
                                   step=live.sampling_step, steps=live.sampling_steps)
        elif rec.progress is not None and rec.state == "running":  # another process runs it (shared store)
            progress = JobProgress.model_validate(rec.progress)
        base = f"/api/v1/jobs/{quote(job_id)}"
        return JobView(id=rec.id, task=rec.kind, state=rec.state, created=rec.created, started=rec.started,
                       finished=rec.finished, error=rec.error, progress=progress,
                       outputs=[u for u in (self.output_url(p) for p in rec.outputs) if u is not None],
                       info=rec.info, worker=rec.worker, url=base, events=f"{base}/events")

    def output_url(self, path: str) -> str | None:
        """The URL of an output file (None if it is not inside the output folder)."""
        root = os.path.realpath(self.server.config.output_dir)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            return None
        return "/api/v1/outputs/" + quote(Path(os.path.relpath(real, root)).as_posix())

    def output_file(self, rel: str) -> Response:
        """The image file at ``rel`` inside the output folder (read through the job store, which may sit on another
        machine); 404 for anything else (other files, paths out)."""
        data = self.server.outputs.read(rel)
        if data is None:
            raise ApiError(404, f"no output file {rel!r}", field="path")
        return Response(content=data, media_type=mimetypes.guess_type(rel)[0] or "application/octet-stream")

    async def stream(self, job_id: str, previews: bool) -> AsyncIterator[str]:
        """The job's Server-Sent Events (see the module docstring)."""
        sent, last_state, idle = 0, None, 0.0
        shared: list[dict[str, Any]] = []
        while True:
            rec = self.server.records.get(job_id)
            if rec is None:
                return
            events = self.events_of(job_id)  # read after the record: a finished job's events are all here
            if not events and rec.progress is not None:  # another process runs it: its progress as it last wrote it
                if shared[-1:] != [rec.progress]:
                    shared.append(rec.progress)
                events = shared
            fresh = events[sent:]
            sent = len(events)
            if rec.state != last_state and rec.state not in TERMINAL:
                last_state = rec.state
                yield _sse("state", {"id": job_id, "state": rec.state})
            for k, ev in enumerate(fresh):
                data = {"id": job_id, **ev}
                live = self.server.queue.live.get(job_id)
                if previews and k == len(fresh) - 1 and live is not None:
                    data["current_image"] = await run_in_threadpool(self.server.preview, live)
                yield _sse("progress", data)
            if rec.state in TERMINAL:
                yield _sse("done", self.view(job_id).model_dump())
                return
            if fresh:
                idle = 0.0
            elif idle >= 15.0:
                yield ": keep-alive\n\n"
                idle = 0.0
            await asyncio.sleep(0.05)
            idle += 0.05


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


# ------------------------------------------------------------------------------------------------ routes

router = APIRouter()


def _jobs(request: Request) -> NativeJobs:
    return request.app.state.sumie_jobs


@router.post("/jobs", status_code=202, response_model=JobView)
async def create_job(body: JobRequest, request: Request) -> JobView:
    """Queue a txt2img / img2img job (``task``); answered at once with its id, state and URLs."""
    return await _jobs(request).create(body, client_of(request))


@router.get("/jobs/{job_id}", response_model=JobView)
def get_job(job_id: str, request: Request) -> JobView:
    """A job's state, progress, error, output URLs and info."""
    return _jobs(request).view(job_id)


@router.delete("/jobs/{job_id}", response_model=JobView)
def cancel_job(job_id: str, request: Request) -> JobView:
    """Cancel a queued job, or stop a running one (nothing saved); 409 when it has already ended."""
    jobs = _jobs(request)
    view = jobs.view(job_id)
    if view.state in TERMINAL or not jobs.server.queue.cancel(job_id):
        raise ApiError(409, f"job {job_id!r} has already ended ({jobs.view(job_id).state})", field="id")
    return jobs.view(job_id)


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "state, progress (one per step) and done events"}})
def job_events(job_id: str, request: Request, previews: bool = False) -> StreamingResponse:
    """The job's progress as Server-Sent Events, ending with ``done``."""
    jobs = _jobs(request)
    jobs.view(job_id)  # 404 before the stream starts
    return StreamingResponse(jobs.stream(job_id, previews), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/outputs/{path:path}", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "an output image"}})
def output(path: str, request: Request) -> Response:
    """An output image by the URL a job gives (only files inside the output folder)."""
    return _jobs(request).output_file(path)
