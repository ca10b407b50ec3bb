"""Ancestral samplers: a deterministic step down to sigma_down, then fresh noise of std sigma_up (k-diffusion's set).

``eta`` scales the noise (0: deterministic, 1: the DDPM-like ancestral amount); every one needs a ``noise_sampler``
unless ``eta == 0``. Noise is drawn once per step as ``noise_sampler(sigmas[i], sigmas[i + 1])``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sumie.sampling.samplers.common import (
    Callback,
    Model,
    NoiseSampler,
    ancestral_step,
    call_model,
    require_noise,
    sigma_batch,
    to_d,
)

# update(x, denoised, sigma, sigma_down) -> x at sigma_down (the deterministic part of the step).
_Update = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _ancestral_loop(model: Model, x: Tensor, sigmas: Tensor, update: _Update, name: str, callback: Callback | None,
                    noise_sampler: NoiseSampler | None, eta: float, s_noise: float,
                    quiet_when_down_is_zero: bool = False) -> Tensor:
    """Denoise, callback, the method's step to sigma_down, then noise of std sigma_up (none on the last step;
    ``quiet_when_down_is_zero``: none either when sigma_down reaches 0 early, as k-diffusion's DPM2 a)."""
    noise_sampler = require_noise(noise_sampler, name) if eta else noise_sampler
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_model(model, x, sigma, i, callback)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = update(x, denoised, sigma, sigma_down)
        quiet = sigma_next == 0 or (quiet_when_down_is_zero and sigma_down == 0)
        if eta and not quiet:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                           noise_sampler: NoiseSampler | None = None, eta: float = 1.0,
                           s_noise: float = 1.0) -> Tensor:
    """Euler step to sigma_down plus ancestral noise (Ho et al. 2020 ancestral sampling on the Karras ODE)."""

    def update(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_down: Tensor) -> Tensor:
        return x + to_d(x, sigma, denoised) * (sigma_down - sigma)

    return _ancestral_loop(model, x, sigmas, update, "sample_euler_ancestral", callback, noise_sampler, eta, s_noise)


@torch.no_grad()
def sample_dpm_2_ancestral(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                           noise_sampler: NoiseSampler | None = None, eta: float = 1.0,
                           s_noise: float = 1.0) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022) step to sigma_down plus ancestral noise.

    Like k-diffusion, a step whose sigma_down is 0 is a plain Euler step and adds no noise (only reachable with
    eta > 1 before the last step).
    """

    def update(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_down: Tensor) -> Tensor:
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            return x + d * (sigma_down - sigma)
        sigma_mid = sigma.log().lerp(sigma_down.log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigma)
        d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_batch(sigma_mid, x)))
        return x + d_2 * (sigma_down - sigma)

    return _ancestral_loop(model, x, sigmas, update, "sample_dpm_2_ancestral", callback, noise_sampler, eta, s_noise,
                           quiet_when_down_is_zero=True)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                              noise_sampler: NoiseSampler | None = None, eta: float = 1.0,
                              s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(2S) single-step second order (Lu et al. 2022) to sigma_down plus ancestral noise."""

    def update(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_down: Tensor) -> Tensor:
        if sigma_down == 0:
            return x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        # lambda = -log sigma; the midpoint in lambda is the geometric mean of the sigmas
        t, t_next = -sigma.log(), -sigma_down.log()
        h = t_next - t
        s = t + h / 2
        sigma_t, sigma_s = (-t).exp(), (-s).exp()
        x_2 = (sigma_s / sigma_t) * x - (-h / 2).expm1() * denoised
        denoised_2 = model(x_2, sigma_batch(sigma_s, x))
        return ((-t_next).exp() / sigma_t) * x - (-h).expm1() * denoised_2

    return _ancestral_loop(model, x, sigmas, update, "sample_dpmpp_2s_ancestral", callback, noise_sampler, eta,
                           s_noise)


__all__ = ["sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_euler_ancestral"]
