"""PLMS: pseudo linear multistep, Liu et al. 2022 (PNDM), as SD uses it (diffusers' PNDMScheduler, skip_prk_steps).

PNDM's transfer step phi(x, eps, t -> t') is the DDIM step; with x = x0 + sigma * eps it is simply
x' = x + (sigma' - sigma) * eps. PLMS combines the last four eps with the fixed Adams-Bashforth weights
(equal-step coefficients, whatever the actual spacing of the sigmas, as in the paper and in every reference).
The first step, lacking history, is the pseudo improved Euler step: a DDIM step to sigma', a second model
evaluation there, and the DDIM step again from x with the mean of the two eps. That costs one extra model call
(N + 1 calls for N steps); a single-step run does only the DDIM step, as diffusers does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sumie.sampling.samplers.common import Callback, Model, NoiseSampler, bcast, call_model, sigma_batch, to_d


def _plms_eps(eps: Tensor, history: list[Tensor]) -> Tensor:
    """Adams-Bashforth combination of the current eps with up to three earlier ones (newest last in history)."""
    if len(history) == 1:
        return (3 * eps - history[-1]) / 2
    if len(history) == 2:
        return (23 * eps - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * eps - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


@torch.no_grad()
def sample_plms(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """PLMS (pseudo linear multistep, 4th order), Liu et al. 2022 eq. 12, started by a pseudo improved Euler step."""
    n = len(sigmas) - 1
    history: list[Tensor] = []
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_model(model, x, sigma, i, callback)
        eps = to_d(x, sigma, denoised)
        dt = bcast(sigma_next - sigma, x)
        if history:
            eps_prime = _plms_eps(eps, history)
        elif i < n - 1 and sigma_next > 0:
            x_euler = x + eps * dt
            eps_next = to_d(x_euler, sigma_next, model(x_euler, sigma_batch(sigma_next, x)))
            eps_prime = (eps + eps_next) / 2
        else:
            eps_prime = eps
        x = x + eps_prime * dt
        history = (history + [eps])[-3:]
    return x
