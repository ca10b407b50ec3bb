"""The one denoising loop: txt2img, img2img and inpainting differ only in the start latent and the mask (sgm style).

:class:`GuidedModel` is the ``model(x, sigma) -> x0`` every sampler calls; it is AUTOMATIC1111's ``CFGDenoiser``:

* it counts its calls; call k takes each prompt's schedule entry for k (prompt editing, alternation; see
  :mod:`sumie.pipelines.scheduled_conds`);
* classifier-free guidance (Ho & Salimans 2022) through :func:`sumie.sampling.guidance.cfg_model` for plain prompts;
  ``AND`` (composable diffusion, Liu et al. 2022) as A1111's ``combine_denoised``: ``uncond + sum_i w_i * scale *
  (cond_i - uncond)``, the sub-prompts' contexts padded to one length by repeating their last vector
  (``stack_conds``); cond and uncond of different lengths go through the network in two calls (A1111 without
  "pad prompt/negative prompt"); at CFG scale 1 a plain prompt skips the uncond pass;
* masked denoising (inpainting): the prediction's kept region is replaced by the original latent after every call
  (A1111's k-diffusion blend); ``blend_input`` also re-noises the kept region of the input first (ComfyUI's
  ``KSamplerX0Inpaint``, equivalent to diffusers' per-step blend for one-call-per-step samplers);
* 9-channel inpainting UNets get ``concat`` = mask + masked-image latent appended to their input
  (:class:`UNetNetwork`); the same tensor goes with cond and uncond, as in A1111;
* a second stage (the SDXL refiner) takes over, for good, at the first call whose sigma is past the switch point;
  the call counter runs on, as in A1111.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sumie.errors import ConfigError
from sumie.pipelines.scheduled_conds import PromptConds
from sumie.prompts.text_conditioning import stack_contexts
from sumie.sampling.conventions import A1111, Convention, start_latent
from sumie.sampling.denoisers import EpsDenoiser
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.guidance import RescaleSpace, cfg_model, rescale_cfg
from sumie.sampling.registry import SamplerSpec
from sumie.sampling.samplers.common import Callback, NoiseSampler, bcast

__all__ = ["GuidedModel", "Stage", "UNetNetwork", "denoise", "refiner_switch", "sampler_options"]


class UNetNetwork:
    """The network a denoiser wraps: ``unet(cat([x, concat]), t, context, y)`` (concat only for 9-channel UNets)."""

    def __init__(self, unet: Callable[..., Tensor]) -> None:
        self.unet = unet

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None,
                 concat: Tensor | None = None) -> Tensor:
        """x [B, 4, h, w], t [B], context [B, L, D], y [B, adm], concat [B, 5, h, w] -> eps or v [B, 4, h, w]."""
        if concat is not None:
            x = torch.cat([x, concat.to(device=x.device, dtype=x.dtype)], dim=1)
        return self.unet(x, t, context, y=y)


@dataclass
class Stage:
    """One model of a run: its denoiser and conditioning (the refiner is a second stage)."""

    denoiser: EpsDenoiser
    cond: PromptConds
    uncond: PromptConds
    image_cond: Tensor | None = None  # [B, 5, h, w] for 9-channel inpainting UNets

    def __post_init__(self) -> None:
        if not self.uncond.simple:
            raise ConfigError("the negative prompt cannot use AND")


def refiner_switch(schedule: DiscreteSigmas, switch_at: float) -> Callable[[Tensor], bool]:
    """A1111's switch: completed = (999 - nearest training timestep of max(sigma)) / 1000 >= switch_at."""
    table = schedule.sigmas

    def past(sigma: Tensor) -> bool:
        t = int(torch.argmin((table - sigma.max().to(table)).abs()))
        return (999 - t) / 1000 >= switch_at

    return past


@dataclass
class GuidedModel:
    """``model(x, sigma) -> x0`` with guidance, schedules, AND, masks and stages (see the module docstring).

    ``mask`` is 1 where the image is generated ([B or 1, 1, h, w]); ``init_latent`` the original latent there;
    ``noise`` the unit start noise (only for ``blend_input``). ``calls`` counts the model calls so far.
    """

    stages: Sequence[Stage]
    scale: float
    rescale: float = 0.0
    rescale_space: RescaleSpace = "x0"
    switch: Callable[[Tensor], bool] | None = None
    mask: Tensor | None = None
    init_latent: Tensor | None = None
    noise: Tensor | None = None
    blend_input: bool = False
    blend_from_call: int = 0  # diffusers blends after each step: a run from pure noise skips the first call
    calls: int = 0
    stage_index: int = 0
    switched_at: int | None = field(default=None)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("a guided model needs at least one stage")
        if self.rescale and any(not s.cond.simple for s in self.stages):
            raise ConfigError("CFG rescale does not combine with AND; drop one of them")
        if self.mask is not None and self.init_latent is None:
            raise ConfigError("a mask needs the original (init) latent")
        if self.blend_input and self.noise is None:
            raise ConfigError("blend_input needs the start noise")

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
        if self.mask is not None and self.blend_input and self.calls >= self.blend_from_call:
            keep = 1 - self.mask.to(x.dtype)
            x = x * (1 - keep) + (self.init_latent + self.noise * bcast(sigma, x)) * keep
        denoised = self._guided(self.stage, x, sigma, self.calls)
        if self.mask is not None:
            mask = self.mask.to(denoised.dtype)
            denoised = self.init_latent * (1 - mask) + mask * denoised
        self.calls += 1
        return denoised

    def _guided(self, stage: Stage, x: Tensor, sigma: Tensor, call: int) -> Tensor:
        b = x.shape[0]
        extra = {} if stage.image_cond is None else {"concat": stage.image_cond}
        parts = [(part.at(call), w) for part, w in stage.cond.parts]
        uncond = stage.uncond.parts[0][0].at(call)
        skip_uncond = stage.cond.simple and self.scale == 1.0
        if stage.cond.simple and (skip_uncond or parts[0][0]["context"].shape[1] == uncond["context"].shape[1]):
            guided = cfg_model(stage.denoiser, {**parts[0][0], **extra}, {**uncond, **extra}, self.scale,
                               self.rescale, self.rescale_space)
            return guided(x, sigma)
        n = len(parts)
        cond_rows = _stack_parts([c for c, _ in parts], b)  # [n * B, ...], part-major
        uncond_rows = _rows(uncond, b)
        if stage.image_cond is not None:
            cond_rows["concat"] = stage.image_cond.repeat(n, 1, 1, 1)
            uncond_rows["concat"] = stage.image_cond
        x_c, s_c = x.repeat(n, 1, 1, 1), sigma.repeat(n)
        if cond_rows["context"].shape[1] == uncond_rows["context"].shape[1]:
            out = stage.denoiser(torch.cat([x_c, x]), torch.cat([s_c, sigma]), **_cat(cond_rows, uncond_rows))
            cond_out, uncond_out = out[: n * b], out[n * b :]
        else:
            cond_out = stage.denoiser(x_c, s_c, **cond_rows)
            uncond_out = stage.denoiser(x, sigma, **uncond_rows)
        if self.rescale:  # plain prompt (checked at construction), contexts of different lengths
            return rescale_cfg(x, sigma, cond_out, uncond_out, self.scale, self.rescale, self.rescale_space)
        denoised = uncond_out.clone()
        for i, (_, w) in enumerate(parts):
            denoised += (cond_out[i * b : (i + 1) * b] - uncond_out) * (w * self.scale)
        return denoised


def _rows(cond: dict[str, Tensor], b: int) -> dict[str, Tensor]:
    return {k: v.expand(b, *v.shape[1:]) for k, v in cond.items()}


def _stack_parts(conds: list[dict[str, Tensor]], b: int) -> dict[str, Tensor]:
    """AND parts -> rows [n * B, ...]: contexts padded to one length by repeating the last vector (A1111)."""
    contexts = stack_contexts([c["context"][0] for c in conds])  # [n, L, D]
    out = {"context": contexts.repeat_interleave(b, dim=0)}
    if "y" in conds[0]:
        out["y"] = torch.cat([c["y"] for c in conds]).repeat_interleave(b, dim=0)
    return out


def _cat(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.cat([a[k], b[k].to(a[k])]) for k in a}


def sampler_options(spec: SamplerSpec, eta: float | None = None, s_noise: float | None = None) -> dict[str, Any]:
    """The eta / s_noise options a sampler accepts, when set (None keeps the sampler's default, A1111's)."""
    params = inspect.signature(spec.function).parameters
    out: dict[str, Any] = {}
    if eta is not None:
        if "eta" not in params:
            raise ConfigError(f"sampler {spec.name!r} has no eta; leave eta unset")
        out["eta"] = float(eta)
    if s_noise is not None:
        if "s_noise" not in params:
            raise ConfigError(f"sampler {spec.name!r} has no s_noise; leave s_noise unset")
        out["s_noise"] = float(s_noise)
    return out


def denoise(
    model: GuidedModel,
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
    init latent unchanged. With a mask in ``model`` the result's kept region is set to the original latent
    (A1111's ``samples * nmask + init_latent * mask``) unless ``final_blend`` is False.
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
        x = init_latent + noise * sigmas[0]
    out = spec(model, x, sigmas, callback=callback, noise_sampler=noise_sampler, **(options or {}))
    if final_blend and model.mask is not None and model.init_latent is not None:
        mask = model.mask.to(out.dtype)
        out = out * mask + model.init_latent * (1 - mask)
    return out

