"""Where diffusers' schedulers differ from k-diffusion / A1111 besides the sigmas: start noise and model timesteps.

Sumie's samplers follow k-diffusion (A1111's default); given the same sigmas, each of diffusers' k-diffusion-family
schedulers performs the same steps, and two conventions remain:

* the start latent: k-diffusion starts txt2img from ``noise * sigmas[0]``; diffusers from ``noise *
  init_noise_sigma``, which is ``sqrt(sigmas[0]**2 + 1)`` for the DPMSolver schedulers (they step on VP latents,
  ``init_noise_sigma = 1``) and for the Euler family with ``timestep_spacing="leading"``, and ``sigmas[0]`` otherwise;
* the timestep the network sees: k-diffusion interpolates log sigma (:meth:`DiscreteSigmas.sigma_to_t`);
  diffusers gives the network the scheduler's own timestep for each schedule sigma, which is the inverse of its
  *linear* sigma interpolation (fractional for ``linspace`` spacing), the rounded log-interpolated t (DPMSolver,
  KDPM2 with Karras sigmas), or the plain log-interpolated t (Euler-family Karras); off-schedule sigmas (KDPM2's
  midpoints) always get the plain log-interpolated t.

:class:`Convention` holds these switches (:data:`A1111` is the default, :func:`diffusers_convention` gives each
scheduler's), :func:`start_latent` and :func:`convention_denoiser` apply them. :func:`sample_dpmpp_2s` is diffusers'
DPMSolverSinglestepScheduler (order 2), which no k-diffusion sampler equals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sumie.errors import ConfigError
from sumie.sampling.denoisers import EpsDenoiser, Network, make_denoiser
from sumie.sampling.discretization import DiscreteSigmas, TimestepMode
from sumie.sampling.samplers.common import Callback, Model, NoiseSampler, sigma_batch

ConventionName = Literal["a1111", "diffusers"]
# "sigma": x = noise * sigmas[0] (k-diffusion); "vp": x = noise * sqrt(sigmas[0]^2 + 1) (diffusers' VP start).
StartScale = Literal["sigma", "vp"]
DiffusersScheduler = Literal[
    "euler", "euler_ancestral", "heun", "kdpm2", "kdpm2_ancestral", "lms", "dpmsolver_multistep",
    "dpmsolver_singlestep",
]
SigmaKind = Literal["spacing", "karras", "exponential", "beta", "lu"]
Spacing = Literal["leading", "trailing", "linspace"]

_EULER_FAMILY = ("euler", "euler_ancestral", "heun", "kdpm2", "kdpm2_ancestral", "lms")
_DPMSOLVER = ("dpmsolver_multistep", "dpmsolver_singlestep")


@dataclass(frozen=True)
class Convention:
    """Start-noise scale and network-timestep rule: A1111/k-diffusion by default, or a diffusers scheduler's."""

    name: ConventionName = "a1111"
    start_scale: StartScale = "sigma"
    timestep_mode: TimestepMode = "log"

    def __post_init__(self) -> None:
        if self.name not in ("a1111", "diffusers"):
            raise ConfigError(f"unknown convention {self.name!r}; use a1111 or diffusers")
        if self.start_scale not in ("sigma", "vp"):
            raise ConfigError(f"unknown start_scale {self.start_scale!r}; use sigma or vp")
        if self.timestep_mode not in ("log", "linear", "round", "floor"):
            raise ConfigError(f"unknown timestep_mode {self.timestep_mode!r}; use log, linear, round or floor")


A1111 = Convention()


def diffusers_convention(scheduler: DiffusersScheduler, spacing: Spacing = "linspace",
                         sigma_kind: SigmaKind = "spacing") -> Convention:
    """The convention of a diffusers (0.42) scheduler for its ``timestep_spacing`` and sigma option.

    ``sigma_kind`` is ``spacing`` (sigmas interpolated at the spaced timesteps) or the ``use_*_sigmas`` option set;
    DPMSolverSinglestep has no spacing option (its timesteps are linspace-like, the start is VP either way).
    """
    if scheduler not in _EULER_FAMILY + _DPMSOLVER:
        names = ", ".join(_EULER_FAMILY + _DPMSOLVER)
        raise ConfigError(f"unknown diffusers scheduler {scheduler!r}; use one of {names}")
    if spacing not in ("leading", "trailing", "linspace"):
        raise ConfigError(f"unknown timestep_spacing {spacing!r}; use leading, trailing or linspace")
    if sigma_kind not in ("spacing", "karras", "exponential", "beta", "lu"):
        raise ConfigError(f"unknown sigma kind {sigma_kind!r}; use spacing, karras, exponential, beta or lu")
    if sigma_kind == "lu" and scheduler != "dpmsolver_multistep":
        raise ConfigError("use_lu_lambdas exists only for dpmsolver_multistep")
    if scheduler in _DPMSOLVER:
        # integer timesteps: exact table points, rounded Karras/Lu, truncated exponential/beta (astype int64)
        mode: TimestepMode = "floor" if sigma_kind in ("exponential", "beta") else "round"
        return Convention("diffusers", "vp", mode)
    if sigma_kind == "spacing":
        mode = "linear"
    elif sigma_kind == "karras" and scheduler in ("kdpm2", "kdpm2_ancestral"):
        mode = "round"
    else:
        mode = "log"
    return Convention("diffusers", "vp" if spacing == "leading" else "sigma", mode)


def start_latent(noise: Tensor, sigmas: Tensor, convention: Convention = A1111) -> Tensor:
    """txt2img start x from unit noise: ``noise * sigmas[0]``, or ``noise * sqrt(sigmas[0]^2 + 1)`` for ``vp``."""
    sigma = sigmas[0].to(noise.dtype)
    return noise * sigma if convention.start_scale == "sigma" else noise * (sigma**2 + 1) ** 0.5


class ConventionSigmas(DiscreteSigmas):
    """The training schedule with a convention's ``sigma_to_t``: ``mode`` for the schedule's own sigmas, log else.

    Without ``schedule`` every sigma gets ``mode``. With it (the sigmas the sampler visits), sigmas equal to one of
    them (relative 4 eps) get ``mode`` and the others, such as DPM-2's midpoints, k-diffusion's log interpolation,
    which is what diffusers gives the network.
    """

    def __init__(self, base: DiscreteSigmas, mode: TimestepMode = "log", schedule: Tensor | None = None) -> None:
        super().__init__(base.alphas_cumprod, quantize=base.quantize)
        self.sigmas, self.log_sigmas = base.sigmas, base.log_sigmas
        self.mode = mode
        self.schedule = None if schedule is None else schedule[schedule > 0].detach()

    def sigma_to_t(self, sigma: Tensor, quantize: bool | None = None, *, mode: TimestepMode | None = None) -> Tensor:
        """Timestep for sigma [B] under the convention (an explicit ``mode`` applies to every sigma)."""
        if mode is not None or self.mode == "log":
            return super().sigma_to_t(sigma, quantize, mode=mode or "log")
        t_mode = super().sigma_to_t(sigma, quantize, mode=self.mode)
        if self.schedule is None:
            return t_mode
        sched = self.schedule.to(device=sigma.device, dtype=sigma.dtype)
        tol = 4 * torch.finfo(sigma.dtype).eps
        on_schedule = ((sigma.reshape(-1, 1) - sched).abs() <= tol * sched).any(dim=1).view(sigma.shape)
        return torch.where(on_schedule, t_mode, super().sigma_to_t(sigma, quantize))


def convention_denoiser(prediction: str, network: Network, schedule: DiscreteSigmas,
                        convention: Convention = A1111, sigmas: Tensor | None = None) -> EpsDenoiser:
    """``make_denoiser`` whose network timesteps follow ``convention``; pass the sampler's ``sigmas`` for DPM-2."""
    if convention.timestep_mode == "log":
        return make_denoiser(prediction, network, schedule)
    return make_denoiser(prediction, network, ConventionSigmas(schedule, convention.timestep_mode, sigmas))


def singlestep_orders(steps: int, lower_order_final: bool = True, final_zero: bool = True) -> list[int]:
    """Solver order of each step of diffusers' DPMSolverSinglestepScheduler(solver_order=2): 1, 2, 1, 2, ...

    Its ``set_timesteps`` forces ``lower_order_final`` when the step count is odd or the last sigma is 0; then an
    even count ends 1, 1 and an odd count ends 1; a last step to sigma 0 is always first order.
    """
    if steps < 1:
        raise ConfigError(f"need at least one step, got {steps}")
    lower_order_final = lower_order_final or steps % 2 == 1 or final_zero
    if lower_order_final:
        orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    else:
        orders = [1, 2] * (steps // 2)
    if final_zero:
        orders[-1] = 1
    return orders


@torch.no_grad()
def sample_dpmpp_2s(model: Model, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None,
                    noise_sampler: NoiseSampler | None = None, lower_order_final: bool = True) -> Tensor:
    """DPM-Solver++(2S), Lu et al. 2022, as diffusers' DPMSolverSinglestepScheduler(solver_order=2, midpoint).

    Steps pair up: from sigmas[i] a first-order step to sigmas[i + 1] only to evaluate the model there, then the
    single-step second-order update from sigmas[i] to sigmas[i + 2] with r = (lambda_{i+1} - lambda_i) /
    (lambda_{i+2} - lambda_i), lambda = -log sigma; order pattern from :func:`singlestep_orders`. When every odd
    sigma is the geometric mean of its neighbours this equals k-diffusion's ``sample_dpmpp_2s_ancestral(eta=0)``
    on the even sigmas. Deterministic: ``noise_sampler`` is ignored.
    """
    orders = singlestep_orders(len(sigmas) - 1, lower_order_final, bool(sigmas[-1] == 0))
    x_start, denoised_start, sigma_start = x, x, sigmas[0]
    for i, order in enumerate(orders):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma_batch(sigma, x))
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if order == 1:
            x_start, denoised_start, sigma_start = x, denoised, sigma
            if sigma_next == 0:
                x = denoised
            else:
                h = sigma.log() - sigma_next.log()
                x = (sigma_next / sigma) * x - (-h).expm1() * denoised
        else:
            h = sigma_start.log() - sigma_next.log()
            r = (sigma_start.log() - sigma.log()) / h
            target = (1 - 1 / (2 * r)) * denoised_start + (1 / (2 * r)) * denoised
            x = (sigma_next / sigma_start) * x_start - (-h).expm1() * target
    return x


__all__ = [
    "A1111", "Convention", "ConventionName", "ConventionSigmas", "DiffusersScheduler", "SigmaKind", "StartScale",
    "convention_denoiser", "diffusers_convention", "sample_dpmpp_2s", "singlestep_orders", "start_latent",
]
