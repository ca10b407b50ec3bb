"""One server's state: folders, options, the job queue, outputs and records, and how a generation runs.

:class:`Server` is what :func:`sumie.serve.app.create_app` builds and the routes use (``request.app.state.sumie``);
nothing here is module-level, so two apps in one process share nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from starlette.concurrency import run_in_threadpool

from sumie.checkpoints.hashes import FileHashes
from sumie.checkpoints.manager import ModelManager
from sumie.errors import CheckpointError, ConfigError, NaNError, SumieError
from sumie.pipelines.control import ProgressEvent
from sumie.pipelines.images import ImageError
from sumie.pipelines.vae_io import Previewer
from sumie.pipelines.worker import JobHandle
from sumie.serve.catalog import Catalog, ServeFolders
from sumie.serve.comfy_service import ComfyService
from sumie.serve.config import ServeConfig
from sumie.serve.decode import encode_png
from sumie.serve.errors import ApiError
from sumie.serve.jobs import JobCancelled, JobQueue, LiveState
from sumie.serve.mapping import Plan, build_info, build_plan
from sumie.serve.models import GenerationResponse, Img2ImgRequest, Txt2ImgRequest
from sumie.serve.options import Options
from sumie.serve.store import JobRecord, JobRecords, OutputStore, recover_dead

__all__ = ["Outcome", "Server"]


@dataclass
class Outcome:
    """What a generation job hands back to its HTTP handler."""

    images: list[str]
    info: str
    interrupted: bool
    paths: list[Path] = field(default_factory=list)


class Server:
    """Everything one app holds (see the module docstring)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.folders = ServeFolders(config)
        self.hashes = FileHashes()
        self.catalog = Catalog(self.folders, self.hashes)
        self.options = Options()
        if config.store_actor is not None:  # the replicas of ``sumie serve --ray``, on any node of the cluster
            from sumie.serve.store_actor import connect_store

            self.outputs, self.records = connect_store(config.store_actor)
        else:
            self.outputs, self.records = OutputStore(config.output_dir), JobRecords(config.database)
        # writes a killed process left half done, jobs it left unfinished (a shared store: done once, before; here
        # only the jobs of this host's processes that died, e.g. a replica Ray replaces)
        self.cleaned = [] if config.shared else self.outputs.clean_temp()
        self.queue = JobQueue(config, self.folders, self.hashes, self.records)
        self.recovered = recover_dead(self.records, self.queue.worker_id.rpartition(":")[0]) if config.shared \
            else self.records.recover()
        self.comfy = ComfyService(self, config.input_dir, config.preview_method)  # ComfyUI's API (comfy_routes)
        default = self.catalog.checkpoints()[0]
        self.options.update({"sd_model_checkpoint": self.catalog.title(default)})
        if config.preload:
            self.queue.preload(default.path, None)
        else:
            self.queue.ready.set()

    def close(self) -> None:
        """Stop the workers and close the records."""
        self.queue.close()
        self.records.close()

    # ---------------------------------------------------------------- readiness
    def require_ready(self) -> None:
        """503 with Retry-After while the first model loads. A failed load does not block: each job loads its
        model again and answers the error, and another checkpoint can be chosen through /options."""
        if not self.queue.ready.is_set():
            raise ApiError(503, "the model is still loading; retry shortly",
                           headers={"Retry-After": str(self.config.retry_after_s)})

    # ---------------------------------------------------------------- options
    def current_options(self) -> dict[str, Any]:
        """The options as GET /options shows them (the checkpoint's title with its hash once known)."""
        opts = self.options.snapshot()
        try:
            f = self.catalog.checkpoint(opts["sd_model_checkpoint"], "sd_model_checkpoint")
        except ApiError:
            return opts
        opts["sd_model_checkpoint"] = self.catalog.title(f)
        opts["sd_checkpoint_hash"] = (self.hashes.cached(f.path) or "") if f.path.is_file() else ""
        return opts

    async def set_options(self, values: dict[str, Any]) -> None:
        """POST /options: check everything first, load a newly named checkpoint (4xx listing close matches)."""
        checked = self.options.checked(values)
        load = None
        if "sd_model_checkpoint" in checked:
            f = self.catalog.checkpoint(checked["sd_model_checkpoint"], "sd_model_checkpoint")
            checked["sd_model_checkpoint"] = f.name
            load = f
        vae_name = checked.get("sd_vae", self.options["sd_vae"])
        vae = self.catalog.vae(vae_name, "sd_vae")
        if load is not None or "sd_vae" in checked:
            self.require_ready()
            target = load or self.catalog.checkpoint(self.options["sd_model_checkpoint"], "sd_model_checkpoint")
            handles = [w.submit(lambda m, c: self.queue.engine(m, target.path, vae)) for w in self.queue.workers]
            for h in handles:
                await self._await(h)
        self.options.update(checked)

    # ---------------------------------------------------------------- generation
    async def generate(self, kind: str, req: Txt2ImgRequest | Img2ImgRequest, client: str = "") -> GenerationResponse:
        """txt2img / img2img: plan (422s), queue for ``client`` (503 when full), run in the worker, answer A1111's
        response."""
        plan = await self.plan(kind, req)
        handle = self.submit(plan, req.force_task_id, client=client)
        outcome: Outcome = await self._await(handle)
        return GenerationResponse(images=outcome.images, parameters=plan.parameters, info=outcome.info)

    async def plan(self, kind: str, req: Txt2ImgRequest | Img2ImgRequest) -> Plan:
        """A request checked and resolved (503 while loading, 422s naming fields); applies lasting overrides."""
        self.require_ready()
        opts = self.options.merged(req.override_settings)
        plan = await run_in_threadpool(build_plan, kind, req, self.catalog, opts, self.config.limits)
        if req.override_settings and req.override_settings_restore_afterwards is False:
            self.options.update(self.options.checked(req.override_settings))
        return plan

    def submit(self, plan: Plan, job_id: str | None = None,
               listener: Callable[[ProgressEvent], None] | None = None, client: str = "") -> JobHandle:
        """Queue a planned job for ``client`` (503 when full); ``listener`` gets its progress events (worker
        thread)."""
        summary = {k: v for k, v in plan.parameters.items() if k not in ("init_images", "mask", "latent_mask")}

        def run(manager: ModelManager, live: LiveState) -> Outcome:
            if listener is not None:
                live.listeners.append(listener)
            return self._run(plan, manager, live)

        return self.queue.submit(plan.kind, summary, run, job_id=job_id, client=client)

    async def _await(self, handle: JobHandle) -> Any:
        try:
            return await self.queue.wait(handle)
        except ApiError:
            raise
        except ImageError as e:
            raise ApiError(422, str(e)) from None
        except ConfigError as e:
            raise ApiError(422, str(e)) from None
        except (CheckpointError, NaNError) as e:  # the server's model files or numerics, not the request
            raise ApiError(500, str(e)) from None
        except SumieError as e:
            raise ApiError(400, str(e)) from None

    def _run(self, plan: Plan, manager: ModelManager, live: LiveState) -> Outcome:
        """The job (worker thread): load or reuse the engine, generate, save, encode."""
        p = plan.params
        live.job_count, live.textinfo = p.n_iter, "loading model"
        engine = self.queue.engine(manager, plan.checkpoint.path, plan.vae)
        if plan.options.get("live_previews_enable", True):
            live.previewer = Previewer(engine.models.vae, engine.taesd)
        live.textinfo = None
        result = engine.generate(p, progress=live.on_progress, control=live.control)
        if live.cancelled:
            raise JobCancelled()
        warnings = list(plan.warnings) + [w for w in result.warnings if w not in plan.warnings]
        pnginfo = bool(plan.options.get("enable_pnginfo", True))
        paths: list[Path] = []
        if plan.save:
            fmt, quality = str(plan.options.get("samples_format", "png")), int(plan.options.get("jpeg_quality", 80))
            for image, seed, text in zip(result.images, result.seeds, result.infotexts, strict=True):
                paths.append(self.outputs.save(plan.kind, image, seed, text if pnginfo else None, fmt=fmt,
                                               quality=quality, when=plan.created))
        info = build_info(plan, result, model_name=engine.base.name, model_hash=engine.models.hash,
                          vae_name=plan.vae.name if plan.vae else None, warnings=warnings)
        images = [encode_png(im, text if pnginfo else None) for im, text in zip(result.images, result.infotexts,
                                                                                strict=True)] \
            if plan.send_images else []
        return Outcome(images, info, result.interrupted, paths)

    # ---------------------------------------------------------------- progress
    @staticmethod
    def preview(live: LiveState) -> str | None:
        """The running job's newest prediction as a base64 PNG (a strip of the batch), or None."""
        latent, previewer = live.latent, live.previewer
        if latent is None or previewer is None:
            return None
        with torch.inference_mode():
            images = previewer(latent)
        return encode_png(_strip(images))

    def progress(self, skip_current_image: bool) -> dict[str, Any]:
        """GET /progress: A1111's formula; the live preview (a strip of the batch) unless skipped."""
        live = self.queue.running()
        if live is None and self.config.shared:
            rec = self.records.running()  # another process's job, as it last wrote it
            if rec is not None and rec.progress is not None:
                return _shared_progress(rec)
        if live is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": _state(None), "current_image": None,
                    "textinfo": None}
        progress, eta = live.progress()
        current = None if skip_current_image else self.preview(live)
        return {"progress": progress, "eta_relative": eta, "state": _state(live), "current_image": current,
                "textinfo": live.textinfo}


def _state(live: LiveState | None) -> dict[str, Any]:
    """A1111's ``shared.state.dict()``."""
    if live is None:
        return {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
                "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    control = live.control
    return {"skipped": bool(control and control.skipped), "interrupted": bool(control and control.interrupted),
            "stopping_generation": False, "job": live.kind, "job_count": live.job_count,
            "job_timestamp": live.timestamp, "job_no": live.job_no, "sampling_step": live.sampling_step,
            "sampling_steps": live.sampling_steps}


def _shared_progress(rec: JobRecord) -> dict[str, Any]:
    """GET /progress of a job another process runs, from its record (no preview: the latent is there)."""
    p = rec.progress or {}
    state = {**_state(None), "job": rec.kind, "job_count": p.get("batches", 1), "job_no": p.get("batch", 0),
             "job_timestamp": p.get("job_timestamp", "0"), "sampling_step": p.get("step", 0),
             "sampling_steps": p.get("steps", 0)}
    return {"progress": p.get("progress", 0.0), "eta_relative": p.get("eta_relative", 0.0), "state": state,
            "current_image": None, "textinfo": p.get("textinfo")}


def _strip(images: list[Image.Image]) -> Image.Image:
    if len(images) == 1:
        return images[0]
    w, h = images[0].size
    out = Image.new("RGB", (w * len(images), h))
    for k, im in enumerate(images):
        out.paste(im.convert("RGB"), (k * w, 0))
    return out

