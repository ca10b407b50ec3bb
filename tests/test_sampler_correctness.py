"""Reference-free sampler correctness: every registered sampler must draw a known Gaussian mixture.

Data: ``GaussianMixture.default()`` in ``tests/gaussian_mixture.py`` - 3 components in 3 dimensions with
weights 0.5/0.3/0.2, isotropic and diagonal covariances (std 0.45-0.7), 5+ std apart. The model is its exact
denoiser E[x0 | x_sigma] (float64), for LCM the exact consistency function (probability-flow ODE endpoint), which
is what an LCM network approximates. Each sampler runs at a usual step count (``STEPS``) on SD's discretization
(``DiscreteSigmas.from_betas(dtype=float64)``) with its registry default schedule and flavor (both flavors where
A1111 and ComfyUI build different sigmas), on N = 16384 samples whose start is exact: x = x0 + sigma_max * z, with
x0 from the mixture (so the only errors are the sampler's). Noise: one seeded generator (white) or one Brownian
tree (DPM++ SDE family) for the whole batch.

Checks, each ``|statistic - target| <= Z * SE + allowance`` with Z = 4:

* mean (3 values; target exact, SE = std / sqrt(N)),
* covariance (6 values; target exact, SE from the 4th moments of a 400k exact reference sample),
* mixture weights: fraction of samples whose most probable component (at sigma = 0) is k (target and SE from the
  reference sample, binomial),
* per component variance relative to the reference's, per dimension (9 values; the discretization-sensitive
  one; SE from the reference's 4th moments).

SE combines the sample's and the reference's. ``ALLOWANCE`` is the discretization error a correct sampler has at
that step count, set to about twice the bias measured with 200,000 samples (first-order samplers at 20-30 steps
shrink narrow components by 10-20% in variance; Euler ancestral by about 27%). The mutation tests show that a
sign error, a wrong noise scale, missing noise or a wrong multistep coefficient break these bounds. The run is
seeded, so a result never flips between runs.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from gaussian_mixture import GaussianMixture
from torch import Tensor

from sumie.sampling import registry
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.noise import BrownianNoise, ImageRNG
from sumie.sampling.samplers.common import ancestral_step, sigma_batch, to_d

N = 2**14
REFERENCE_N = 400_000
Z = 4.0
F64 = torch.float64

# Usual step counts: 20 for the two-evaluation samplers, 30 for first-order ones, 25 otherwise; LCM 4; DDPM 50.
STEPS = {"heun": 20, "dpm_2": 20, "dpm_2_ancestral": 20, "dpmpp_2s_ancestral": 20, "dpmpp_sde": 20, "restart": 20,
         "euler": 30, "euler_ancestral": 30, "ddim": 30, "ddpm": 50, "lcm": 4}


@dataclass(frozen=True)
class Allowance:
    """Discretization allowance: mean (abs), covariance (abs), weight (abs), component variance (relative)."""

    mean: float
    cov: float
    frac: float
    cvar: float


# About twice the bias measured at 200k samples (see the module docstring), with floors 0.01/0.02/0.003/0.02.
ALLOWANCE: dict[str, Allowance] = {
    "euler": Allowance(0.03, 0.30, 0.010, 0.28),
    "euler_ancestral": Allowance(0.06, 0.38, 0.025, 0.55),
    "heun": Allowance(0.01, 0.03, 0.003, 0.06),
    "dpm_2": Allowance(0.01, 0.02, 0.003, 0.03),
    "dpm_2_ancestral": Allowance(0.01, 0.17, 0.003, 0.12),
    "lms": Allowance(0.01, 0.04, 0.003, 0.03),
    "dpmpp_2s_ancestral": Allowance(0.03, 0.10, 0.012, 0.11),
    "dpmpp_2m": Allowance(0.01, 0.03, 0.003, 0.07),
    "dpmpp_sde": Allowance(0.02, 0.06, 0.008, 0.07),
    "dpmpp_2m_sde": Allowance(0.02, 0.11, 0.007, 0.08),
    "dpmpp_2m_sde_heun": Allowance(0.02, 0.18, 0.005, 0.12),
    "dpmpp_3m_sde": Allowance(0.01, 0.02, 0.003, 0.07),
    "restart": Allowance(0.01, 0.11, 0.003, 0.09),
    "ddim": Allowance(0.03, 0.29, 0.009, 0.25),
    "ddpm": Allowance(0.04, 0.25, 0.016, 0.40),
    "plms": Allowance(0.01, 0.02, 0.003, 0.02),
    "uni_pc": Allowance(0.01, 0.09, 0.003, 0.30),
    "uni_pc_bh2": Allowance(0.01, 0.09, 0.003, 0.31),
    "lcm": Allowance(0.01, 0.02, 0.003, 0.03),
}


@dataclass(frozen=True)
class Target:
    """What a correct sampler must reproduce, with the standard error of each statistic for N samples."""

    mean: Tensor
    mean_se: Tensor
    cov: Tensor
    cov_se: Tensor
    frac: Tensor
    frac_se: Tensor
    cvar: Tensor
    cvar_se: Tensor  # relative


def _component_stats(gm: GaussianMixture, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(fractions [K], variances [K, d], 4th central moments [K, d]) of x grouped by most probable component."""
    labels = gm.assign(x)
    k = gm.weights.shape[0]
    frac = torch.bincount(labels, minlength=k).to(F64) / x.shape[0]
    var, m4 = [], []
    for j in range(k):
        xs = x[labels == j]
        c = xs - xs.mean(0)
        var.append(c.pow(2).mean(0))
        m4.append(c.pow(4).mean(0))
    return frac, torch.stack(var), torch.stack(m4)


@functools.cache
def mixture() -> GaussianMixture:
    """The target distribution of every test here."""
    return GaussianMixture.default()


@functools.cache
def target() -> Target:
    """Exact moments and a 400k-sample reference for the assignment statistics."""
    gm = mixture()
    ref, _ = gm.sample(REFERENCE_N, torch.Generator().manual_seed(20260601))
    mean, cov = gm.mean(), gm.covariance()
    c = ref - mean
    prod = c[:, :, None] * c[:, None, :]
    both = 1 / N + 1 / REFERENCE_N
    frac, var, m4 = _component_stats(gm, ref)
    n_k = frac * N
    var_se = ((m4 - var**2) * (1 / n_k + 1 / (frac * REFERENCE_N))[:, None]).sqrt() / var
    return Target(mean, cov.diagonal().sqrt() / math.sqrt(N), cov, (prod.var(0) * both).sqrt(),
                  frac, (frac * (1 - frac) * both).sqrt(), var, var_se)


def check(samples: Tensor, allow: Allowance) -> list[str]:
    """Every statistic outside ``Z * SE + allowance``, as readable lines (empty: the samples pass)."""
    t, gm = target(), mixture()
    x = samples.to(F64)
    if not bool(torch.isfinite(x).all()):
        return ["non-finite samples"]
    frac, var, _ = _component_stats(gm, x)
    rows = [
        ("mean", x.mean(0), t.mean, t.mean_se, allow.mean),
        ("cov", torch.cov(x.T), t.cov, t.cov_se, allow.cov),
        ("weight", frac, t.frac, t.frac_se, allow.frac),
        ("component var (rel)", var / t.cvar, torch.ones_like(t.cvar), t.cvar_se, allow.cvar),
    ]
    bad = []
    for name, got, want, se, extra in rows:
        bound = Z * se + extra
        err = (got - want).abs()
        if bool((err > bound).any()):
            i = int((err - bound).argmax())
            bad.append(f"{name}: |{float(got.flatten()[i]):.4f} - {float(want.flatten()[i]):.4f}| = "
                       f"{float(err.flatten()[i]):.4f} > {float(bound.flatten()[i]):.4f} (Z*SE + allowance)")
    return bad


@functools.cache
def discretization() -> DiscreteSigmas:
    """SD's discretization in float64."""
    return DiscreteSigmas.from_betas(dtype=F64)


def batch_noise(brownian: bool, sigmas: Tensor, seed: int) -> Callable[..., Tensor]:
    """One seeded noise source for the whole [N, d] batch: a Brownian tree or white noise."""
    shape = (N, mixture().dim)
    if brownian:
        tree = BrownianNoise([seed], shape, float(sigmas[sigmas > 0].min()), float(sigmas.max()), dtype=F64)
        return lambda s, s_next: tree(s, s_next)[0]
    rng = ImageRNG([seed], shape, dtype=F64)
    return lambda s=None, s_next=None: rng()[0]


def draw(spec: registry.SamplerSpec, steps: int, *, seed: int = 1, sampler: Callable[..., Tensor] | None = None,
         **options: object) -> Tensor:
    """N samples from a spec (or a stand-in ``sampler`` function) started from the exact marginal at sigma_max."""
    gm = mixture()
    sigmas = registry.make_sigmas(spec, spec.default_schedule, discretization(), steps, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    x0, _ = gm.sample(N, g)
    x = x0 + sigmas[0] * torch.randn(x0.shape, generator=g, dtype=F64)
    model = gm.flow if spec.name == "lcm" else gm.denoise
    noise = batch_noise(spec.needs_brownian, sigmas, seed + 1000)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Should have", category=UserWarning)  # torchsde float32 ends
        if sampler is not None:
            return sampler(model, x, sigmas, noise_sampler=noise, **options)
        return spec(model, x, sigmas, noise_sampler=noise, **options)


def _cases() -> list[tuple[str, str]]:
    """Each sampler in A1111's flavor (if it has an A1111 name), plus ComfyUI's where its sigmas differ."""
    cases = []
    for spec in registry.SAMPLERS:
        differs = (spec.discard_a1111, spec.tail_a1111) != (spec.discard_comfyui, spec.tail_comfyui)
        if spec.a1111:
            cases.append((spec.name, "a1111"))
        if spec.comfyui and (differs or not spec.a1111):
            cases.append((spec.name, "comfyui"))
    return cases


def test_every_sampler_has_a_step_count_and_allowance() -> None:
    assert set(ALLOWANCE) == set(registry.sampler_names())
    assert set(STEPS) <= set(ALLOWANCE)


@pytest.mark.parametrize(("name", "flavor"), _cases())
def test_sampler_draws_the_mixture(name: str, flavor: str) -> None:
    spec = registry.get_sampler(name, flavor)  # type: ignore[arg-type]
    samples = draw(spec, STEPS.get(name, 25))
    assert samples.shape == (N, mixture().dim) and samples.dtype == F64
    assert check(samples, ALLOWANCE[name]) == []


# --- the checks have power: broken samplers fail them ---


@torch.no_grad()
def _euler_sign_error(model, x, sigmas, *, noise_sampler=None):  # noqa: ANN001, ANN202 - sampler contract
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigma_batch(sigmas[i], x)))
        x = x - d * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def _euler_ancestral_noise_as_sigma_next(model, x, sigmas, *, noise_sampler=None):  # noqa: ANN001, ANN202
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        down, _ = ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]  # should be sigma_up
    return x


@torch.no_grad()
def _dpmpp_2m_history_swapped(model, x, sigmas, *, noise_sampler=None):  # noqa: ANN001, ANN202
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigma_batch(sigmas[i], x))
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            d = denoised
        else:
            r = (t + sigmas[i - 1].log()) / h
            d = (1 + 1 / (2 * r)) * old - (1 / (2 * r)) * denoised  # old and new denoised swapped
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * d
        old = denoised
    return x


@torch.no_grad()
def _lcm_renoise_to_current_sigma(model, x, sigmas, *, noise_sampler=None):  # noqa: ANN001, ANN202
    for i in range(len(sigmas) - 1):
        x = model(x, sigma_batch(sigmas[i], x))
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i]  # should be sigmas[i + 1]
    return x


MUTANTS: dict[str, tuple[str, dict]] = {
    "euler, derivative sign flipped": ("euler", {"sampler": _euler_sign_error}),
    "euler_ancestral, noise std sigma_next instead of sigma_up": (
        "euler_ancestral", {"sampler": _euler_ancestral_noise_as_sigma_next}),
    "euler_ancestral, noise scaled by 1.5": ("euler_ancestral", {"s_noise": 1.5}),
    "euler_ancestral, noise scaled by 0.8": ("euler_ancestral", {"s_noise": 0.8}),
    "dpm_2_ancestral, noise scaled by 0.8": ("dpm_2_ancestral", {"s_noise": 0.8}),
    "dpmpp_2m_sde, noise scaled by 0.8": ("dpmpp_2m_sde", {"s_noise": 0.8}),
    "dpmpp_sde, noise scaled by 1.2": ("dpmpp_sde", {"s_noise": 1.2}),
    "dpmpp_2m, old and new denoised swapped": ("dpmpp_2m", {"sampler": _dpmpp_2m_history_swapped}),
    "lcm, re-noised to the current sigma": ("lcm", {"sampler": _lcm_renoise_to_current_sigma}),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_broken_sampler_fails(mutant: str) -> None:
    name, options = MUTANTS[mutant]
    spec = registry.get_sampler(name, "a1111")
    assert check(draw(spec, STEPS.get(name, 25), **options), ALLOWANCE[name]) != []


# --- determinism: per-image noise through ImageRNG / BrownianNoise ---


def _toy_model(x: Tensor, sigma: Tensor) -> Tensor:
    """An elementwise denoiser (each image independent of the batch, bit for bit)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x / (1 + s**2) ** 0.5) * 0.8


def _run_seeds(name: str, seeds: list[int], steps: int = 12) -> Tensor:
    spec = registry.get_sampler(name)
    shape = (4, 6, 5)
    sigmas = registry.make_sigmas(spec, spec.default_schedule, DiscreteSigmas.from_betas(), steps)
    rng = ImageRNG(seeds, shape)
    x = rng.first() * sigmas[0]
    noise = registry.make_noise_sampler(spec, seeds, shape, sigmas, rng=rng)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
        return spec(_toy_model, x, sigmas, noise_sampler=noise)


DETERMINISM = ["euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "restart", "lcm"]


@pytest.mark.parametrize("name", DETERMINISM)
def test_same_seed_is_bit_identical(name: str) -> None:
    a, b = _run_seeds(name, [11, 12]), _run_seeds(name, [11, 12])
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("name", DETERMINISM)
def test_batch_image_equals_the_same_seed_alone(name: str) -> None:
    seeds = [5, 1234, 99]
    batch = _run_seeds(name, seeds)
    for i, s in enumerate(seeds):
        assert torch.equal(batch[i], _run_seeds(name, [s])[0]), f"image {i} (seed {s}) differs from its own run"


def test_noise_sampler_kinds() -> None:
    sigmas = registry.make_sigmas(registry.get_sampler("dpmpp_2m_sde"), "karras", DiscreteSigmas.from_betas(), 10)
    assert isinstance(registry.make_noise_sampler(registry.get_sampler("dpmpp_2m_sde"), [1], (2,), sigmas),
                      BrownianNoise)
    assert isinstance(registry.make_noise_sampler(registry.get_sampler("euler_ancestral"), [1], (2,), sigmas),
                      ImageRNG)
    # A fresh white-noise sampler continues after the initial noise instead of repeating it (A1111's ImageRNG).
    rng = ImageRNG([3], (4,))
    first = rng.first()
    fresh = registry.make_noise_sampler(registry.get_sampler("euler_ancestral"), [3], (4,), sigmas)
    step_noise = fresh(sigmas[0], sigmas[1])
    assert torch.equal(step_noise, rng()) and not torch.equal(step_noise, first)
