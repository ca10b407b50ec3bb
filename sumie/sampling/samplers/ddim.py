"""DDIM (Song et al. 2021) and DDPM ancestral sampling (Ho et al. 2020) in sigma space.

diffusers' DDIMScheduler / DDPMScheduler step variance-preserving latents x_vp = x / sqrt(1 + sigma^2) between
integer timesteps. Written with x = x0 + sigma * eps (k-diffusion's view) the same updates read:

* DDIM: x_next = x0 + sigma_down * eps + sigma_up * z with eps = (x - x0) / sigma,
  sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2), sigma_down = sqrt(sigma_next^2 - sigma_up^2)
  (diffusers' std_dev_t = eta * sqrt(variance), divided by sqrt(alpha_bar_prev)). eta = 0 is deterministic.
* DDPM (variance "fixed_small"): the posterior q(x_next | x, x0) in sigma space,
  mean x0 + (sigma_next / sigma)^2 (x - x0), std sigma_next * sqrt(1 - (sigma_next / sigma)^2).

The sigmas are the training sigmas at the scheduler's timesteps followed by the final noise level: 0 for
``set_alpha_to_one=True`` (alpha_bar_prev = 1), sigma_min (the sigma of alpha_bar[0]) for ``set_alpha_to_one=False``
as in SD's DDIM config and A1111. For diffusers parity start from ``noise * sqrt(1 + sigmas[0]^2)`` (diffusers'
x_vp = noise); the end sample converts back with x_vp = x / sqrt(1 + sigmas[-1]^2).

diffusers' DDIMScheduler (like PNDMScheduler) steps from t to t - 1000 // N, not to the next timestep of its list.
The two agree for "leading" spacing and for "trailing" with N dividing 1000; otherwise (e.g. "linspace", N = 4:
timesteps 999, 666, 333, 0 but steps to 749, 416, 83) diffusers noises the sample to one level and evaluates the
model at another, which no sigma-space sampler reproduces: here every step goes to the next given sigma.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sumie.errors import ConfigError
from sumie.sampling.samplers.common import (
    Callback,
    Model,
    NoiseSampler,
    ancestral_step,
    bcast,
    call_model,
    require_noise,
    to_d,
)


@torch.no_grad()
def sample_ddim(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM, Song et al. 2021 (eq. 12): eta = 0 deterministic, eta = 1 the DDPM posterior variance."""
    if eta < 0:
        raise ConfigError(f"DDIM eta must be >= 0, got {eta}")
    if eta > 0:
        noise_sampler = require_noise(noise_sampler, "DDIM with eta > 0")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_model(model, x, sigma, i, callback)
        # For eta <= 1 this is exactly diffusers' variance; eta > 1 (NaN in diffusers) clamps to sigma_up = sigma_next.
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        eps = to_d(x, sigma, denoised)
        x = denoised + eps * bcast(sigma_down, x)
        if eta > 0 and sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * bcast(sigma_up, x)
    return x


@torch.no_grad()
def sample_ddpm(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DDPM ancestral sampling with the posterior ("fixed_small") variance, Ho et al. 2020 (eq. 6-7)."""
    noise_sampler = require_noise(noise_sampler, "DDPM")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_model(model, x, sigma, i, callback)
        ratio = (sigma_next / sigma) ** 2  # posterior mean keeps this share of the noise x - x0
        x = denoised + (x - denoised) * bcast(ratio, x)
        if sigma_next > 0:
            std = sigma_next * (1 - ratio) ** 0.5
            x = x + noise_sampler(sigma, sigma_next) * bcast(std, x)
    return x
