"""Ancestral samplers: a deterministic step down to sigma_down, then fresh noise of std sigma_up (k-diffusion's set).

``eta`` scales the noise (0: deterministic, 1: the DDPM-like ancestral amount); every one needs a ``noise_sampler``
unless ``eta == 0``. Noise is drawn once per step as ``noise_sampler(sigmas[i], sigmas[i + 1])``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sumie.sampling.samplers.common import (
    Callback,
    Model,
    NoiseSampler,
    ancestral_step,
    require_noise,
    sigma_batch,
    to_d,
)


@torch.no_grad()
def sample_euler_ancestral(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                           noise_sampler: NoiseSampler | None = None, eta: float = 1.0,
                           s_noise: float = 1.0) -> Tensor:
    """Euler step to sigma_down plus ancestral noise (Ho et al. 2020 ancestral sampling on the Karras ODE)."""
    noise_sampler = require_noise(noise_sampler, "sample_euler_ancestral") if eta else noise_sampler
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma_batch(sigma, x))
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_next > 0 and eta:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                           noise_sampler: NoiseSampler | None = None, eta: float = 1.0,
                           s_noise: float = 1.0) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022) step to sigma_down plus ancestral noise.

    Like k-diffusion, a step whose sigma_down is 0 is a plain Euler step and adds no noise (only reachable with
    eta > 1 before the last step).
    """
    noise_sampler = require_noise(noise_sampler, "sample_dpm_2_ancestral") if eta else noise_sampler
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma_batch(sigma, x))
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
            continue
        sigma_mid = sigma.log().lerp(sigma_down.log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigma)
        d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_batch(sigma_mid, x)))
        x = x + d_2 * (sigma_down - sigma)
        if eta:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                              noise_sampler: NoiseSampler | None = None, eta: float = 1.0,
                              s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(2S) single-step second order (Lu et al. 2022) to sigma_down plus ancestral noise."""
    noise_sampler = require_noise(noise_sampler, "sample_dpmpp_2s_ancestral") if eta else noise_sampler
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma_batch(sigma, x))
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            # lambda = -log sigma; the midpoint in lambda is the geometric mean of the sigmas
            t, t_next = -sigma.log(), -sigma_down.log()
            h = t_next - t
            s = t + h / 2
            sigma_t, sigma_s = (-t).exp(), (-s).exp()
            x_2 = (sigma_s / sigma_t) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, sigma_batch(sigma_s, x))
            x = ((-t_next).exp() / sigma_t) * x - (-h).expm1() * denoised_2
        if sigma_next > 0 and eta:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


__all__ = ["sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_euler_ancestral"]
