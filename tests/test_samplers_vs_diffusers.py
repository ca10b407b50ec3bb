"""Sumie's k-diffusion-family samplers against diffusers' schedulers (0.42.1) run as StableDiffusionPipeline does.

One network ``net(x_in, t)`` (the exact eps or v of a small Gaussian mixture; t -> sigma by the training table) is
called by both sides. diffusers: ``latents = noise * init_noise_sigma``, ``scale_model_input``, ``net(..., t)``
with the scheduler's timestep, ``step(..., generator=...)``. Sumie: ``start_latent`` and ``convention_denoiser``
with :func:`diffusers_convention`, sigmas from ``schedules.diffusers_sigmas``. Stochastic steps get identical
noise: the scheduler module's ``randn_tensor`` is replaced by a list of draws that Sumie's noise_sampler hands out
too (diffusers draws one more, multiplied by 0, on the last step of Euler a and the DPMSolver SDEs).

Precision. Every one of these schedulers stores its sigmas as float32 (``astype(np.float32)``) and Euler,
Euler a and DPMSolverMultistep also cast the sample to float32 in ``step``, so stock diffusers is float32 only.
The fp64 tests run diffusers' own code with its ``np``/``torch`` module globals replaced by stand-ins whose
``float32`` is float64 (nothing else changes), which makes every one of its tensors float64; the stock float32
tests compare the unmodified schedulers with Sumie in float32. Linspace cases use 9 or 17 steps, where
999 / (steps - 1) is exact in float32, so the fp64 reference's timesteps equal the stock ones.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
)
from gaussian_mixture import IsotropicMixture
from torch import Tensor

from sumie.errors import ConfigError
from sumie.sampling.conventions import (
    A1111,
    Convention,
    ConventionSigmas,
    convention_denoiser,
    diffusers_convention,
    sample_dpmpp_2s,
    singlestep_orders,
    start_latent,
)
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.samplers.ancestral import (
    sample_dpm_2_ancestral,
    sample_dpmpp_2s_ancestral,
    sample_euler_ancestral,
)
from sumie.sampling.samplers.ode import sample_dpm_2, sample_dpmpp_2m, sample_euler, sample_heun, sample_lms
from sumie.sampling.samplers.sde import sample_dpmpp_2m_sde, sample_dpmpp_3m_sde
from sumie.sampling.schedules import diffusers_sigmas

SD = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SHAPE = (2, 3, 2, 2)
TOL64 = 1e-9
TOL32 = 1e-5


# ---------------------------------------------------------------- the toy network


class ToyNet:
    """eps- or v-prediction network on VP inputs x_in = x / sqrt(sigma^2 + 1), sigma = t_to_sigma(t) (log table)."""

    def __init__(self, ds: DiscreteSigmas, prediction: str) -> None:
        self.ds, self.prediction = ds, prediction
        self.mixture = IsotropicMixture(int(np.prod(SHAPE[1:])))
        self.ts: list[float] = []

    def __call__(self, x_in: Tensor, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t).reshape(-1).expand(x_in.shape[0])
        self.ts.append(float(t[0]))
        sigma = self.ds.t_to_sigma(t).to(x_in.dtype)
        s = sigma.reshape(-1, *[1] * (x_in.ndim - 1))
        x = x_in * (s**2 + 1) ** 0.5
        x0 = self.mixture(x, sigma)
        eps = (x - x0) / s
        if self.prediction == "eps":
            return eps
        return (eps - s * x0) / (s**2 + 1) ** 0.5  # v = alpha eps - sigma_vp x0


# ---------------------------------------------------------------- running diffusers


class Float64Module(types.ModuleType):
    """A module's stand-in whose ``float32`` is float64; every other attribute is the module's own."""

    def __init__(self, module: types.ModuleType, float64: Any) -> None:
        super().__init__(module.__name__)
        self._module, self._float64 = module, float64

    def __getattr__(self, name: str) -> Any:
        return self._float64 if name == "float32" else getattr(self._module, name)


def reference_in_float64(monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    """Run the scheduler class's module in float64 (its float32 constants become float64), for this test only."""
    module = inspect.getmodule(cls)
    monkeypatch.setattr(module, "np", Float64Module(np, np.float64))
    monkeypatch.setattr(module, "torch", Float64Module(torch, torch.float64))


class Draws:
    """A fixed list of standard normal draws handed out in order: diffusers' randn_tensor and Sumie's noise."""

    def __init__(self, n: int, dtype: torch.dtype, seed: int = 11) -> None:
        g = torch.Generator().manual_seed(seed)
        self.draws = [torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype) for _ in range(n)]
        self.used = 0

    def randn_tensor(self, shape: Any, generator: Any = None, device: Any = None, dtype: Any = None,
                     layout: Any = None) -> Tensor:
        assert tuple(shape) == SHAPE
        return self.sampler(None, None).to(dtype or torch.float32)

    def sampler(self, sigma: Tensor | None, sigma_next: Tensor | None) -> Tensor:
        self.used += 1
        return self.draws[self.used - 1]


def run_diffusers(sch: Any, net: ToyNet, noise: Tensor) -> Tensor:
    """StableDiffusionPipeline's denoising loop (no guidance), generator passed where step accepts one."""
    extra = {"generator": torch.Generator().manual_seed(0)} if "generator" in inspect.signature(sch.step).parameters \
        else {}
    latents = noise * sch.init_noise_sigma
    for t in sch.timesteps:
        model_in = sch.scale_model_input(latents, t)
        latents = sch.step(net(model_in, t), t, latents, **extra, return_dict=False)[0]
    return latents


def maxdiff(a: Tensor, b: Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """A diffusers scheduler configuration and the Sumie sampler (with options) that should equal it."""

    name: str  # diffusers_convention's scheduler name
    cls: type
    sampler: Callable[..., Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False

    @property
    def rule(self) -> str:
        return "dpmsolver" if self.name.startswith("dpmsolver") else "euler"


def _dpm(algo: str, order: int = 2, solver_type: str = "midpoint") -> dict[str, Any]:
    return {"algorithm_type": algo, "solver_order": order, "solver_type": solver_type}


CASES = {
    "euler": Case("euler", EulerDiscreteScheduler, sample_euler),
    "euler_a": Case("euler_ancestral", EulerAncestralDiscreteScheduler, sample_euler_ancestral, stochastic=True),
    "heun": Case("heun", HeunDiscreteScheduler, sample_heun),
    "dpm2": Case("kdpm2", KDPM2DiscreteScheduler, sample_dpm_2),
    "dpm2_a": Case("kdpm2_ancestral", KDPM2AncestralDiscreteScheduler, sample_dpm_2_ancestral, stochastic=True),
    "lms": Case("lms", LMSDiscreteScheduler, sample_lms),
    "dpmpp_2m": Case("dpmsolver_multistep", DPMSolverMultistepScheduler, sample_dpmpp_2m, _dpm("dpmsolver++")),
    "dpmpp_2m_heun": Case("dpmsolver_multistep", DPMSolverMultistepScheduler, sample_dpmpp_2m_sde,
                          _dpm("dpmsolver++", 2, "heun"), {"eta": 0.0, "solver_type": "heun"}),
    "dpmpp_2m_sde": Case("dpmsolver_multistep", DPMSolverMultistepScheduler, sample_dpmpp_2m_sde,
                         _dpm("sde-dpmsolver++"), {"solver_type": "midpoint"}, stochastic=True),
    "dpmpp_2m_sde_heun": Case("dpmsolver_multistep", DPMSolverMultistepScheduler, sample_dpmpp_2m_sde,
                              _dpm("sde-dpmsolver++", 2, "heun"), {"solver_type": "heun"}, stochastic=True),
    "dpmpp_3m": Case("dpmsolver_multistep", DPMSolverMultistepScheduler, sample_dpmpp_3m_sde,
                     _dpm("dpmsolver++", 3, "heun"), {"eta": 0.0}),
    "dpmpp_2s": Case("dpmsolver_singlestep", DPMSolverSinglestepScheduler, sample_dpmpp_2s, _dpm("dpmsolver++")),
}


def _kind(karras: bool | str) -> str:
    """True / False, or a sigma kind name ("exponential")."""
    return karras if isinstance(karras, str) else ("karras" if karras else "spacing")


def build(case: Case, spacing: str, karras: bool | str, prediction: str, steps: int) -> Any:
    config = {**SD, **case.config, "prediction_type": "epsilon" if prediction == "eps" else "v_prediction"}
    if _kind(karras) != "spacing":  # EulerAncestralDiscreteScheduler has no such options
        config[f"use_{_kind(karras)}_sigmas"] = True
    if case.name != "dpmsolver_singlestep":
        config |= {"timestep_spacing": spacing, "steps_offset": 1}
    sch = case.cls(**config)
    sch.set_timesteps(steps)
    return sch


def run_pair(case: Case, spacing: str, karras: bool | str, prediction: str, steps: int,
             dtype: torch.dtype) -> tuple[Tensor, Tensor, Any, int]:
    """(diffusers' final sample, Sumie's, the scheduler, noise draws Sumie used) on the same net and noise."""
    sch = build(case, spacing, karras, prediction, steps)
    if dtype == torch.float64:
        ds = DiscreteSigmas.from_betas("scaled_linear", 0.00085, 0.012, dtype=torch.float64)
        assert sch.alphas_cumprod.dtype == torch.float64
        assert maxdiff(ds.alphas_cumprod, sch.alphas_cumprod) < 1e-15  # same betas and cumprod as diffusers'
    else:
        ds = DiscreteSigmas(sch.alphas_cumprod)
    spacing_ = "linspace" if case.name == "dpmsolver_singlestep" else spacing
    kind = _kind(karras)
    _, sigmas = diffusers_sigmas(ds, steps, spacing_, steps_offset=1, use_karras=kind == "karras",
                                 use_exponential=kind == "exponential", rule=case.rule, dtype=dtype)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype)
    theirs_noise, ours_noise = Draws(2 * steps, dtype), Draws(2 * steps, dtype)
    net = ToyNet(ds, prediction)
    with pytest.MonkeyPatch.context() as mp:
        if case.stochastic:
            mp.setattr(inspect.getmodule(case.cls), "randn_tensor", theirs_noise.randn_tensor)
        ref = run_diffusers(sch, net, noise)
    conv = diffusers_convention(case.name, spacing_, kind)  # type: ignore[arg-type]
    model = convention_denoiser(prediction, ToyNet(ds, prediction), ds, conv, sigmas)
    kw = dict(case.options)
    if case.stochastic:
        kw["noise_sampler"] = ours_noise.sampler
    ours = case.sampler(model, start_latent(noise, sigmas, conv), sigmas, **kw)
    assert ours.dtype == dtype and ref.shape == ours.shape
    assert ours_noise.used <= theirs_noise.used
    return ref, ours, sch, ours_noise.used


SPACINGS = ["linspace", "leading", "trailing"]


def steps_for(spacing: str) -> int:
    return 9 if spacing == "linspace" else 10


# ---------------------------------------------------------------- fp64: the maths, step for step


FP64_CASES = [(case, spacing, karras) for case in ["euler", "euler_a", "heun", "dpm2", "dpm2_a", "lms", "dpmpp_2m",
                                                  "dpmpp_2m_sde"]
              for spacing in SPACINGS for karras in [False, True]
              if not (case == "euler_a" and karras) and not (case == "dpm2_a" and (karras or spacing == "linspace"))]


@pytest.mark.parametrize(("case", "spacing", "karras"), FP64_CASES)
def test_matches_diffusers_fp64(monkeypatch: pytest.MonkeyPatch, case: str, spacing: str, karras: bool) -> None:
    c = CASES[case]
    reference_in_float64(monkeypatch, c.cls)
    steps = steps_for(spacing)
    ref, ours, _, used = run_pair(c, spacing, karras, "eps", steps, torch.float64)
    assert maxdiff(ours, ref) < TOL64, (case, spacing, karras, maxdiff(ours, ref))
    if c.stochastic:
        assert used == steps - 1


@pytest.mark.parametrize(("spacing", "karras"), [("linspace", False), ("linspace", True), ("leading", True),
                                               ("trailing", True)])
def test_kdpm2_ancestral_midpoint_timesteps(monkeypatch: pytest.MonkeyPatch, spacing: str, karras: bool) -> None:
    """diffusers' KDPM2 ancestral evaluates the model twice at each sigma_{i+1} with two different timesteps.

    With eta = 1 the log-midpoint of sigma_i and sigma_down = sigma_{i+1}^2 / sigma_i is sigma_{i+1} itself;
    diffusers gives that midpoint call the log-interpolated t and the next step's call the schedule's timestep
    (rounded for Karras, the fractional linspace one otherwise), which no function of sigma can do. Sumie's
    convention gives both the schedule's timestep; with diffusers' midpoint timesteps set to those, the two agree
    in fp64. Unpatched: below 1e-5 without Karras, about 2e-3 with it.
    """
    c = CASES["dpm2_a"]
    reference_in_float64(monkeypatch, c.cls)
    steps = steps_for(spacing)
    ref, ours, _, _ = run_pair(c, spacing, karras, "eps", steps, torch.float64)
    assert 1e-7 < maxdiff(ours, ref) < (1e-2 if karras else TOL32), maxdiff(ours, ref)
    original = KDPM2AncestralDiscreteScheduler.set_timesteps

    def aligned(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.timesteps[1::2] = self.timesteps[2::2]  # each midpoint call gets the next step's timestep

    monkeypatch.setattr(KDPM2AncestralDiscreteScheduler, "set_timesteps", aligned)
    ref, ours, _, used = run_pair(c, spacing, karras, "eps", steps, torch.float64)
    assert maxdiff(ours, ref) < TOL64, maxdiff(ours, ref)
    assert used == steps - 1


@pytest.mark.parametrize(("case", "karras"), [("euler", False), ("euler", True), ("dpmpp_2m", False),
                                             ("dpmpp_2m", True), ("euler_a", False), ("heun", True),
                                             ("dpmpp_2m_sde", True)])
def test_v_prediction_fp64(monkeypatch: pytest.MonkeyPatch, case: str, karras: bool) -> None:
    reference_in_float64(monkeypatch, CASES[case].cls)
    ref, ours, _, _ = run_pair(CASES[case], "linspace", karras, "v", 9, torch.float64)
    assert maxdiff(ours, ref) < TOL64, maxdiff(ours, ref)


@pytest.mark.parametrize("case", ["dpmpp_2m_heun", "dpmpp_2m_sde_heun", "dpmpp_3m"])
@pytest.mark.parametrize("karras", [False, True])
def test_dpmsolver_variants_fp64(monkeypatch: pytest.MonkeyPatch, case: str, karras: bool) -> None:
    """solver_type="heun" (2M, 2M SDE) and order 3: equal to k-diffusion's 2M SDE / 3M SDE formulas (eta 0 or 1).

    Order 3 is only equal from 15 steps on (below, diffusers' lower_order_final makes the penultimate step second
    order) and only with solver_type="heun": diffusers' default "midpoint" warm-up step differs from 3M's.
    """
    reference_in_float64(monkeypatch, CASES[case].cls)
    ref, ours, _, _ = run_pair(CASES[case], "leading", karras, "eps", 16, torch.float64)
    assert maxdiff(ours, ref) < TOL64, maxdiff(ours, ref)


@pytest.mark.parametrize("case", ["euler", "heun", "dpm2", "lms", "dpmpp_2m", "dpmpp_2m_sde"])
def test_exponential_sigmas_fp64(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """use_exponential_sigmas: unrounded log timesteps (Euler family), truncated ones (DPMSolver, int64 cast)."""
    reference_in_float64(monkeypatch, CASES[case].cls)
    ref, ours, _, _ = run_pair(CASES[case], "leading", "exponential", "eps", 10, torch.float64)
    assert maxdiff(ours, ref) < TOL64, maxdiff(ours, ref)


@pytest.mark.parametrize("steps", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("karras", [False, True])
def test_dpmsolver_singlestep_fp64(monkeypatch: pytest.MonkeyPatch, steps: int, karras: bool) -> None:
    c = CASES["dpmpp_2s"]
    reference_in_float64(monkeypatch, c.cls)
    ref, ours, sch, _ = run_pair(c, "linspace", karras, "eps", steps, torch.float64)
    assert sch.order_list == singlestep_orders(steps)
    assert maxdiff(ours, ref) < TOL64, maxdiff(ours, ref)


def test_dpmpp_2s_is_2s_ancestral_at_midpoints() -> None:
    """With every odd sigma the geometric mean of its neighbours, sample_dpmpp_2s is k-diffusion's 2S (eta 0)."""
    ds = DiscreteSigmas.from_betas(dtype=torch.float64)
    outer = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.3, 0.05], dtype=torch.float64)
    mids = (outer[:-1] * outer[1:]).sqrt()
    sigmas = torch.stack([outer[:-1], mids], 1).flatten()
    sigmas = torch.cat([sigmas, outer[-1:], torch.zeros(1, dtype=torch.float64)])  # 2S pairs, then 0.05 -> 0
    assert singlestep_orders(len(sigmas) - 1) == [1, 2] * 5 + [1]
    model = convention_denoiser("eps", ToyNet(ds, "eps"), ds)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = sample_dpmpp_2s(model, noise * sigmas[0], sigmas)
    kd_sigmas = torch.cat([outer, torch.zeros(1, dtype=torch.float64)])
    theirs = sample_dpmpp_2s_ancestral(model, noise * sigmas[0], kd_sigmas, eta=0.0)
    assert maxdiff(ours, theirs) < 1e-12
    # and it is a real second-order method, not the first-order steps alone
    assert maxdiff(ours, sample_euler(model, noise * sigmas[0], sigmas)) > 1e-3


# ---------------------------------------------------------------- stock float32 diffusers


FP32_CASES = [(case, spacing, karras) for case in CASES for spacing in SPACINGS for karras in [False, True]
              if not (case == "euler_a" and karras) and not (case == "dpm2_a" and karras)
              and not (case == "dpmpp_2s" and spacing != "linspace")]


@pytest.mark.parametrize(("case", "spacing", "karras"), FP32_CASES)
def test_matches_stock_diffusers_fp32(case: str, spacing: str, karras: bool) -> None:
    """Unmodified (float32) schedulers against Sumie in float32 with the same float32 table and (bit-equal) sigmas.

    The fp64 runs of the same code agree to 1e-14, so what remains is float32 rounding order: measured up to
    2e-6 for the deterministic samplers and 2.5e-5 (|x| <= 2.3) for the stochastic ones, whose fresh noise does not
    damp earlier differences the way the ODE steps do.
    """
    c = CASES[case]
    ref, ours, sch, _ = run_pair(c, spacing, karras, "eps", 17 if spacing == "linspace" else 20, torch.float32)
    assert sch.sigmas.dtype == torch.float32 and ref.dtype == torch.float32
    _, sigmas = diffusers_sigmas(DiscreteSigmas(sch.alphas_cumprod), 17 if spacing == "linspace" else 20,
                                 spacing, use_karras=karras, rule=c.rule)
    if c.cls not in (HeunDiscreteScheduler, KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler):
        assert torch.equal(sigmas, sch.sigmas)
    assert maxdiff(ours, ref) < (5e-5 if c.stochastic else 5e-6), maxdiff(ours, ref)


def _sde_third_order_fixed(self: Any, model_output_list: list[Tensor], *args: Any, sample: Tensor,
                           noise: Tensor, **kwargs: Any) -> Tensor:
    """diffusers' sde-dpmsolver++ third-order multistep update with the D2 coefficient's "- 0.5" made "+ 0.5"."""
    i = self.step_index
    alphas_sigmas = [self._sigma_to_alpha_sigma_t(self.sigmas[j]) for j in (i + 1, i, i - 1, i - 2)]
    lam = [torch.log(a) - torch.log(s) for a, s in alphas_sigmas]
    (alpha_t, sigma_t), (_, sigma_s0) = alphas_sigmas[:2]
    m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
    h = lam[0] - lam[1]
    r0, r1 = (lam[1] - lam[2]) / h, (lam[2] - lam[3]) / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1, d2 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)
    e = torch.exp(-2.0 * h)
    return (sigma_t / sigma_s0 * torch.exp(-h) * sample + alpha_t * (1 - e) * m0
            + alpha_t * ((1 - e) / (-2.0 * h) + 1.0) * d1 + alpha_t * ((1 - e - 2.0 * h) / (2.0 * h) ** 2 + 0.5) * d2
            + sigma_t * torch.sqrt(1.0 - e) * noise)


@pytest.mark.parametrize("karras", [False, True])
def test_dpmsolver_order3_quirks(monkeypatch: pytest.MonkeyPatch, karras: bool) -> None:
    """Two ways diffusers' order 3 is not k-diffusion's 3M (SDE), both checked to be the only difference.

    * solver_type "midpoint" (the default) makes the warm-up second-order step differ (Sumie: use "heun");
    * sde-dpmsolver++ order 3 (added in diffusers PR #9104) has "- 0.5" where the D2 coefficient needs "+ 0.5"
      (its bracket does not vanish as h -> 0); with the sign fixed it is k-diffusion's 3M SDE to fp64 rounding.
    """
    reference_in_float64(monkeypatch, DPMSolverMultistepScheduler)
    midpoint = Case("dpmsolver_multistep", DPMSolverMultistepScheduler, sample_dpmpp_3m_sde,
                    _dpm("dpmsolver++", 3, "midpoint"), {"eta": 0.0})
    assert maxdiff(*run_pair(midpoint, "leading", karras, "eps", 16, torch.float64)[:2]) > 1e-6
    sde = Case("dpmsolver_multistep", DPMSolverMultistepScheduler, sample_dpmpp_3m_sde,
               _dpm("sde-dpmsolver++", 3, "heun"), stochastic=True)
    assert maxdiff(*run_pair(sde, "leading", karras, "eps", 16, torch.float64)[:2]) > 1e-2
    monkeypatch.setattr(DPMSolverMultistepScheduler, "multistep_dpm_solver_third_order_update", _sde_third_order_fixed)
    ref, ours, _, used = run_pair(sde, "leading", karras, "eps", 16, torch.float64)
    assert maxdiff(ours, ref) < TOL64, maxdiff(ours, ref)
    assert used == 15


# ---------------------------------------------------------------- sigmas, timesteps, start noise


def _plain(sch: Any) -> tuple[Tensor, Tensor]:
    """(timesteps, sigmas) of the schedule's main points (Heun/KDPM2 interleave repeats and midpoints)."""
    if isinstance(sch, HeunDiscreteScheduler):
        return sch.timesteps[0::2], torch.cat([sch.sigmas[:1], sch.sigmas[1::2]])
    if isinstance(sch, KDPM2DiscreteScheduler | KDPM2AncestralDiscreteScheduler):
        main = torch.cat([sch.sigmas[:1], sch.sigmas[1:-1:2]])
        return torch.cat([sch.timesteps[:1], sch.timesteps[2::2]]), main
    return sch.timesteps, sch.sigmas


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("case", ["euler", "heun", "dpm2", "dpm2_a", "lms", "dpmpp_2m", "dpmpp_2s"])
def test_sigmas_timesteps_and_start_scale(case: str, spacing: str, karras: bool) -> None:
    """diffusers_sigmas gives the stock scheduler's float32 sigmas; the convention gives its timesteps and start."""
    c = CASES[case]
    steps = 7 if spacing == "linspace" else 12  # 999 / 6 = 166.5: fractional linspace timesteps
    sch = build(c, spacing, karras, "eps", steps)
    ds = DiscreteSigmas(sch.alphas_cumprod)
    spacing_ = "linspace" if case == "dpmpp_2s" else spacing
    ts, sigmas = diffusers_sigmas(ds, steps, spacing_, steps_offset=1, use_karras=karras, rule=c.rule)
    their_ts, their_sigmas = _plain(sch)
    assert len(their_sigmas) == steps + 1
    assert sigmas[-1] == their_sigmas[-1] == 0
    assert maxdiff(sigmas[:-1] / their_sigmas[:-1], torch.ones(steps)) < 1e-6  # float32 ulps
    conv = diffusers_convention(c.name, spacing_, "karras" if karras else "spacing")
    # the timesteps the network sees: the convention's sigma_to_t of the scheduler's sigmas (and KDPM2 midpoints)
    cs = ConventionSigmas(ds, conv.timestep_mode, sigmas)
    ours_t = cs.sigma_to_t(their_sigmas[:-1].double())
    if conv.timestep_mode == "linear":
        assert maxdiff(ours_t, their_ts) < 2e-3  # float32 sigmas: inverse exact to the sigma's rounding
    else:
        assert maxdiff(ours_t, their_ts) < 1e-3
    if isinstance(sch, KDPM2DiscreteScheduler):  # midpoints (off the schedule) get the log-interpolated t
        mids = sch.sigmas_interpol[1::2][: steps - 1]
        assert maxdiff(cs.sigma_to_t(mids.double()), sch.timesteps[1::2]) < 1e-3
    start = start_latent(torch.ones(1, dtype=torch.float64), sigmas.double(), conv)
    init = float(sch.init_noise_sigma)
    if case.startswith("dpmpp"):
        assert init == 1.0 and conv.start_scale == "vp"  # VP latents: x_vp = noise, i.e. x = noise sqrt(s^2 + 1)
        init = float((sigmas[0].double() ** 2 + 1) ** 0.5)
    assert abs(float(start) - init) < 1e-5 * init


def test_linspace_sigmas_are_linear_in_t_not_log() -> None:
    """diffusers interpolates sigma linearly between table points (np.interp); DiscreteSigmas.t_to_sigma in log."""
    sch = EulerDiscreteScheduler(**SD)
    sch.set_timesteps(7)
    ds = DiscreteSigmas(sch.alphas_cumprod)  # diffusers' float32 table
    ts = sch.timesteps.double()
    assert (ts.frac() != 0).any()
    log_interp = ds.t_to_sigma(ts).double()
    lin = torch.from_numpy(np.interp(ts.numpy(), np.arange(1000), ds.sigmas.double().numpy()))
    assert maxdiff(lin.float(), sch.sigmas[:-1]) == 0.0
    assert maxdiff(log_interp / lin, torch.ones_like(lin)) > 1e-6  # log interpolation is a different schedule
    _, ours = diffusers_sigmas(ds, 7, "linspace", interpolation="linear", dtype=torch.float64)
    assert maxdiff(ours[:-1].float(), sch.sigmas[:-1]) == 0.0
    # the "linear" timestep mode inverts it: the scheduler's fractional timesteps come back
    assert maxdiff(ds.sigma_to_t(lin, mode="linear"), ts) < 1e-9
    assert maxdiff(ds.sigma_to_t(lin), ts) > 1e-4


def test_round_mode_is_not_quantize_at_ties() -> None:
    """round: np.round of the log-interpolated t (half to even); quantize: the nearest log sigma (first on ties)."""
    ds = DiscreteSigmas.from_betas(dtype=torch.float64)
    t = torch.tensor([0.5, 1.5, 10.25, 500.7, 998.5], dtype=torch.float64)
    sigma = ds.t_to_sigma(t)
    assert ds.sigma_to_t(sigma, mode="round").tolist() == [0.0, 2.0, 10.0, 501.0, 998.0]
    assert ds.sigma_to_t(sigma, mode="floor").tolist() == [0.0, 1.0, 10.0, 500.0, 998.0]
    assert ds.sigma_to_t(sigma, quantize=True).tolist()[2:4] == [10.0, 501.0]
    assert maxdiff(ds.sigma_to_t(sigma), t) < 1e-9  # the default (log) is unchanged and inverts t_to_sigma
    with pytest.raises(ConfigError):
        ds.sigma_to_t(sigma, mode="nearest")  # type: ignore[arg-type]


def test_convention_api() -> None:
    assert A1111 == Convention("a1111", "sigma", "log")
    noise = torch.randn(2, 4, dtype=torch.float64)
    sigmas = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64)
    assert torch.equal(start_latent(noise, sigmas), noise * 3.0)
    assert torch.allclose(start_latent(noise, sigmas, Convention("diffusers", "vp")), noise * 10**0.5)
    assert diffusers_convention("euler", "leading") == Convention("diffusers", "vp", "linear")
    assert diffusers_convention("euler", "linspace", "karras") == Convention("diffusers", "sigma", "log")
    assert diffusers_convention("kdpm2", "trailing", "karras").timestep_mode == "round"
    assert diffusers_convention("dpmsolver_multistep", "trailing") == Convention("diffusers", "vp", "round")
    assert diffusers_convention("dpmsolver_multistep", "leading", "exponential").timestep_mode == "floor"
    for bad in ({"name": "comfy"}, {"start_scale": "one"}, {"timestep_mode": "nearest"}):
        with pytest.raises(ConfigError):
            Convention(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        diffusers_convention("ddim")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        diffusers_convention("euler", sigma_kind="lu")
    # A1111 leaves the denoiser as it was; the log mode without a schedule is the plain DiscreteSigmas
    ds = DiscreteSigmas.from_betas(dtype=torch.float64)
    net = ToyNet(ds, "eps")
    assert convention_denoiser("eps", net, ds).schedule is ds
    s = torch.tensor([5.0, 0.7], dtype=torch.float64)
    assert torch.equal(ConventionSigmas(ds, "round").sigma_to_t(s), ds.sigma_to_t(s).round())
    assert singlestep_orders(6) == [1, 2, 1, 2, 1, 1] and singlestep_orders(5) == [1, 2, 1, 2, 1]
    assert singlestep_orders(4, lower_order_final=False, final_zero=False) == [1, 2, 1, 2]


def test_a1111_convention_differs_from_diffusers() -> None:
    """The options matter: DPM++ 2M Karras with A1111's start and timesteps is not diffusers' result."""
    sch = build(CASES["dpmpp_2m"], "leading", True, "eps", 10)
    ds = DiscreteSigmas(sch.alphas_cumprod.double())
    _, sigmas = diffusers_sigmas(ds, 10, "leading", use_karras=True, rule="dpmsolver", dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    conv = diffusers_convention("dpmsolver_multistep", "leading", "karras")
    out = {}
    for name, c in [("diffusers", conv), ("a1111", A1111), ("start_only", Convention("diffusers", "vp", "log"))]:
        model = convention_denoiser("eps", ToyNet(ds, "eps"), ds, c, sigmas)
        out[name] = sample_dpmpp_2m(model, start_latent(noise, sigmas, c), sigmas)
    assert maxdiff(out["diffusers"], out["a1111"]) > 1e-3
    assert maxdiff(out["diffusers"], out["start_only"]) > 1e-6  # rounding the timesteps matters too
