"""UniPC: unified predictor-corrector multistep solver, Zhao et al. 2023 (data prediction, B(h) variants).

Written in sigma space, where the data-prediction exponential integrator is simplest: with lambda = -log(sigma),
h = lambda_t - lambda_s and the VP quantities of diffusers' UniPCMultistepScheduler divided by alpha_t,

    x_t = (sigma_t / sigma_s) x_s - expm1(-h) x0_s - B(h) sum_k rho_k D_k,

with B(h) = -h (bh1) or expm1(-h) (bh2) and D_k the scaled differences of earlier denoised predictions.
Each model evaluation at the predicted x_t first corrects x_t (UniC, using that evaluation; no extra model
calls) and then feeds the next prediction (UniP). Semantics follow diffusers: predict_x0=True, order-2
predictor weight rho = 1/2, warm-up from order 1, ``lower_order_final`` (order <= steps left), no corrector after
the last step, ``disable_corrector`` listing the steps whose prediction is not corrected.

A step to sigma = 0 is taken with order 1, whose limit is exactly x_t = x0_s (diffusers' default final step).
diffusers 0.42.1 returns NaN there for bh1 (B(h) = -inf times a zero residual) and for any order > 1
(lower_order_final=False). ComfyUI instead replaces a final sigma of 0 by 0.001 and uses order min(3, steps - 1);
A1111 defaults to bh1, order 3, and its own continuous time grid. The step coefficients are computed in float64
whatever the dtype of x.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Literal

import torch
from torch import Tensor

from sumie.errors import ConfigError
from sumie.sampling.samplers.common import Callback, Model, NoiseSampler, sigma_batch

UniPCVariant = Literal["bh1", "bh2"]


def _solve(rows: list[list[float]], b: list[float]) -> list[float]:
    """Solve the small float64 system R rho = b for the UniPC weights."""
    return torch.linalg.solve(torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()


def _uni_update(
    x: Tensor,
    denoised: list[Tensor],
    sigmas: list[float],
    sigma_t: float,
    order: int,
    variant: UniPCVariant,
    model_t: Tensor | None = None,
) -> Tensor:
    """One UniP (``model_t`` None) or UniC step from x at sigmas[-1] to sigma_t.

    ``denoised``/``sigmas`` hold the history, newest last; the last ``order`` entries are used.
    """
    m0, sigma_s0 = denoised[-1], sigmas[-1]
    if sigma_t == 0:
        return m0
    h = math.log(sigma_s0) - math.log(sigma_t)
    hh = -h  # data prediction integrates in -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    # Earlier points, newest first: r_k = (lambda_k - lambda_s0) / h and D_k = (x0_k - x0_s0) / r_k.
    rks, d1s = [], []
    for k in range(1, order):
        rk = (math.log(sigma_s0) - math.log(sigmas[-1 - k])) / h
        rks.append(rk)
        d1s.append((denoised[-1 - k] - m0) / rk)
    rks.append(1.0)
    rows, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for i in range(1, order + 1):
        rows.append([rk ** (i - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    x_t = x * (sigma_t / sigma_s0) - m0 * h_phi_1
    if model_t is None:  # predictor: rho solves the (order - 1) conditions on the earlier points
        if order == 1:
            return x_t
        if order == 2:
            rhos = [0.5]
        else:
            rhos = _solve([row[:-1] for row in rows[:-1]], b[:-1])
        res = sum(d * rho for d, rho in zip(d1s, rhos, strict=True))
        return x_t - res * b_h
    # corrector: the new evaluation model_t joins as the point r = 1
    if order == 1:
        rhos = [0.5]
    else:
        rhos = _solve(rows, b)
    res = (model_t - m0) * rhos[-1]
    for d, rho in zip(d1s, rhos[:-1], strict=True):
        res = res + d * rho
    return x_t - res * b_h


@torch.no_grad()
def sample_unipc(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    order: int = 2,
    variant: UniPCVariant = "bh2",
    lower_order_final: bool = True,
    disable_corrector: Collection[int] = (),
) -> Tensor:
    """UniPC multistep (UniP-p predictor + UniC corrector, B(h) = bh1 or bh2), Zhao et al. 2023 Alg. 2/3."""
    if variant not in ("bh1", "bh2"):
        raise ConfigError(f"unknown UniPC variant {variant!r}; use bh1 or bh2")
    if order < 1:
        raise ConfigError(f"UniPC order must be >= 1, got {order}")
    n = len(sigmas) - 1
    hist_x0: list[Tensor] = []
    hist_sigma: list[float] = []
    x_last: Tensor | None = None
    last_order = 1
    for i in range(n):
        sigma = sigmas[i]
        denoised = model(x, sigma_batch(sigma, x))
        if x_last is not None and i - 1 not in disable_corrector:
            x = _uni_update(x_last, hist_x0, hist_sigma, float(sigma), last_order, variant, model_t=denoised)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        hist_x0 = (hist_x0 + [denoised])[-order:]
        hist_sigma = (hist_sigma + [float(sigma)])[-order:]
        step_order = min(order, n - i) if lower_order_final else order
        step_order = min(step_order, len(hist_x0))  # warm-up
        sigma_next = float(sigmas[i + 1])
        if sigma_next == 0:
            step_order = 1
        x_last = x
        x = _uni_update(x, hist_x0, hist_sigma, sigma_next, step_order, variant)
        last_order = step_order
    return x
