"""Deterministic ODE samplers of the probability-flow ODE dx/dsigma = (x - x0) / sigma (k-diffusion's set).

Euler, Heun and DPM-2 take Karras et al.'s optional "churn" (add noise to climb from sigma to sigma_hat before each
step); with ``s_churn > 0`` they need a ``noise_sampler``. LMS and DPM++ 2M are multistep methods.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from sumie.errors import ConfigError
from sumie.sampling.samplers.common import Callback, Model, NoiseSampler, call_model, require_noise, sigma_batch, to_d


def _churn(x: Tensor, sigmas: Tensor, i: int, noise_sampler: NoiseSampler | None, s_churn: float, s_tmin: float,
           s_tmax: float, s_noise: float) -> tuple[Tensor, Tensor]:
    """Karras et al. 2022 Alg. 2 lines 4-6: raise the noise level of x from sigmas[i] to sigma_hat -> (x, sigma_hat)."""
    sigma = sigmas[i]
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        eps = noise_sampler(sigma, sigmas[i + 1]) * s_noise
        x = x + eps * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


# update(x, d, sigma_hat, sigma_next) -> x at sigma_next, given the derivative d at sigma_hat.
_Update = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _karras_loop(model: Model, x: Tensor, sigmas: Tensor, update: _Update, name: str, callback: Callback | None,
                 noise_sampler: NoiseSampler | None, s_churn: float, s_tmin: float, s_tmax: float,
                 s_noise: float) -> Tensor:
    """Karras et al. 2022 Algorithm 2's skeleton: churn, denoise, callback, then the method's own update."""
    noise_sampler = require_noise(noise_sampler, name) if s_churn > 0 else noise_sampler
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise_sampler, s_churn, s_tmin, s_tmax, s_noise)
        denoised = call_model(model, x, sigmas[i], i, callback, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        x = update(x, d, sigma_hat, sigmas[i + 1])
    return x


@torch.no_grad()
def sample_euler(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                 noise_sampler: NoiseSampler | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """Euler steps, Karras et al. 2022 Algorithm 2 (churn noise only when ``s_churn > 0``)."""

    def update(x: Tensor, d: Tensor, sigma_hat: Tensor, sigma_next: Tensor) -> Tensor:
        return x + d * (sigma_next - sigma_hat)

    return _karras_loop(model, x, sigmas, update, "sample_euler", callback, noise_sampler, s_churn, s_tmin, s_tmax,
                        s_noise)


@torch.no_grad()
def sample_heun(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                noise_sampler: NoiseSampler | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """Heun's second-order steps (Euler on the last step to 0), Karras et al. 2022 Algorithm 2."""

    def update(x: Tensor, d: Tensor, sigma_hat: Tensor, sigma_next: Tensor) -> Tensor:
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            return x + d * dt
        x_2 = x + d * dt
        d_2 = to_d(x_2, sigma_next, model(x_2, sigma_batch(sigma_next, x)))
        return x + (d + d_2) / 2 * dt

    return _karras_loop(model, x, sigmas, update, "sample_heun", callback, noise_sampler, s_churn, s_tmin, s_tmax,
                        s_noise)


@torch.no_grad()
def sample_dpm_2(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                 noise_sampler: NoiseSampler | None = None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """DPM-Solver-2 midpoint steps in log sigma (Lu et al. 2022) inside Karras et al. 2022 Algorithm 2."""

    def update(x: Tensor, d: Tensor, sigma_hat: Tensor, sigma_next: Tensor) -> Tensor:
        if sigma_next == 0:
            return x + d * (sigma_next - sigma_hat)
        sigma_mid = sigma_hat.log().lerp(sigma_next.log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_batch(sigma_mid, x)))
        return x + d_2 * (sigma_next - sigma_hat)

    return _karras_loop(model, x, sigmas, update, "sample_dpm_2", callback, noise_sampler, s_churn, s_tmin, s_tmax,
                        s_noise)


def lms_coefficients(sigmas: Tensor, i: int, order: int) -> list[float]:
    """Adams-Bashforth weights in sigma for step i: the integral over [sigma_i, sigma_i+1] of each Lagrange basis
    polynomial through sigma_i, ..., sigma_{i-order+1}; Gauss-Legendre quadrature, exact for these polynomials."""
    if order - 1 > i:
        raise ConfigError(f"LMS order {order} too high for step {i}")
    t = sigmas.detach().double().cpu().numpy()
    a, b = t[i], t[i + 1]
    nodes, weights = np.polynomial.legendre.leggauss(order // 2 + 1)
    tau = (b - a) / 2 * nodes + (a + b) / 2
    coeffs = []
    for j in range(order):
        basis = np.ones_like(tau)
        for k in range(order):
            if k != j:
                basis = basis * (tau - t[i - k]) / (t[i - j] - t[i - k])
        coeffs.append(float((b - a) / 2 * np.sum(weights * basis)))
    return coeffs


@torch.no_grad()
def sample_lms(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
               noise_sampler: NoiseSampler | None = None, order: int = 4) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma) on the Karras ODE, k-diffusion's LMS (Karras et al. 2022)."""
    if order < 1:
        raise ConfigError(f"LMS order must be >= 1, got {order}")
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        coeffs = lms_coefficients(sigmas, i, min(i + 1, order))
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=False))
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                    noise_sampler: NoiseSampler | None = None) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022: second-order multistep in log-SNR on the data prediction."""
    old_denoised: Tensor | None = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_model(model, x, sigma, i, callback)
        # lambda = -log sigma; sigma_next / sigma computed as exp(-lambda_next) / exp(-lambda) like the reference
        t, t_next = -sigma.log(), -sigma_next.log()
        h = t_next - t
        target = denoised
        if old_denoised is not None and sigma_next != 0:
            h_last = t - (-sigmas[i - 1].log())
            r = h_last / h
            target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = ((-t_next).exp() / (-t).exp()) * x - (-h).expm1() * target
        old_denoised = denoised
    return x


__all__ = ["lms_coefficients", "sample_dpm_2", "sample_dpmpp_2m", "sample_euler", "sample_heun", "sample_lms"]
