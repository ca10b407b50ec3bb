"""Guidance: wrap a conditional denoiser into the ``model(x, sigma) -> x0`` that samplers call (sgm's "guider").

* :func:`cfg_model` - classifier-free guidance (Ho & Salimans 2022), ``x0 = uncond + scale * (cond - uncond)``,
  with cond and uncond in one batched network call (uncond rows first, as diffusers orders them), and optional
  CFG rescale (Lin et al. 2023, sec. 3.4).
* :func:`masked_model` - masked denoising (inpainting with a normal model), ComfyUI's ``KSamplerX0Inpaint``.
* :func:`step_schedule` - conditioning that changes during sampling (prompt editing ``[a:b:0.5]``, ControlNet step
  ranges): a cond may be a fixed dict or a callable ``cond_at(sigma) -> dict``; this builds the callable from
  ``(until_fraction, cond)`` segments.

CFG rescale, three references and how they relate. Each computes ``cfg = u + s (c - u)`` and replaces it by
``r * cfg * std(c) / std(cfg) + (1 - r) * cfg`` (std per sample over all non-batch elements, unbiased), but in a
different space T(x0) = a x + b x0 (a, b per-sample scalars of sigma):

* ComfyUI ``RescaleCFG`` (``rescale_space="v"``, the default): on the v-prediction (Salimans & Ho 2022) derived
  from x0, ``v = (x / (sigma^2 + 1) - x0) sqrt(sigma^2 + 1) / sigma`` - whatever the model predicts. This is also
  diffusers' ``rescale_noise_cfg`` for v-prediction models (it rescales the raw model output) and the paper's.
* diffusers for eps-prediction models (``rescale_space="eps"``): on ``eps = (x - x0) / sigma``.
* A1111's CFG-rescale extension on its k-diffusion samplers (``rescale_space="x0"``): on the denoised x0 itself.

CFG itself is the same in every space (it is affine with weights summing to one); only the std ratio differs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from sumie.errors import ConfigError
from sumie.sampling.samplers.common import Model, bcast

# Keyword arguments of the denoiser: tensors [B, ...] (or [1, ...], broadcast to B), or lists/tuples of them;
# anything else (a module, a flag) is passed through unchanged and must be the same (or equal) in both.
Cond = Mapping[str, Any]
# Conditioning that depends on the noise level: cond_at(sigma [B]) -> Cond.
CondFn = Callable[[Tensor], Cond]
Conditioning = Cond | CondFn
# denoiser(x [B, ...], sigma [B], **cond) -> x0 [B, ...], e.g. sumie.sampling.denoisers.EpsDenoiser.
Denoiser = Callable[..., Tensor]
RescaleSpace = Literal["v", "eps", "x0"]


def _resolve(cond: Conditioning, sigma: Tensor) -> Cond:
    return cond(sigma) if callable(cond) else cond


def _batch_value(key: str, v: Any, b: int) -> Any:
    if isinstance(v, Tensor):
        if v.ndim == 0 or v.shape[0] not in (1, b):
            raise ConfigError(f"cond {key!r} has batch {tuple(v.shape)[:1]} but x has batch {b}; give {b} or 1 rows")
        return v.expand(b, *v.shape[1:]) if v.shape[0] != b else v
    if isinstance(v, list | tuple):
        return type(v)(_batch_value(key, t, b) for t in v)
    return v


def _concat(key: str, u: Any, c: Any) -> Any:
    if isinstance(u, Tensor) and isinstance(c, Tensor):
        if u.shape[1:] != c.shape[1:]:
            raise ConfigError(f"cond and uncond {key!r} shapes differ ({tuple(c.shape)} vs {tuple(u.shape)}); "
                              "pad the shorter prompt to the same number of 77-token chunks")
        return torch.cat([u, c])
    if isinstance(u, list | tuple) and isinstance(c, list | tuple) and len(u) == len(c):
        return type(c)(_concat(key, a, b) for a, b in zip(u, c, strict=True))
    try:
        same = u is c or bool(u == c)
    except (TypeError, ValueError, RuntimeError):
        same = False
    if not same:
        raise ConfigError(f"cond and uncond {key!r} differ and are not tensors; they cannot be batched together")
    return c


def batch_conds(uncond: Cond, cond: Cond, b: int) -> dict[str, Any]:
    """The denoiser kwargs of one batched call: every tensor is ``cat([uncond, cond])`` along the batch."""
    if set(uncond) != set(cond):
        raise ConfigError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
    return {k: _concat(k, _batch_value(k, uncond[k], b), _batch_value(k, cond[k], b)) for k in cond}


def _to_space(space: RescaleSpace, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    if space == "x0":
        return x0
    if space == "eps":
        return (x - x0) / sigma
    return (x / (sigma**2 + 1) - x0) * (sigma**2 + 1) ** 0.5 / sigma


def _from_space(space: RescaleSpace, x: Tensor, sigma: Tensor, t: Tensor) -> Tensor:
    if space == "x0":
        return t
    if space == "eps":
        return x - sigma * t
    return x / (sigma**2 + 1) - t * sigma / (sigma**2 + 1) ** 0.5


def rescale_cfg(x: Tensor, sigma: Tensor, cond_x0: Tensor, uncond_x0: Tensor, scale: float, rescale: float,
                space: RescaleSpace = "v") -> Tensor:
    """CFG with rescale (Lin et al. 2023, sec. 3.4) done in ``space`` (see the module docstring) -> x0."""
    s = bcast(sigma, x)
    c, u = _to_space(space, x, s, cond_x0), _to_space(space, x, s, uncond_x0)
    cfg = u + (c - u) * scale
    dims = list(range(1, x.ndim))
    ratio = c.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True)
    out = rescale * (cfg * ratio) + (1 - rescale) * cfg
    return _from_space(space, x, s, out)


@dataclass
class CFGDenoiser:
    """Classifier-free guidance, Ho & Salimans 2022: ``model(x, sigma) -> uncond + scale * (cond - uncond)``.

    One denoiser call per evaluation: x, sigma and every cond tensor are concatenated along the batch with the
    uncond rows first (diffusers' order; A1111 puts them last - only the row order of the call differs). With
    ``scale == 1`` or ``uncond is None`` the uncond pass is skipped entirely (a batch of B, not 2B).
    ``cond``/``uncond`` may be callables ``cond_at(sigma) -> dict`` (see :func:`step_schedule`).
    """

    denoiser: Denoiser
    cond: Conditioning
    uncond: Conditioning | None
    scale: float
    rescale: float = 0.0
    rescale_space: RescaleSpace = "v"

    def __post_init__(self) -> None:
        if self.rescale_space not in ("v", "eps", "x0"):
            raise ConfigError(f"unknown CFG rescale space {self.rescale_space!r}; use v, eps or x0")
        if not 0.0 <= self.rescale <= 1.0:
            raise ConfigError(f"CFG rescale must be in [0, 1], got {self.rescale}")

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x [B, ...] at noise level sigma [B] -> guided x0 [B, ...]."""
        b = x.shape[0]
        if sigma.ndim == 0:
            sigma = sigma.expand(b)
        cond = _resolve(self.cond, sigma)
        if self.uncond is None or self.scale == 1.0:
            return self.denoiser(x, sigma, **{k: _batch_value(k, v, b) for k, v in cond.items()})
        kwargs = batch_conds(_resolve(self.uncond, sigma), cond, b)
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **kwargs)
        uncond_x0, cond_x0 = out[:b], out[b:]
        if self.rescale:
            return rescale_cfg(x, sigma, cond_x0, uncond_x0, self.scale, self.rescale, self.rescale_space)
        return uncond_x0 + (cond_x0 - uncond_x0) * self.scale


def cfg_model(denoiser: Denoiser, cond: Conditioning, uncond: Conditioning | None, scale: float,
              rescale: float = 0.0, rescale_space: RescaleSpace = "v") -> CFGDenoiser:
    """Classifier-free guided ``model(x, sigma) -> x0`` (Ho & Salimans 2022); see :class:`CFGDenoiser`."""
    return CFGDenoiser(denoiser, cond, uncond, float(scale), float(rescale), rescale_space)


@dataclass
class MaskedModel:
    """Masked denoising, ComfyUI's ``KSamplerX0Inpaint``: only where ``mask`` is 1 is the image generated.

    ``mask`` is 1 where to denoise (ComfyUI's denoise_mask, A1111's ``nmask``) and 0 where the original
    ``init_latent`` is kept; values in between blend. Before each model call the kept region of the model input is
    replaced by the original re-noised to the current level, ``init_latent + noise * sigma`` (``noise`` is the
    unscaled initial noise, reused at every step as ComfyUI does); after it, the kept region of the prediction is
    replaced by ``init_latent``. A1111's k-diffusion samplers blend only the prediction: ``blend_input=False``.
    """

    model: Model
    mask: Tensor
    init_latent: Tensor
    noise: Tensor
    blend_input: bool = True

    def __post_init__(self) -> None:
        try:
            shape = torch.broadcast_shapes(self.mask.shape, self.init_latent.shape, self.noise.shape)
        except RuntimeError as e:
            raise ConfigError(f"mask {tuple(self.mask.shape)}, init latent {tuple(self.init_latent.shape)} and "
                              f"noise {tuple(self.noise.shape)} do not broadcast together") from e
        if shape != self.init_latent.shape:
            raise ConfigError(f"mask {tuple(self.mask.shape)} must broadcast to the latent "
                              f"{tuple(self.init_latent.shape)}, e.g. [B, 1, H, W]")

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x [B, ...] at sigma [B] -> x0 with the kept region set to the original latent."""
        if x.shape != self.init_latent.shape:
            raise ConfigError(f"x {tuple(x.shape)} does not match the init latent {tuple(self.init_latent.shape)}")
        mask = self.mask.to(x.dtype)
        keep = 1 - mask
        if self.blend_input:
            x = x * mask + (self.init_latent + self.noise * bcast(sigma, x)) * keep
        return self.model(x, sigma) * mask + self.init_latent * keep


def masked_model(model: Model, mask: Tensor, init_latent: Tensor, noise: Tensor,
                 blend_input: bool = True) -> MaskedModel:
    """Inpainting with a normal model, ComfyUI's ``KSamplerX0Inpaint`` semantics; see :class:`MaskedModel`."""
    return MaskedModel(model, mask, init_latent, noise, blend_input)


@dataclass(frozen=True)
class StepSchedule:
    """``cond_at(sigma)``: the cond of the segment holding the step that ``sigma`` falls in.

    Step i covers the noise levels in (sigmas[i + 1], sigmas[i]] (second-order samplers' intermediate evaluations
    count with the step they belong to). Segment j, ``(until_j, cond_j)``, holds steps i with
    ``until_{j-1} * N <= i < until_j * N`` for N steps: ``[a:b:0.5]`` at 20 steps is a for steps 0-9, b for 10-19
    (A1111 switches one model call later, after ``int(0.5 * 20)`` = 10 completed calls). All images of a batch share
    the step (sumie's samplers give every image the same sigma); the first sigma decides.
    """

    sigmas: Tensor
    segments: tuple[tuple[float, Cond], ...]

    def step(self, sigma: Tensor | float) -> int:
        """Index of the step (0 .. N - 1) that a noise level belongs to."""
        s = float(sigma.reshape(-1)[0]) if isinstance(sigma, Tensor) else float(sigma)
        n = self.sigmas.shape[0] - 1
        above = int((self.sigmas[:n] >= s * (1 - 1e-6)).sum())
        return min(max(above - 1, 0), n - 1)

    def __call__(self, sigma: Tensor) -> Cond:
        """The cond for the step of ``sigma``."""
        i, n = self.step(sigma), self.sigmas.shape[0] - 1
        for until, cond in self.segments:
            if i < until * n:
                return cond
        return self.segments[-1][1]


def step_schedule(segments: Sequence[tuple[float, Cond]], sigmas: Tensor) -> StepSchedule:
    """Cond switching at fractions of the steps: ``[(0.5, cond_a), (1.0, cond_b)]`` for ``[a:b:0.5]``."""
    if not segments:
        raise ConfigError("a step schedule needs at least one (until_fraction, cond) segment")
    untils = [float(u) for u, _ in segments]
    if any(b <= a for a, b in zip(untils[:-1], untils[1:], strict=True)) or untils[0] <= 0 or untils[-1] < 1:
        raise ConfigError(f"step schedule fractions must increase from > 0 and end at >= 1, got {untils}")
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ConfigError("a step schedule needs the sampler's sigmas [N + 1]")
    return StepSchedule(sigmas.detach().cpu().double(), tuple((float(u), c) for u, c in segments))
