"""SDE samplers (DPM-Solver++ SDE family, Lu et al. 2022) and Restart sampling (Xu et al. 2023).

The DPM++ SDE samplers draw noise between arbitrary pairs of sigmas (``dpmpp_sde`` also at intermediate ones), so
their ``noise_sampler(sigma, sigma_next)`` should be a Brownian one (``sumie.sampling.noise.BrownianNoise``), as in
k-diffusion; white noise (``ImageRNG``) works too but is not what A1111/ComfyUI use for them. ``eta == 0`` makes them
deterministic and the noise sampler optional.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from sumie.errors import ConfigError
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


@torch.no_grad()
def sample_dpmpp_sde(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                     noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
                     r: float = 1 / 2) -> Tensor:
    """DPM-Solver++ stochastic two-stage steps (Lu et al. 2022), stage 1 at lambda + r h; k-diffusion's DPM++ SDE."""
    noise_sampler = require_noise(noise_sampler, "sample_dpmpp_sde") if eta else noise_sampler
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_model(model, x, sigma, i, callback)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        # lambda = -log sigma; sigmas are recomputed as exp(-lambda), as the reference does
        t, t_next = -sigma.log(), -sigma_next.log()
        h = t_next - t
        s = t + h * r
        sigma_t, sigma_s, sigma_tn = (-t).exp(), (-s).exp(), (-t_next).exp()
        # stage 1: ancestral DPM-Solver++(1) step from lambda_t to lambda_s
        sd, su = ancestral_step(sigma_t, sigma_s, eta)
        s_ = -sd.log()
        x_2 = ((-s_).exp() / sigma_t) * x - (t - s_).expm1() * denoised
        if eta:
            x_2 = x_2 + noise_sampler(sigma_t, sigma_s) * s_noise * su
        denoised_2 = model(x_2, sigma_batch(sigma_s, x))
        # stage 2: from lambda_t to lambda_next with the combined data prediction
        sd, su = ancestral_step(sigma_t, sigma_tn, eta)
        t_next_ = -sd.log()
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = ((-t_next_).exp() / sigma_t) * x - (t - t_next_).expm1() * denoised_d
        if eta:
            x = x + noise_sampler(sigma_t, sigma_tn) * s_noise * su
    return x


History = list[tuple[Tensor, Tensor]]  # (denoised, h) of the earlier steps, newest first
MultistepUpdate = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, History], Tensor]


def _multistep_sde(model: Model, x: Tensor, sigmas: Tensor, update: MultistepUpdate, name: str,
                   callback: Callback | None, noise_sampler: NoiseSampler | None, eta: float, s_noise: float,
                   keep: int) -> Tensor:
    """The DPM-Solver++ multistep SDE loop: denoise, ``update(x, x0, sigma, sigma_next, h, history)`` in
    lambda = -log sigma (h = lambda_next - lambda), then noise of std sigma_next sqrt(1 - exp(-2 eta h)); the last
    step (to sigma 0) returns the denoised sample."""
    noise_sampler = require_noise(noise_sampler, name) if eta else noise_sampler
    history: History = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_model(model, x, sigma, i, callback)
        if sigma_next == 0:
            x = denoised
            continue
        h = (-sigma_next.log()) - (-sigma.log())
        x = update(x, denoised, sigma, sigma_next, h, history)
        if eta:
            x = x + noise_sampler(sigma, sigma_next) * sigma_next * (-2 * eta * h).expm1().neg().sqrt() * s_noise
        history = [(denoised, h), *history][:keep]
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                        noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0,
                        solver_type: Literal["midpoint", "heun"] = "midpoint") -> Tensor:
    """DPM-Solver++(2M) SDE, Lu et al. 2022 (k-diffusion's; solver_type picks the second-order correction)."""
    if solver_type not in ("midpoint", "heun"):
        raise ConfigError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")

    def update(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, h: Tensor, history: History) -> Tensor:
        eta_h = eta * h
        phi_1 = (-h - eta_h).expm1().neg()
        x = sigma_next / sigma * (-eta_h).exp() * x + phi_1 * denoised
        if history:
            old_denoised, h_last = history[0]
            r = h_last / h
            if solver_type == "heun":
                return x + (phi_1 / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
            return x + 0.5 * phi_1 * (1 / r) * (denoised - old_denoised)
        return x

    return _multistep_sde(model, x, sigmas, update, "sample_dpmpp_2m_sde", callback, noise_sampler, eta, s_noise, 1)


@torch.no_grad()
def sample_dpmpp_3m_sde(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                        noise_sampler: NoiseSampler | None = None, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(3M) SDE, Lu et al. 2022 (k-diffusion's third-order multistep SDE solver)."""

    def update(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor, h: Tensor, history: History) -> Tensor:
        h_eta = h * (eta + 1)
        x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        if len(history) == 2:
            (denoised_1, h_1), (denoised_2, h_2) = history
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            return x + phi_2 * d1 - phi_3 * d2
        if history:
            denoised_1, h_1 = history[0]
            return x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
        return x

    return _multistep_sde(model, x, sigmas, update, "sample_dpmpp_3m_sde", callback, noise_sampler, eta, s_noise, 2)


RestartList = dict[float, tuple[int, int, float]]


def _karras(n: int, sigma_min: Tensor | float, sigma_max: Tensor | float, like: Tensor, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 schedule of n sigmas from sigma_max down to sigma_min, then 0 (dtype/device of like)."""
    ramp = torch.linspace(0, 1, n, dtype=like.dtype, device=like.device)
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, like.new_zeros([1])])


def restart_steps(sigmas: Tensor, restart_list: RestartList | None = None) -> list[tuple[Tensor, Tensor]]:
    """The (sigma_from, sigma_to) Heun steps of Restart sampling, as A1111's ``restart_sampler`` schedules them.

    ``restart_list`` maps a sigma (snapped to the nearest of ``sigmas``) to ``(n_sigmas, times, sigma_max)``: after
    reaching it, jump back ``times`` times to the schedule sigma nearest ``sigma_max`` and walk down again on a
    Karras ramp of ``n_sigmas`` sigmas. ``None`` picks A1111's default from the step count: under 20 steps none;
    otherwise {0.1: (10, 1, 2)} (36+ steps: {0.1: (steps // 4 + 1, 2, 2)}), and the main schedule is replaced by a
    Karras one shortened by the restart steps, between the same end points.
    """
    steps = sigmas.shape[0] - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            n, times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = _karras(steps - n * times, sigmas[-2], sigmas[0], sigmas)
            restart_list = {0.1: (n + 1, times, 2.0)}
    at_index = {int(torch.argmin((sigmas - key).abs(), dim=0)): v for key, v in restart_list.items()}
    out: list[tuple[Tensor, Tensor]] = []
    for i in range(len(sigmas) - 1):
        out.append((sigmas[i], sigmas[i + 1]))
        if i + 1 not in at_index:
            continue
        n, times, restart_max = at_index[i + 1]
        lo, hi = i + 1, int(torch.argmin((sigmas - restart_max).abs(), dim=0))
        if hi < lo:
            ramp = _karras(int(n), sigmas[lo], sigmas[hi], sigmas)[:-1]
            out.extend(list(zip(ramp[:-1], ramp[1:], strict=True)) * int(times))
    return out


@torch.no_grad()
def sample_restart(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                   noise_sampler: NoiseSampler | None = None, s_noise: float = 1.0,
                   restart_list: RestartList | None = None) -> Tensor:
    """Restart sampling, Xu et al. 2023 (A1111's schedule): Heun steps; each restart re-noises x from the level it
    reached up to the restart's top sigma with ``noise_sampler(sigma_low, sigma_high)`` and descends again."""
    steps = restart_steps(sigmas, restart_list)
    if any(a > b for (_, b), (a, _) in zip(steps[:-1], steps[1:], strict=True)):
        noise_sampler = require_noise(noise_sampler, "sample_restart")
    last: Tensor | None = None
    for i, (sigma, sigma_next) in enumerate(steps):
        if last is not None and last < sigma:
            x = x + noise_sampler(last, sigma) * s_noise * (sigma**2 - last**2) ** 0.5
        denoised = model(x, sigma_batch(sigma, x))
        d = to_d(x, sigma, denoised)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, model(x_2, sigma_batch(sigma_next, x)))
            x = x + (d + d_2) / 2 * dt
        last = sigma_next
    return x


__all__ = ["RestartList", "restart_steps", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_dpmpp_sde",
           "sample_restart"]
