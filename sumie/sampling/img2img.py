"""img2img: where the schedule starts for a denoising strength s in [0, 1], and the noisy start latent.

Three conventions, each exactly as its reference computes it (``full_sigmas_fn(n)`` gives the whole n-step schedule
ending in 0, e.g. ``lambda n: make_sigmas("karras", ds, n)``):

* ``a1111`` (default; A1111 1.10 ``sd_samplers_common.setup_img2img_steps`` and ``KDiffusionSampler.sample_img2img``
  with the option "img2img_fix_steps" off): build the ``steps``-step schedule, ``t_enc = int(min(s, 0.999) * steps)``
  and run ``sigmas[steps - t_enc - 1:]``, i.e. the last ``int(min(s, 0.999) * steps) + 1`` steps. Python's float
  product is truncated, so s = 0.29 at 100 steps runs 29 steps (0.29 * 100 = 28.999999999999996); s = 1 runs all
  steps (below 1000 steps); s = 0 still runs the last step. With ``fix_steps=True`` (the option on, and always for
  the hires-fix pass) A1111 instead builds ``int(steps / min(s, 0.999))`` steps and runs the last ``steps`` of them.
* ``comfyui`` (``KSampler.set_steps``): s > 0.9999 runs the full schedule, s <= 0 nothing (empty sigmas), otherwise
  the last ``steps`` steps of the ``int(steps / s)``-step schedule.
* ``diffusers`` (``StableDiffusionImg2ImgPipeline.get_timesteps``): ``t_start = steps - min(int(steps * s), steps)``
  and the run is ``sigmas[t_start:]``: ``int(steps * s)`` steps of the ``steps``-step schedule (none for s = 0;
  second-order schedulers repeat timesteps inside diffusers, which in sigma form is the same slice).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from sumie.errors import ConfigError

Convention = Literal["a1111", "comfyui", "diffusers"]


def img2img_plan(
    steps: int, strength: float, convention: Convention = "a1111", fix_steps: bool = False
) -> tuple[int, int]:
    """(n, start): build the n-step schedule and run it from index ``start``; n = 0 means run nothing.

    For ``comfyui`` the start is counted from the end of the schedule (its ``sigmas[-(steps + 1):]``) and returned
    here as -(steps + 1).
    """
    if steps < 1:
        raise ConfigError(f"img2img needs at least one step, got {steps}")
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"denoising strength must be in [0, 1], got {strength}")
    if convention == "a1111":
        s = min(strength, 0.999)
        if fix_steps:
            if strength <= 0:
                raise ConfigError("denoising strength 0 with fix_steps gives no schedule (A1111 divides by it)")
            total, t_enc = int(steps / s), steps - 1
        else:
            total, t_enc = steps, int(s * steps)
        return total, max(total - t_enc - 1, 0)
    if fix_steps:
        raise ConfigError("fix_steps is an A1111 option; ComfyUI and diffusers have no such switch")
    if convention == "comfyui":
        if strength > 0.9999:
            return steps, 0
        if strength <= 0.0:
            return 0, 0
        return int(steps / strength), -(steps + 1)
    if convention == "diffusers":
        init = min(int(steps * strength), steps)
        return steps, max(steps - init, 0)
    raise ConfigError(f"unknown img2img convention {convention!r}; use a1111, comfyui or diffusers")


def img2img_schedule(
    full_sigmas_fn: Callable[[int], Tensor],
    steps: int,
    strength: float,
    convention: Convention = "a1111",
    *,
    fix_steps: bool = False,
) -> tuple[Tensor, Tensor]:
    """(visited sigmas, whole schedule they come from): the whole one sets the range of an SDE sampler's Brownian
    noise; both are empty when nothing runs."""
    n, start = img2img_plan(steps, strength, convention, fix_steps)
    if n == 0:
        return torch.zeros(0), torch.zeros(0)
    full = full_sigmas_fn(n)
    return full[start:], full


def img2img_sigmas(
    full_sigmas_fn: Callable[[int], Tensor],
    steps: int,
    strength: float,
    convention: Convention = "a1111",
    *,
    fix_steps: bool = False,
) -> Tensor:
    """The part of the schedule an img2img run with denoising strength ``strength`` visits (see the module doc)."""
    return img2img_schedule(full_sigmas_fn, steps, strength, convention, fix_steps=fix_steps)[0]


def noise_latent(latent: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """k-diffusion's img2img start x = latent + noise * sigma (sigma a scalar or per-sample [B])."""
    sigma = torch.as_tensor(sigma, dtype=latent.dtype, device=latent.device)
    return latent + noise * sigma.reshape(sigma.shape + (1,) * (latent.ndim - sigma.ndim))
