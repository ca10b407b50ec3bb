"""ComfyUI prompts on the server's job queue: queueing, running, history, interruption, previews.

One :class:`~sumie.comfy.env.ComfyEnvironment` and one :class:`~sumie.comfy.execution.PromptExecutor` per engine
worker (over that worker's model manager, so a checkpoint loaded for an A1111 job is the one a graph uses). A
prompt is a job of kind ``comfyui`` on the same FIFO as ``/sdapi/v1`` jobs: one job at a time per worker, whichever
API queued it; ``/progress`` shows a running prompt (steps, live preview) and ``/queue`` lists A1111 jobs too.

Folders: ComfyUI's ``output`` is the server's ``--output-dir``; ``input`` is ``--input-dir`` (default
``<output-dir>/../input``); ``temp`` is ``<output-dir>/../temp`` (ComfyUI's side-by-side layout; it is not emptied).

Previews (``--preview-method``, default ``none`` as ComfyUI's): with ``auto`` or ``latent2rgb`` each sampler step's
``progress`` message is followed by a binary frame ``>I 1`` + ``>I 1`` + JPEG (quality 95, fitted in 512 x 512) of
the first image's prediction through Sumie's latent-to-RGB factors (A1111's "Approx cheap"; the VAE for a model
without them). There is no TAESD in the server, so ``auto`` is ``latent2rgb``.

Differences from ComfyUI (``server.py`` / ``main.py`` v0.3.64): the queue is first in, first out, so ``number`` and
``front`` are answered but do not reorder it; ``partial_execution_targets`` is not supported (every valid output
runs); no ``progress_state`` messages and no metadata preview frames (type 4); ``/queue`` also lists A1111 jobs as
``[number, id, {}, {"sumie_job": {"kind": ...}}, []]`` (number given when first listed), which delete / clear leave
alone (their HTTP callers are waiting on them); a ``prompt_id`` that is already a job's id is refused with 409.
"""

from __future__ import annotations

import io
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageOps

from sumie.comfy import ComfyEnvironment, ComfyFolders, PromptExecutor, check_request, history_entry
from sumie.errors import SumieError
from sumie.pipelines.control import JobControl
from sumie.pipelines.vae_io import Previewer, cheap_factors
from sumie.pipelines.worker import JobHandle
from sumie.serve.comfy_ws import PREVIEW_IMAGE, Hub
from sumie.serve.config import PREVIEW_METHODS
from sumie.serve.errors import ApiError
from sumie.serve.jobs import LiveState

if TYPE_CHECKING:
    from sumie.checkpoints.manager import ModelManager
    from sumie.serve.server import Server

__all__ = ["PREVIEW_METHODS", "ComfyService", "QueuedPrompt", "comfy_folders"]

MAXIMUM_HISTORY_SIZE = 10000  # execution.py
PREVIEW_SIZE = 512  # ComfyUI's --preview-size
# Events ComfyUI sends with sid None (to every socket) when the prompt has no client id: the progress hook and
# previews (main.py), and execution_interrupted (execution.py add_message(..., broadcast=True)).
_SENT_WITHOUT_CLIENT = ("progress", "execution_interrupted")
_BROADCAST = ("progress_state",)  # WebUIProgressHandler's send_sync without a sid: every socket


def _number(value: Any) -> float:
    """``POST /prompt``'s ``number`` (the queue position ComfyUI sorts by): a finite number; 400 naming it else."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise ApiError(400, f"number: give a finite number (the queue position), not {value!r:.40}", field="number")
    return number


def _fair_client(client_id: str | None, client: str) -> str:
    """The queue's client of a prompt: ComfyUI's ``client_id`` where given, else the request's client."""
    return f"comfy:{client_id}" if client_id else client


def comfy_folders(output_dir: Path, input_dir: Path | None) -> ComfyFolders:
    """output = ``--output-dir``; input = ``--input-dir`` or ``<output-dir>/../input``; temp beside them."""
    out = Path(os.path.abspath(output_dir))
    return ComfyFolders(out, Path(input_dir) if input_dir is not None else out.parent / "input", out.parent / "temp")


@dataclass
class QueuedPrompt:
    """A queued ComfyUI prompt: ComfyUI's queue item ``[number, prompt_id, prompt, extra_data, outputs]``."""

    number: float | int
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    handle: JobHandle | None = None
    node: str | None = None  # the node executing now

    @property
    def client_id(self) -> str | None:
        """The WebSocket client that queued it."""
        cid = self.extra_data.get("client_id")
        return str(cid) if cid is not None else None

    def item(self) -> list[Any]:
        """The ``/queue`` entry."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]


@dataclass
class ComfyOutcome:
    """What a prompt job returns to the job queue (its records: interrupted or done, files written)."""

    interrupted: bool
    paths: list[Path] = field(default_factory=list)


class ComfyService:
    """ComfyUI's prompt queue, history and WebSocket events on one :class:`~sumie.serve.server.Server`."""

    def __init__(self, server: Server, input_dir: Path | None = None, preview_method: str = "none") -> None:
        if preview_method not in PREVIEW_METHODS:
            raise SumieError(f"unknown preview method {preview_method!r}; use one of: {', '.join(PREVIEW_METHODS)}")
        self.server = server
        self.folders = comfy_folders(server.config.output_dir, input_dir)
        self.preview_method = preview_method
        self.executors = {id(m): PromptExecutor(ComfyEnvironment(self.folders, m)) for m in server.queue.managers}
        self.env = ComfyEnvironment(self.folders, server.queue.managers[0])  # validation, lists, files
        self.hub = Hub(self.remaining)
        self._lock = threading.Lock()
        self._number = 0
        self._prompts: dict[str, QueuedPrompt] = {}  # queued or running
        self._finishing: set[str] = set()  # executed, job not returned yet (not counted as remaining)
        self._foreign_numbers: dict[str, int] = {}  # A1111 jobs: the number they are listed with
        self.history: OrderedDict[str, dict[str, Any]] = OrderedDict()

    # ---------------------------------------------------------------- the queue
    def remaining(self) -> int:
        """ComfyUI's ``queue_remaining``: jobs queued or running (either API)."""
        with self._lock:
            finishing = len(self._finishing)
        return max(0, self.server.queue.depth() - finishing)

    def submit(self, body: Any, client: str = "") -> tuple[int, dict[str, Any]]:
        """``POST /prompt``: (HTTP status, answer); a valid prompt is queued for ``client`` (its ``client_id`` where
        given)."""
        check = check_request(body, self.env)
        if not check.ok:
            return 400, check.body or {}
        extra = body.get("extra_data")
        extra_data = dict(extra) if isinstance(extra, dict) else {}
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        for name in ("client_id", "prompt_id"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise ApiError(400, f"{name}: give a string, not {type(body[name]).__name__}", field=name)
        with self._lock:
            if "number" in body:
                number: float | int = _number(body["number"])
            else:
                number = -self._number if body.get("front") else self._number
                self._number += 1
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        extra_data["create_time"] = int(time.time() * 1000)
        queued = QueuedPrompt(number, prompt_id, check.prompt, extra_data, check.outputs)
        summary = {"prompt_id": prompt_id, "number": number, "client_id": queued.client_id,
                   "nodes": len(check.prompt), "outputs": check.outputs}
        with self._lock:
            self._prompts[prompt_id] = queued
        try:
            queued.handle = self.server.queue.submit("comfyui", summary, lambda m, live: self._run(queued, m, live),
                                                     job_id=prompt_id, client=_fair_client(queued.client_id, client))
        except BaseException as e:
            with self._lock:
                self._prompts.pop(prompt_id, None)
            if isinstance(e, ApiError) and e.status == 409:
                raise ApiError(409, f"prompt_id: a job with id {prompt_id!r} already exists; use another id",
                               field="prompt_id") from None
            raise
        queued.handle.add_done_callback(self._job_done)
        self.hub.broadcast_status()
        return 200, {"prompt_id": prompt_id, "number": number, "node_errors": check.node_errors}

    def _job_done(self, handle: JobHandle) -> None:
        with self._lock:
            self._prompts.pop(handle.id, None)
            was_finishing = handle.id in self._finishing
            self._finishing.discard(handle.id)
        if not was_finishing:  # cancelled while queued (a run already announced its end)
            self.hub.broadcast_status()

    def queue_lists(self) -> dict[str, list[list[Any]]]:
        """``GET /queue``: running and pending items, ComfyUI prompts and A1111 jobs (``[number, id, {}, {sumie_job:
        {kind}}, []]``) in the workers' order."""
        running: list[list[Any]] = []
        pending: list[list[Any]] = []
        seen: set[str] = set()
        for worker in self.server.queue.workers:
            st = worker.status()
            for target, ids in ((running, [st.running] if st.running else []), (pending, st.pending)):
                for jid in ids:
                    entry = self._entry(jid)
                    if entry is not None:
                        target.append(entry)
                        seen.add(jid)
        with self._lock:
            for jid in [j for j in self._foreign_numbers if j not in seen]:
                del self._foreign_numbers[jid]
        return {"queue_running": running, "queue_pending": pending}

    def _entry(self, jid: str) -> list[Any] | None:
        with self._lock:
            queued = self._prompts.get(jid)
            if queued is not None:
                return None if jid in self._finishing else queued.item()
        record = self.server.records.get(jid)
        if record is None:  # a model load or /free: not a job of either API
            return None
        with self._lock:
            if jid not in self._foreign_numbers:
                self._foreign_numbers[jid] = self._number
                self._number += 1
            number = self._foreign_numbers[jid]
        return [number, jid, {}, {"sumie_job": {"kind": record.kind}}, []]

    def delete(self, ids: list[Any]) -> int:
        """``POST /queue {"delete": [...]}``: remove these queued (not running) prompts; returns how many."""
        n = 0
        for jid in ids:
            with self._lock:
                queued = self._prompts.get(str(jid))
            if queued is not None and queued.handle is not None and queued.handle.cancel():
                n += 1
        return n

    def clear(self) -> int:
        """``POST /queue {"clear": true}``: remove every queued prompt (A1111 jobs stay: their callers wait)."""
        with self._lock:
            ids = list(self._prompts)
        return self.delete(ids)

    def interrupt(self, prompt_id: str | None) -> bool:
        """``POST /interrupt``: the running job (either API), or only the prompt ``prompt_id`` if it is running."""
        if prompt_id:
            live = self.server.queue.live.get(prompt_id)
            if live is None or live.control is None:
                return False
            live.control.interrupt()
            return True
        return self.server.queue.interrupt() > 0

    def free(self, unload_models: bool, free_memory: bool) -> None:
        """``POST /free``: in each worker between jobs, drop cached node outputs and / or unload the models."""
        for worker, manager in zip(self.server.queue.workers, self.server.queue.managers, strict=True):
            executor = self.executors[id(manager)]

            def job(m: ModelManager, _control: JobControl, executor: PromptExecutor = executor) -> None:
                if free_memory or unload_models:
                    executor.clear_cache()
                if unload_models:
                    m.unload_all()

            worker.submit(job, job_id=f"sumie-free-{uuid.uuid4().hex}")

    # ---------------------------------------------------------------- history
    def history_items(self, max_items: int | None = None, offset: int = -1) -> dict[str, Any]:
        """ComfyUI's ``get_history`` over every prompt (``offset`` -1 with ``max_items``: the newest ones)."""
        with self._lock:
            keys = list(self.history)
            if offset < 0 and max_items is not None:
                offset = len(keys) - max_items
            out: dict[str, Any] = {}
            for i, k in enumerate(keys):
                if i >= offset:
                    out[k] = self.history[k]
                    if max_items is not None and len(out) >= max_items:
                        break
            return out

    def history_of(self, prompt_id: str) -> dict[str, Any]:
        """``GET /history/{id}``: ``{id: entry}``, or ``{}``."""
        with self._lock:
            entry = self.history.get(prompt_id)
        return {prompt_id: entry} if entry is not None else {}

    def delete_history(self, ids: list[Any] | None, clear: bool) -> None:
        """``POST /history``."""
        with self._lock:
            if clear:
                self.history.clear()
            for jid in ids or []:
                self.history.pop(str(jid), None)

    # ---------------------------------------------------------------- the job (worker thread)
    def _run(self, queued: QueuedPrompt, manager: ModelManager, live: LiveState) -> ComfyOutcome:
        executor = self.executors[id(manager)]
        sid = queued.client_id
        live.textinfo = "ComfyUI prompt"
        self.hub.broadcast_status()  # ComfyUI: PromptQueue.get -> queue_updated
        final: dict[str, Any] = {}
        previewers: dict[int, Previewer] = {}
        frame: list[bytes] = []  # the newest step's preview, sent after that step's progress

        def send(event: str, data: dict[str, Any]) -> None:
            if event == "executing":
                if data.get("node") is None:
                    final.update(data)  # sent after the history entry exists, as main.py does
                    return
                queued.node = str(data["node"])
                live.textinfo = queued.prompt.get(queued.node, {}).get("class_type")
            elif event == "progress":
                live.sampling_step, live.sampling_steps = int(data["value"]), int(data["max"])
            if event in _BROADCAST:
                self.hub.send(event, data, None)
            elif sid is not None or event in _SENT_WITHOUT_CLIENT:
                self.hub.send(event, data, sid)
            if event == "progress" and frame:  # main.py's hook: the progress message, then the step's preview
                self.hub.send_bytes(PREVIEW_IMAGE, frame.pop(), sid)

        def preview(node_id: str, x0: Any, vae: Any) -> None:
            previewer = previewers.get(id(vae))
            if previewer is None:
                method = "cheap" if cheap_factors(vae.config) is not None else "vae"
                previewer = previewers[id(vae)] = Previewer(vae, None, method)  # type: ignore[arg-type]
            live.latent, live.previewer = x0, previewer  # A1111's /progress current_image
            frame.clear()
            if self.preview_method != "none" and (sid is None or self.hub.connected(sid)):
                frame.append(preview_frame(previewer, x0))

        result = executor.execute(queued.prompt, queued.prompt_id, queued.outputs, extra_data=queued.extra_data,
                                  send=send, control=live.control, preview=preview)
        entry = history_entry(queued.number, queued.prompt_id, queued.prompt, queued.extra_data, queued.outputs,
                              result)
        with self._lock:
            self.history[queued.prompt_id] = entry
            while len(self.history) > MAXIMUM_HISTORY_SIZE:
                self.history.popitem(last=False)
            self._finishing.add(queued.prompt_id)
        queued.node = None
        self.hub.broadcast_status()  # ComfyUI: task_done -> queue_updated
        if sid is not None:
            self.hub.send("executing", final or {"node": None, "prompt_id": queued.prompt_id}, sid)
        if result.error is not None:
            raise SumieError(f"ComfyUI prompt failed in node {result.error['node_id']} "
                             f"({result.error['node_type']}): {result.error['exception_message']}")
        paths = [self.folders.folder(i["type"]) / i.get("subfolder", "") / i["filename"]
                 for ui in result.outputs.values() for i in (ui or {}).get("images", []) if i.get("type") == "output"]
        return ComfyOutcome(result.interrupted, paths)

    # ---------------------------------------------------------------- websocket helpers
    def on_connect(self, sid: str) -> None:
        """A reconnecting client whose prompt is running gets the node running now (ComfyUI's reconnect)."""
        with self._lock:
            running = [q for q in self._prompts.values() if q.client_id == sid and q.node is not None]
        for q in running:
            self.hub.send("executing", {"node": q.node}, sid)

    def feature_flags(self) -> dict[str, Any]:
        """The server's answer to a client's ``feature_flags`` (no metadata previews: frames are type 1)."""
        return {"supports_preview_metadata": False, "max_upload_size": self.server.config.limits.max_body_bytes}


def preview_frame(previewer: Previewer, x0: Any) -> bytes:
    """The first image of a step's prediction as ComfyUI's preview payload: ``>I 1`` (JPEG) + JPEG at quality 95,
    fitted in 512 x 512 (``server.py`` ``send_image``)."""
    import torch

    with torch.inference_mode():
        image: Image.Image = previewer(x0[:1])[0]
    image = ImageOps.contain(image.convert("RGB"), (PREVIEW_SIZE, PREVIEW_SIZE))
    buf = io.BytesIO()
    buf.write((1).to_bytes(4, "big"))
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()
