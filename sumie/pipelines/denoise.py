"""The one denoising loop: txt2img, img2img and inpainting differ only in the start latent and the mask (sgm style).

:class:`GuidedModel` is the ``model(x, sigma) -> x0`` every sampler calls; it is AUTOMATIC1111's ``CFGDenoiser``:

* it counts its calls; call k takes each prompt's schedule entry for k (prompt editing, alternation; see
  :mod:`sumie.pipelines.scheduled_conds`);
* classifier-free guidance (Ho & Salimans 2022) and ``AND`` (composable diffusion, Liu et al. 2022) in one batched
  network call per model call through :func:`sumie.sampling.guidance.guided_call`: ``uncond + sum_i w_i * scale *
  (cond_i - uncond)``; the sub-prompts' contexts padded to one length by repeating their last vector (A1111's
  ``stack_conds``); cond and uncond of different lengths share the call through repetition to a common length,
  which attention cannot tell from A1111's two separate calls (``pad_empty``: A1111's "pad prompt/negative prompt",
  empty-prompt chunks instead); at CFG scale 1 a plain prompt skips the uncond pass (negative prompt or not);
* a UNet with a guidance embedding (LCM-distilled, Luo et al. 2023) takes the scale as an input instead: one
  cond-only call with ``guidance`` w = scale - 1 (diffusers' ``LatentConsistencyModelPipeline``); the negative
  prompt is not used and CFG rescale does not apply;
* 9-channel inpainting UNets get ``concat`` = mask + masked-image latent appended to their input
  (:class:`UNetNetwork`); the same tensor goes with cond and uncond, as in A1111;
* A1111's uncond skips, speed options that change the image: "NGMS" (no uncond pass on odd calls once sigma is
  below ``s_min_uncond``) and "Skip Early CFG" (none on the first ``skip_early_cond`` of the planned calls);
* a second stage (the SDXL refiner) takes over, for good, at the first call whose sigma is past the switch point;
  the call counter runs on, as in A1111;
* extensions plug in through :class:`ModelHooks`: wrappers around each model call (which know the call number,
  sigma and which rows are cond and uncond), residuals (ControlNet, T2I-Adapter) and attention hooks carried through
  the UNet (:mod:`sumie.models.hooks`).

Masked denoising (inpainting) wraps the guided model in :class:`sumie.sampling.guidance.MaskedModel`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sumie.errors import ConfigError
from sumie.models.hooks import CallInfo, Residuals, UNetOptions
from sumie.pipelines.scheduled_conds import PromptConds
from sumie.prompts.text_conditioning import pad_conds, stack_contexts
from sumie.sampling.conventions import A1111, Convention, start_latent
from sumie.sampling.denoisers import EpsDenoiser
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.guidance import Denoiser, MaskedModel, RescaleSpace, guided_call
from sumie.sampling.img2img import noise_latent
from sumie.sampling.registry import SamplerSpec
from sumie.sampling.samplers.common import Callback, Model, NoiseSampler

__all__ = ["GuidedModel", "ModelHooks", "ModelWrapper", "ResidualFn", "Stage", "UNetNetwork", "denoise",
           "refiner_switch", "sampler_options"]

# fn(x_in [B, C, h, w], t [B], context [B, L, D], y [B, adm] | None, call) -> residuals of this UNet call, or None
ResidualFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", "CallInfo | None"], "Residuals | None"]
# w(apply, x, sigma, **kwargs) -> x0 around each model call; kwargs["call"] is its CallInfo (ComfyUI's
# model_function_wrapper); ``apply(x, sigma, **kwargs)`` runs the next wrapper or the denoiser.
ModelWrapper = Callable[..., Tensor]


@dataclass
class ModelHooks:
    """What extensions add to the model calls of one request (LoRA patches weights instead: the model patcher)."""

    unet: UNetOptions = field(default_factory=UNetOptions)
    residuals: list[ResidualFn] = field(default_factory=list)
    wrappers: list[ModelWrapper] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Whether nothing is hooked (the plain path)."""
        return self.unet.empty and not self.residuals and not self.wrappers


class UNetNetwork:
    """The network a denoiser wraps: ``unet(cat([x, concat]), t, context, y)`` with the request's hooks.

    ``concat`` (mask + masked-image latent) only for 9-channel UNets; ``call`` (:class:`CallInfo`) reaches the
    attention hooks and residual functions of ``hooks``.
    """

    def __init__(self, unet: Callable[..., Tensor], hooks: ModelHooks | None = None,
                 plain: Callable[..., Tensor] | None = None) -> None:
        self.unet = unet
        self.hooks = hooks
        self.plain = plain or unet  # what runs the calls without hooks (a CompiledUNet when compiling is on)

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None,
                 concat: Tensor | None = None, call: CallInfo | None = None,
                 guidance: Tensor | None = None) -> Tensor:
        """x [B, 4, h, w], t [B], context [B, L, D], y [B, adm], concat [B, 5, h, w], guidance w [B] (LCM UNets)
        -> eps or v [B, 4, h, w]."""
        if concat is not None:
            x = torch.cat([x, concat.to(device=x.device, dtype=x.dtype)], dim=1)
        extra = {} if guidance is None else {"guidance": guidance}
        hooks = self.hooks
        if hooks is None or (hooks.unet.empty and not hooks.residuals):
            return self.plain(x, t, context, y=y, **extra)
        control: Residuals | None = None
        for fn in hooks.residuals:
            r = fn(x, t, context, y, call)
            if r is not None:
                control = r if control is None else control.add(r)
        options = dataclasses.replace(hooks.unet, call=call)
        return self.unet(x, t, context, y=y, control=control, options=options, **extra)


@dataclass
class Stage:
    """One model of a run: its denoiser and conditioning (the refiner is a second stage)."""

    denoiser: EpsDenoiser | Denoiser
    cond: PromptConds
    uncond: PromptConds
    image_cond: Tensor | None = None  # [B, 5, h, w] for 9-channel inpainting UNets
    embedded_guidance: bool = False  # the UNet takes the CFG scale as an input (LCM's guidance embedding)

    def __post_init__(self) -> None:
        if not self.uncond.simple:
            raise ConfigError("the negative prompt cannot use AND")
        if self.embedded_guidance and not self.cond.simple:
            raise ConfigError("AND needs an uncond pass to guide against, and this UNet (LCM-distilled, with a "
                              "guidance embedding) runs none; drop AND or use a UNet without a guidance embedding")


def refiner_switch(schedule: DiscreteSigmas, switch_at: float) -> Callable[[Tensor], bool]:
    """A1111's switch: completed = (999 - nearest training timestep of max(sigma)) / 1000 >= switch_at."""
    table = schedule.sigmas

    def past(sigma: Tensor) -> bool:
        t = int(torch.argmin((table - sigma.max().to(table)).abs()))
        return (999 - t) / 1000 >= switch_at

    return past


@dataclass
class GuidedModel:
    """``model(x, sigma) -> x0`` with guidance, schedules, AND, stages and hooks (see the module docstring).

    ``calls`` counts the model calls so far; ``pass_call`` gives the network each call's :class:`CallInfo` (the
    :class:`UNetNetwork` takes it); ``pad_empty`` [1, 77, D] is the empty prompt's chunk for A1111's "pad
    prompt/negative prompt"; ``cfg_above_one_only``: diffusers' rule that guidance needs a scale above 1 (at 0, say,
    the cond runs alone; A1111 and ComfyUI then return ``uncond + 0 * (cond - uncond)``).
    """

    stages: Sequence[Stage]
    scale: float
    rescale: float = 0.0
    rescale_space: RescaleSpace = "x0"
    switch: Callable[[Tensor], bool] | None = None
    wrappers: Sequence[ModelWrapper] = ()
    pass_call: bool = False
    pad_empty: Tensor | None = None
    cfg_above_one_only: bool = False  # diffusers: a scale <= 1 runs the cond alone (no uncond pass, no CFG)
    calls: int = 0
    stage_index: int = 0
    switched_at: int | None = field(default=None)
    padded: bool = False  # a call padded cond or uncond with empty chunks (A1111 writes "Pad conds: True")
    # A1111's uncond skips (speed options that change the image): NGMS below sigma s_min_uncond on odd calls (every
    # call with s_min_uncond_all), Skip Early CFG while calls / total_calls <= skip_early_cond
    s_min_uncond: float = 0.0
    s_min_uncond_all: bool = False
    skip_early_cond: float = 0.0
    total_calls: int = 0  # A1111's total_steps: the planned model calls of the pass
    uncond_skipped: int = 0  # calls that ran without the uncond pass because of the two options above

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("a guided model needs at least one stage")
        if self.rescale and any(not s.cond.simple for s in self.stages):
            raise ConfigError("CFG rescale does not combine with AND; drop one of them")

    @property
    def stage(self) -> Stage:
        """The stage in use."""
        return self.stages[self.stage_index]

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x [B, 4, h, w] at sigma [B] -> guided x0 [B, 4, h, w]."""
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if self.switch is not None and self.stage_index + 1 < len(self.stages) and self.switch(sigma):
            self.stage_index += 1
            self.switched_at = self.calls
        denoised = self._guided(self.stage, x, sigma, self.calls)
        self.calls += 1
        return denoised

    def _conds(self, stage: Stage, call: int) -> tuple[list[tuple[dict[str, Tensor], float]], dict[str, Tensor]]:
        parts = [(dict(part.at(call)), w) for part, w in stage.cond.parts]
        uncond = dict(stage.uncond.parts[0][0].at(call))
        if len({c["context"].shape[1] for c, _ in parts}) > 1:  # AND parts of different lengths: A1111 stack_conds
            stacked = stack_contexts([c["context"][0] for c, _ in parts])
            for i, (c, _) in enumerate(parts):
                c["context"] = stacked[i : i + 1]
        if (self.pad_empty is not None and not stage.embedded_guidance
                and parts[0][0]["context"].shape[1] != uncond["context"].shape[1]):
            padded, uncond["context"] = pad_conds(torch.cat([c["context"] for c, _ in parts]), uncond["context"],
                                                  self.pad_empty)
            for i, (c, _) in enumerate(parts):
                c["context"] = padded[i : i + 1]
            self.padded = True
        if stage.image_cond is not None:
            for c, _ in parts:
                c["concat"] = stage.image_cond
            uncond["concat"] = stage.image_cond
        return parts, uncond

    def _guided(self, stage: Stage, x: Tensor, sigma: Tensor, call: int) -> Tensor:
        parts, uncond = self._conds(stage, call)
        uncond_or_none: dict[str, Tensor] | None = uncond
        scale = self.scale
        if stage.embedded_guidance:  # diffusers: w = scale - 1 embedded, one cond-only call, no CFG
            parts[0][0]["guidance"] = x.new_full((1,), scale - 1.0, dtype=torch.float32)
            uncond_or_none, scale = None, 1.0
        elif self.cfg_above_one_only and scale <= 1.0 and stage.cond.simple:
            scale = 1.0
        skip = (uncond_or_none is not None and not (stage.cond.simple and scale == 1.0)
                and self.skips_uncond(sigma, call))
        self.uncond_skipped += skip
        extra = None
        if self.pass_call:
            def extra(rows: Tensor) -> dict[str, Any]:
                n = rows.shape[0] // x.shape[0]
                return {"call": CallInfo(call, sigma.repeat(n), rows)}
        denoiser: Denoiser = stage.denoiser
        for wrapper in reversed(self.wrappers):
            denoiser = functools.partial(wrapper, denoiser)
        rescale = self.rescale if uncond_or_none is not None else 0.0
        return guided_call(denoiser, x, sigma, parts, uncond_or_none, scale, rescale, self.rescale_space,
                           repeat_context=True, extra=extra, skip_uncond=skip)

    def skips_uncond(self, sigma: Tensor, call: int) -> bool:
        """A1111's rule: Skip Early CFG first (``call / total_calls <= skip_early_cond``), then NGMS (odd calls, or
        every call with ``s_min_uncond_all``, while ``sigma[0] < s_min_uncond``)."""
        if self.skip_early_cond and self.total_calls and call / self.total_calls <= self.skip_early_cond:
            return True
        return bool((call % 2 or self.s_min_uncond_all) and self.s_min_uncond > 0
                    and float(sigma[0]) < self.s_min_uncond)


def sampler_options(spec: SamplerSpec, eta: float | None = None, s_noise: float | None = None) -> dict[str, Any]:
    """The eta / s_noise options to pass to the sampler (None keeps its default, A1111's); an s_noise the sampler
    would ignore is left out. Whether the sampler takes them at all is checked by
    :func:`sumie.pipelines.validation.check_sampler`."""
    from sumie.pipelines.validation import uses_s_noise

    out: dict[str, Any] = {}
    if eta is not None:
        out["eta"] = float(eta)
    if s_noise is not None and uses_s_noise(spec, eta):
        out["s_noise"] = float(s_noise)
    return out


def denoise(
    model: Model,
    sigmas: Tensor,
    spec: SamplerSpec,
    noise: Tensor,
    *,
    init_latent: Tensor | None = None,
    noise_sampler: NoiseSampler | None = None,
    convention: Convention = A1111,
    callback: Callback | None = None,
    options: dict[str, Any] | None = None,
    final_blend: bool = True,
) -> Tensor:
    """One sampling run -> latent [B, 4, h, w].

    txt2img (``init_latent`` None) starts at ``noise * sigmas[0]`` (or the convention's VP scale); img2img and
    inpainting at ``init_latent + noise * sigmas[0]``. Fewer than two sigmas (diffusers' strength 0) returns the
    init latent unchanged. When ``model`` is a :class:`~sumie.sampling.guidance.MaskedModel` the result's kept region
    is set to the original latent (A1111's ``samples * nmask + init_latent * mask``) unless ``final_blend`` is False.
    """
    if sigmas.ndim != 1:
        raise ConfigError("sigmas must be one-dimensional [steps + 1]")
    if init_latent is not None and init_latent.shape != noise.shape:
        raise ConfigError(f"init latent {tuple(init_latent.shape)} and noise {tuple(noise.shape)} differ in shape")
    if sigmas.shape[0] < 2:
        if init_latent is None:
            raise ConfigError("txt2img needs at least one step")
        return init_latent
    sigmas = sigmas.to(device=noise.device, dtype=noise.dtype)
    if init_latent is None:
        x = start_latent(noise, sigmas, convention)
    else:
        x = noise_latent(init_latent, noise, sigmas[0])
    out = spec(model, x, sigmas, callback=callback, noise_sampler=noise_sampler, **(options or {}))
    if final_blend and isinstance(model, MaskedModel):
        out = model.final(out)
    return out

