"""Types and small helpers shared by every sampler (k-diffusion conventions)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sumie.errors import ConfigError

# model(x [B, ...], sigma [B]) -> denoised x0 [B, ...]
Model = Callable[[Tensor, Tensor], Tensor]
# noise_sampler(sigma, sigma_next) -> standard normal noise shaped like x
NoiseSampler = Callable[[Tensor, Tensor], Tensor]
# callback({"i": step, "x": x, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": x0})
Callback = Callable[[dict[str, Any]], None]


def append_zero(sigmas: Tensor) -> Tensor:
    """sigmas [N] -> [N + 1] ending in 0."""
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def bcast(v: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-sample [B] or scalar value against x [B, ...]."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def sigma_batch(sigma: Tensor, x: Tensor) -> Tensor:
    """A scalar sigma expanded to the batch [B]."""
    return sigma * x.new_ones([x.shape[0]])


def call_model(model: Model, x: Tensor, sigma: Tensor, i: int, callback: Callback | None,
            sigma_hat: Tensor | None = None) -> Tensor:
    """x0 = model(x, sigma_hat or sigma) [B, ...], reported to ``callback`` as step ``i``."""
    at = sigma if sigma_hat is None else sigma_hat
    denoised = model(x, sigma_batch(at, x))
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": at, "denoised": denoised})
    return denoised


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """Karras ODE derivative dx/dsigma = (x - x0) / sigma."""
    return (x - denoised) / bcast(sigma, x)


def ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """(sigma_down, sigma_up) of an ancestral step: deterministic step to sigma_down, then add sigma_up noise."""
    if not eta:
        return sigma_to, sigma_to * 0
    up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    down = (sigma_to**2 - up**2) ** 0.5
    return down, up


def require_noise(noise_sampler: NoiseSampler | None, name: str) -> NoiseSampler:
    """Stochastic samplers take their noise from outside; a missing sampler is a usage error."""
    if noise_sampler is None:
        raise ConfigError(f"{name} is stochastic and needs a noise_sampler (e.g. sumie.sampling.noise.ImageRNG)")
    return noise_sampler
