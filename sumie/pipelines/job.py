"""One request while it runs: its resolved settings, hooks, progress events, cancellation, NaN checks and warnings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from sumie.errors import NaNError
from sumie.pipelines.control import JobControl, PassName, ProgressEvent
from sumie.pipelines.convention import PipelineConvention
from sumie.pipelines.denoise import ModelHooks
from sumie.pipelines.params import GenerationParams
from sumie.pipelines.scheduled_conds import PromptConds
from sumie.pipelines.vae_tiling import VAETiling
from sumie.sampling.conventions import Convention
from sumie.sampling.registry import SamplerSpec
from sumie.sampling.samplers.common import Callback

__all__ = ["Job", "Progress", "ProgressFn", "SigmasFn", "StopBatch"]

ProgressFn = Callable[[ProgressEvent], None]
SigmasFn = Callable[[int], Tensor]


class StopBatch(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised from the sampler callback when the job was interrupted or the batch skipped (caught by the pass)."""


class Progress:
    """Counts sampler steps over a request: tqdm bar, :class:`ProgressEvent` s, previews, interrupt/skip, NaN checks.

    ``previewer(latent) -> images`` turns the current prediction into pictures every ``preview_every`` steps
    (0 = never); ``last`` holds the newest prediction of the running pass (what an interrupted pass returns).
    """

    def __init__(self, total: int, batches: int, listener: ProgressFn | None, control: JobControl,
                 previewer: Callable[[Tensor], list[Image.Image]] | None = None, preview_every: int = 0,
                 show: bool | None = None) -> None:
        self.total, self.done, self.batches = total, 0, batches
        self.listener, self.control, self.previewer = listener, control, previewer
        self.preview_every = max(int(preview_every), 0)
        self.start = time.monotonic()
        self.last: Tensor | None = None
        # the running pass: its sampler steps and how many have finished (callbacks so far), for hooks that act
        # on a step range (ControlNet start / end)
        self.pass_steps, self.pass_done = 0, 0
        self.bar = None
        if show is not False:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", disable=None if show is None else not show, leave=False)

    def callback(self, steps: int, pass_name: PassName, batch: int,
                 stage: Callable[[], PassName] | None = None) -> Callback:
        """A sampler callback for a pass of ``steps`` steps (``stage()`` names the pass when a refiner took over)."""
        start, seen = self.done, [0]
        self.last = None
        self.pass_steps, self.pass_done = steps, 0

        def cb(d: dict[str, Any]) -> None:
            denoised = d["denoised"]
            i = min(int(d["i"]) + 1, steps)
            if not bool(torch.isfinite(denoised).all()):
                raise NaNError(f"the UNet produced NaN or infinite values at step {i} of {steps} ({pass_name} pass): "
                               "half precision overflowed or the model is broken; run the UNet in float32 "
                               "(--dtype fp32) or bfloat16, or lower the CFG scale")
            self.last = denoised
            self.pass_done = max(self.pass_done, int(d["i"]) + 1)
            if i > seen[0]:
                if self.bar is not None:
                    self.bar.update(i - seen[0])
                seen[0] = i
                self.done = start + i
                self._emit(stage() if stage is not None else pass_name, batch, i, steps, denoised)
            if self.control.stop_batch:
                raise StopBatch

        return cb

    def _emit(self, pass_name: PassName, batch: int, step: int, steps: int, denoised: Tensor) -> None:
        if self.listener is None:
            return
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        preview = None
        if self.previewer is not None and self.preview_every and (step % self.preview_every == 0 or step == steps):
            preview = self.previewer(denoised)
        self.listener(ProgressEvent(pass_name, batch, self.batches, step, steps, self.done, self.total, elapsed, eta,
                                    preview, denoised))

    def finish_pass(self, start: int, steps: int) -> None:
        """Account a pass that ran fewer callbacks than planned (strength 0, an interrupt)."""
        if self.done < start + steps:
            if self.bar is not None:
                self.bar.update(start + steps - self.done)
            self.done = start + steps

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


@dataclass
class Job:
    """Per-request state shared by the passes of every batch."""

    params: GenerationParams  # resolved: seed, size, CFG scale
    spec: SamplerSpec
    schedule: str
    convention: PipelineConvention
    sampling: Convention  # start-noise scale and network timesteps
    width: int
    height: int
    batch_size: int
    sigmas_fn: SigmasFn | None
    options: dict[str, Any]  # sampler options (eta, s_noise)
    hooks: ModelHooks
    control: JobControl
    progress: Progress | None = None
    conds: dict[tuple[Any, ...], tuple[PromptConds, PromptConds]] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)  # infotext fields the run adds
    # tags a handler applied that the prompt does not hold (LoRAs of params.loras): appended to the prompt in the
    # infotext, as A1111 appends its "sd_lora" tag
    infotext_tags: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    decode_vae: Any = None
    batch: int = 0
    vae_tiling: VAETiling = field(default_factory=VAETiling)  # when the VAE runs in tiles (big images)

    def warn(self, message: str) -> None:
        """Collect a warning for the result (each message once)."""
        if message not in self.warnings:
            self.warnings.append(message)
