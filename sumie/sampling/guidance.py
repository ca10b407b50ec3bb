"""Guidance: wrap a conditional denoiser into the ``model(x, sigma) -> x0`` that samplers call (sgm's "guider").

* :func:`cfg_model` - classifier-free guidance (Ho & Salimans 2022), ``x0 = uncond + scale * (cond - uncond)``,
  with cond and uncond in one batched network call (uncond rows first, as diffusers orders them), and optional
  CFG rescale (Lin et al. 2023, sec. 3.4).
* :func:`masked_model` - masked denoising (inpainting with a normal model), ComfyUI's ``KSamplerX0Inpaint``.
* :func:`guided_call` - the one batched CFG evaluation that :class:`CFGDenoiser` and the engine's
  :class:`~sumie.pipelines.denoise.GuidedModel` (prompt schedules, AND, stages) both use.

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

import math
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


def repeat_to_common_length(contexts: Sequence[Tensor]) -> list[Tensor]:
    """Contexts [B, L_i, D] repeated along L to the least common multiple of their lengths.

    Attention over a token sequence repeated k times equals attention over it once (every key's softmax weight is
    split k ways), so prompts of different lengths can share one batched call of an attention network (ComfyUI
    concatenates conds this way). Only valid for networks that read the context through attention alone.
    """
    n = math.lcm(*(c.shape[1] for c in contexts))
    return [c if c.shape[1] == n else c.repeat(1, n // c.shape[1], 1) for c in contexts]


def _concat(key: str, values: Sequence[Any], repeat_context: bool) -> Any:
    first = values[0]
    if all(isinstance(v, Tensor) for v in values):
        if key == "context" and repeat_context and len({v.shape[1] for v in values}) > 1:
            values = repeat_to_common_length(values)
            first = values[0]
        if any(v.shape[1:] != first.shape[1:] for v in values):
            shapes = ", ".join(str(tuple(v.shape)) for v in values)
            raise ConfigError(f"cond and uncond {key!r} shapes differ ({shapes}); "
                              "pad the shorter prompt to the same number of 77-token chunks")
        return torch.cat([v.to(first) for v in values])
    if all(isinstance(v, list | tuple) for v in values) and len({len(v) for v in values}) == 1:
        return type(first)(_concat(key, [v[i] for v in values], repeat_context) for i in range(len(first)))
    for v in values[1:]:
        try:
            same = v is first or bool(v == first)
        except (TypeError, ValueError, RuntimeError):
            same = False
        if not same:
            raise ConfigError(f"cond and uncond {key!r} differ and are not tensors; they cannot be batched together")
    return first


def batch_conds(groups: Sequence[Cond], b: int, repeat_context: bool = False) -> dict[str, Any]:
    """The denoiser kwargs of one batched call: every tensor of every group, broadcast to b rows, concatenated."""
    keys = set(groups[0])
    if any(set(g) != keys for g in groups[1:]):
        raise ConfigError("cond and uncond need the same keys, got " + " and ".join(str(sorted(g)) for g in groups))
    return {k: _concat(k, [_batch_value(k, g[k], b) for g in groups], repeat_context) for k in groups[0]}


# extra(rows) -> more kwargs for the batched call, given rows [n * B]: 0 = uncond row, k >= 1 = a row of cond k
ExtraKwargs = Callable[[Tensor], dict[str, Any]]


def guided_call(denoiser: Denoiser, x: Tensor, sigma: Tensor, conds: Sequence[tuple[Cond, float]],
                uncond: Cond | None, scale: float, rescale: float = 0.0, rescale_space: RescaleSpace = "v", *,
                repeat_context: bool = False, extra: ExtraKwargs | None = None, skip_uncond: bool = False) -> Tensor:
    """One guided evaluation: every cond and the uncond in one batched denoiser call, then CFG -> x0 [B, ...].

    Rows are ordered cond 1, ..., cond n, uncond (A1111's order); ``x0 = uncond + sum_i w_i * scale * (cond_i -
    uncond)`` (Ho & Salimans 2022; composable diffusion, Liu et al. 2022, for several weighted conds). A single cond
    of weight 1 skips the uncond pass at scale 1 or without an uncond. ``repeat_context`` lets contexts of different
    lengths share the call (:func:`repeat_to_common_length`). ``skip_uncond`` runs the conds alone and stands the
    first cond in for the uncond at scale 1 (A1111's NGMS / Skip Early CFG): a plain prompt gives its cond.
    """
    b = x.shape[0]
    if sigma.ndim == 0:
        sigma = sigma.expand(b)
    simple = len(conds) == 1 and conds[0][1] == 1.0
    skip = skip_uncond and uncond is not None
    with_uncond = uncond is not None and not (simple and scale == 1.0) and not skip
    if not with_uncond and not simple and not skip:
        raise ConfigError("weighted or several conds need an uncond to guide against")
    if rescale and not simple:
        raise ConfigError("CFG rescale does not combine with AND; drop one of them")
    groups = [c for c, _ in conds] + ([uncond] if with_uncond else [])  # type: ignore[list-item]
    n = len(groups)
    kwargs = batch_conds(groups, b, repeat_context)
    if extra is not None:
        labels = [k + 1 for k in range(len(conds))] + ([0] if with_uncond else [])
        kwargs.update(extra(torch.tensor(labels, device=x.device).repeat_interleave(b)))
    reps = (n,) + (1,) * (x.ndim - 1)
    out = denoiser(x.repeat(reps), sigma.repeat(n), **kwargs)
    if skip and not simple:  # A1111: the first cond's prediction in the uncond's place, CFG at scale 1
        uncond_out, scale, rescale = out[:b], 1.0, 0.0
    elif not with_uncond:
        return out
    else:
        uncond_out = out[len(conds) * b :]
    if rescale:
        return rescale_cfg(x, sigma, out[:b], uncond_out, scale, rescale, rescale_space)
    denoised = uncond_out.clone()
    for i, (_, w) in enumerate(conds):
        denoised += (out[i * b : (i + 1) * b] - uncond_out) * (w * scale)
    return denoised


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

    One denoiser call per evaluation (:func:`guided_call`): x, sigma and every cond tensor are concatenated along the
    batch, cond rows first and uncond rows last (A1111's order; diffusers puts uncond first - only the row order of
    the call differs). With ``scale == 1`` or ``uncond is None`` the uncond pass is skipped entirely (a batch of B,
    not 2B). ``cond``/``uncond`` may be callables ``cond_at(sigma) -> dict``.
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
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        uncond = None if self.uncond is None else _resolve(self.uncond, sigma)
        return guided_call(self.denoiser, x, sigma, [(_resolve(self.cond, sigma), 1.0)], uncond, self.scale,
                           self.rescale, self.rescale_space)


def cfg_model(denoiser: Denoiser, cond: Conditioning, uncond: Conditioning | None, scale: float,
              rescale: float = 0.0, rescale_space: RescaleSpace = "v") -> CFGDenoiser:
    """Classifier-free guided ``model(x, sigma) -> x0`` (Ho & Salimans 2022); see :class:`CFGDenoiser`."""
    return CFGDenoiser(denoiser, cond, uncond, float(scale), float(rescale), rescale_space)


@dataclass
class MaskedModel:
    """Masked denoising, ComfyUI's ``KSamplerX0Inpaint``: only where ``mask`` is 1 is the image generated.

    ``mask`` is 1 where to denoise (ComfyUI's denoise_mask, A1111's ``nmask``) and 0 where the original
    ``init_latent`` is kept; values in between blend. Before each model call (from call ``blend_from_call`` on) the
    kept region of the model input is replaced by the original re-noised to the current level, ``init_latent + noise
    * sigma`` (``noise`` is the unscaled initial noise, reused at every step as ComfyUI does; diffusers' per-step
    blend is the same for one-call-per-step samplers, and skips the first call when it starts from pure noise); after
    it, the kept region of the prediction is replaced by ``init_latent``. A1111's k-diffusion samplers blend only the
    prediction: ``blend_input=False`` (then ``noise`` may be None).
    """

    model: Model
    mask: Tensor
    init_latent: Tensor
    noise: Tensor | None = None
    blend_input: bool = True
    blend_from_call: int = 0
    calls: int = 0

    def __post_init__(self) -> None:
        if self.blend_input and self.noise is None:
            raise ConfigError("blending the model input needs the start noise")
        shapes = [self.mask.shape, self.init_latent.shape] + ([self.noise.shape] if self.noise is not None else [])
        try:
            shape = torch.broadcast_shapes(*shapes)
        except RuntimeError as e:
            raise ConfigError(f"mask {tuple(self.mask.shape)}, init latent {tuple(self.init_latent.shape)} and "
                              f"noise do not broadcast together") from e
        if shape != self.init_latent.shape:
            raise ConfigError(f"mask {tuple(self.mask.shape)} must broadcast to the latent "
                              f"{tuple(self.init_latent.shape)}, e.g. [B, 1, H, W]")

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """x [B, ...] at sigma [B] -> x0 with the kept region set to the original latent."""
        if x.shape != self.init_latent.shape:
            raise ConfigError(f"x {tuple(x.shape)} does not match the init latent {tuple(self.init_latent.shape)}")
        mask = self.mask.to(x.dtype)
        keep = 1 - mask
        if self.blend_input and self.calls >= self.blend_from_call:
            x = x * mask + (self.init_latent + self.noise * bcast(sigma, x)) * keep  # type: ignore[operator]
        self.calls += 1
        return self.model(x, sigma) * mask + self.init_latent * keep

    def final(self, x: Tensor) -> Tensor:
        """The finished latent with the kept region set to the original (A1111 ``samples * nmask + init * mask``)."""
        mask = self.mask.to(x.dtype)
        return x * mask + self.init_latent * (1 - mask)


def masked_model(model: Model, mask: Tensor, init_latent: Tensor, noise: Tensor | None,
                 blend_input: bool = True, blend_from_call: int = 0) -> MaskedModel:
    """Inpainting with a normal model, ComfyUI's ``KSamplerX0Inpaint`` semantics; see :class:`MaskedModel`."""
    return MaskedModel(model, mask, init_latent, noise, blend_input, blend_from_call)
