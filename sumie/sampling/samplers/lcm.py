"""Latent Consistency Models, Luo et al. 2023: multistep consistency sampling and LCM's boundary condition.

An LCM-distilled UNet is an ordinary eps (or v) network whose x0 prediction is blended with the noisy input by
the consistency boundary-condition scalings of its timestep t (diffusers' LCMScheduler, ComfyUI's LCM model
sampling): s = t * timestep_scaling, c_skip = sigma_data^2 / (s^2 + sigma_data^2), c_out = s / sqrt(s^2 +
sigma_data^2), denoised = c_out * x0 + c_skip * x_vp. :class:`LCMDenoiser` applies that around any denoiser, with
x_vp = x / sqrt(1 + sigma^2) as in diffusers (ComfyUI blends the unscaled x; the two differ by c_skip * x * O(sigma^2),
below 1e-7 |x| on LCM's own timesteps). :func:`sample_lcm` then jumps to each denoised prediction and re-noises it to
the next sigma; :func:`lcm_timesteps` is diffusers' selection of inference steps from the distillation schedule
(the "lcm" schedule). The engine wraps each stage's denoiser in :class:`LCMDenoiser` for this sampler
(``SamplerSpec.consistency``), with the network's own timesteps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sumie.errors import ConfigError
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.samplers.common import Callback, Model, NoiseSampler, append_zero, bcast, call_model, require_noise


class LCMDenoiser:
    """Wrap ``denoise(x, sigma) -> x0`` with LCM's boundary condition c_skip(t) x_vp + c_out(t) x0 (Luo et al. 2023)."""

    def __init__(self, model: Model, schedule: DiscreteSigmas, timestep_scaling: float = 10.0,
                 sigma_data: float = 0.5, quantize: bool | None = None) -> None:
        self.model = model
        self.schedule = schedule
        self.timestep_scaling = timestep_scaling
        self.sigma_data = sigma_data
        self.quantize = quantize

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(c_skip, c_out) at noise level sigma [B], from its training timestep t = sigma_to_t(sigma)."""
        t = self.schedule.sigma_to_t(sigma, quantize=self.quantize).to(sigma.dtype)
        s = t * self.timestep_scaling
        c_skip = self.sigma_data**2 / (s**2 + self.sigma_data**2)
        c_out = s / (s**2 + self.sigma_data**2) ** 0.5
        return c_skip, c_out

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """x [B, ...] at sigma [B] -> consistency-model prediction of x0 [B, ...]."""
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        x0 = self.model(x, sigma, **cond)
        c_skip, c_out = self.scalings(sigma)
        x_vp = x / bcast((sigma**2 + 1) ** 0.5, x)
        return x0 * bcast(c_out, x) + x_vp * bcast(c_skip, x)


def lcm_timesteps(steps: int, original_inference_steps: int = 50, num_train_timesteps: int = 1000,
                  strength: float = 1.0) -> Tensor:
    """Descending int64 timesteps [steps]: evenly spaced picks from the distillation grid k*j - 1 (diffusers)."""
    k = num_train_timesteps // original_inference_steps
    grid_len = int(original_inference_steps * strength)
    if original_inference_steps > num_train_timesteps:
        raise ConfigError(f"original_inference_steps {original_inference_steps} > {num_train_timesteps} timesteps")
    if steps < 1 or steps > grid_len or steps > original_inference_steps:
        raise ConfigError(f"LCM needs 1 <= steps <= {min(grid_len, original_inference_steps)} (its "
                          f"{original_inference_steps}-step distillation grid), got {steps}; use fewer steps")
    grid = torch.arange(grid_len, 0, -1, dtype=torch.int64) * k - 1  # descending distillation timesteps
    picks = torch.div(torch.arange(steps, dtype=torch.int64) * grid_len, steps, rounding_mode="floor")
    return grid[picks]


def lcm_sigmas(schedule: DiscreteSigmas, steps: int, original_inference_steps: int = 50,
               strength: float = 1.0) -> Tensor:
    """LCM's sigmas [steps + 1]: the training sigmas at :func:`lcm_timesteps`, then 0."""
    t = lcm_timesteps(steps, original_inference_steps, schedule.sigmas.shape[0], strength)
    return append_zero(schedule.sigmas[t])


@torch.no_grad()
def sample_lcm(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Multistep latent consistency sampling, Luo et al. 2023 Alg. 1 (x <- f(x, sigma) + sigma_next * z)."""
    if bool((sigmas[1:] > 0).any()):
        noise_sampler = require_noise(noise_sampler, "LCM")
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = call_model(model, x, sigma, i, callback)
        x = denoised
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * bcast(sigma_next, x)
    return x
