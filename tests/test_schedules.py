"""Schedules and img2img starts against k-diffusion, scipy and the A1111 / ComfyUI formulas (diffusers: its own file).

A1111 and ComfyUI are not installable here: their schedule functions are re-typed below (``_a1111_*``,
``_comfy_*``) from A1111 1.10 ``modules/sd_schedulers.py`` / ``sd_samplers_common.py`` and ComfyUI
``comfy/samplers.py`` / ``comfy_extras/nodes_align_your_steps.py``, with numpy, scipy and k-diffusion objects
where the originals use them, so that Sumie's own implementation is compared with the reference arithmetic.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import scipy.stats
import torch
from reference_kdiffusion import load

from sumie.errors import ConfigError
from sumie.sampling import schedules as S
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.img2img import img2img_plan, img2img_sigmas, noise_latent

STEPS = [1, 2, 3, 7, 10, 11, 20, 25, 30, 50, 64, 999]
# The Align Your Steps tables as the references publish them (typed from their sources, not Sumie's copies):
# ComfyUI comfy_extras/nodes_align_your_steps.py NOISE_LEVELS, A1111 1.10 modules/sd_schedulers.py (3 decimals).
AYS_COMFYUI_REF = {
    "sd1": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
            0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "sdxl": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
}
AYS_A1111_REF = {
    "sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.fixture(scope="module")
def ks():
    return load()


@pytest.fixture(scope="module")
def ds32() -> DiscreteSigmas:
    return DiscreteSigmas.from_betas()


@pytest.fixture(scope="module")
def ds64() -> DiscreteSigmas:
    return DiscreteSigmas.from_betas(dtype=torch.float64)


def maxdiff(a: torch.Tensor, b) -> float:
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64) if not isinstance(b, torch.Tensor) else b.double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b).abs().max().item() if a.numel() else 0.0


# --- k-diffusion ---


@pytest.mark.parametrize("n", STEPS)
def test_range_schedules_equal_kdiffusion(ks, ds32, n):
    sampling, _ = ks
    lo, hi = ds32.sigma_min.item(), ds32.sigma_max.item()
    assert torch.equal(S.karras(n, lo, hi), sampling.get_sigmas_karras(n, lo, hi))
    assert torch.equal(S.karras(n, 0.1, 10, rho=5.0), sampling.get_sigmas_karras(n, 0.1, 10, rho=5.0))
    assert torch.equal(S.exponential(n, lo, hi), sampling.get_sigmas_exponential(n, lo, hi))
    for rho in (1.0, 0.5, 2.5):
        assert torch.equal(S.polyexponential(n, lo, hi, rho), sampling.get_sigmas_polyexponential(n, lo, hi, rho))
    for fn in (S.karras(n, lo, hi), S.exponential(n, lo, hi), S.polyexponential(n, lo, hi)):
        assert fn.dtype == torch.float32 and fn.shape == (n + 1,) and fn[-1] == 0 and fn[0] == pytest.approx(hi)


def test_range_schedules_float64(ks, ds64):
    sampling, _ = ks
    lo, hi = ds64.sigma_min.item(), ds64.sigma_max.item()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # k-diffusion builds its ramps with the default dtype
    try:
        refs = [
            sampling.get_sigmas_karras(20, lo, hi),
            sampling.get_sigmas_exponential(20, lo, hi),
            sampling.get_sigmas_polyexponential(20, lo, hi, 2.0),
        ]
    finally:
        torch.set_default_dtype(prev)
    ours = [
        S.karras(20, lo, hi, dtype=torch.float64),
        S.exponential(20, lo, hi, dtype=torch.float64),
        S.polyexponential(20, lo, hi, 2.0, dtype=torch.float64),
    ]
    for o, r in zip(ours, refs, strict=True):
        assert o.dtype == torch.float64 and maxdiff(o, r) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_equals_kdiffusion_get_sigmas_and_a1111_comfy_normal(ks, dtype):
    _, external = ks
    ds = DiscreteSigmas.from_betas(dtype=dtype)
    ref = external.DiscreteSchedule(ds.sigmas, quantize=False)
    quant = external.DiscreteSchedule(ds.sigmas, quantize=True)
    for n in STEPS:
        ours = S.normal(ds, n, dtype=dtype)
        assert torch.equal(ours, ref.get_sigmas(n)), n
        # A1111 normal_scheduler / sgm_uniform: t from (unquantised) sigma_to_t of sigma_max and sigma_min.
        start, end = ref.sigma_to_t(ref.sigma_max), ref.sigma_to_t(ref.sigma_min)
        a1111 = torch.stack([ref.t_to_sigma(t) for t in torch.linspace(start, end, n)] + [torch.zeros((), dtype=dtype)])
        assert torch.equal(ours, a1111)
        sgm = torch.stack(
            [ref.t_to_sigma(t) for t in torch.linspace(start, end, n + 1)[:-1]] + [torch.zeros((), dtype=dtype)]
        )
        assert torch.equal(S.sgm_uniform(ds, n, dtype=dtype), sgm)
        # ComfyUI normal: quantised timestep() of sigma_max / sigma_min (argmin -> 999 and 0).
        qs, qe = quant.sigma_to_t(quant.sigma_max), quant.sigma_to_t(quant.sigma_min)
        assert (int(qs), int(qe)) == (999, 0)
        comfy = torch.stack([ref.t_to_sigma(t) for t in torch.linspace(qs, qe, n)] + [torch.zeros((), dtype=dtype)])
        assert torch.equal(ours, comfy)


# --- ComfyUI / A1111 table schedules (re-typed reference formulas) ---


def _comfy_simple(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    ss = len(sigmas) / steps
    return torch.FloatTensor([float(sigmas[-(1 + int(x * ss))]) for x in range(steps)] + [0.0])


def _comfy_ddim(sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    sigs, ss, x = [], max(len(sigmas) // steps, 1), 1
    while x < len(sigmas):
        sigs.append(float(sigmas[x]))
        x += ss
    return torch.FloatTensor(sigs[::-1] + [0.0])


def _comfy_beta(sigmas: torch.Tensor, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(scipy.stats.beta.ppf(ts, alpha, beta) * (len(sigmas) - 1))
    sigs, last = [], -1
    for t in ts:
        if t != last:
            sigs.append(float(sigmas[int(t)]))
        last = t
    return torch.FloatTensor(sigs + [0.0])


def _beta_linear(n: int, lo: float, hi: float, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    ts = [scipy.stats.beta.ppf(x, alpha, beta) for x in 1 - np.linspace(0, 1, n)]
    return torch.FloatTensor([lo + x * (hi - lo) for x in ts] + [0.0])


def _comfy_kl(n: int, lo: float, hi: float) -> torch.Tensor:
    adj = torch.arange(n, dtype=torch.float).div_(n - 1)
    sig = adj.new_zeros(n + 1)
    sig[:-1] = (adj * math.atan(lo) + (1 - adj) * math.atan(hi)).tan_()
    return sig


def _a1111_kl(n: int, lo: float, hi: float) -> torch.Tensor:
    amin, amax = torch.arctan(torch.tensor(lo)), torch.arctan(torch.tensor(hi))
    i = torch.arange(n + 1)
    return torch.tan(i / n * amin + (1.0 - i / n) * amax)


def _loglinear(t_steps, num):
    xs = np.linspace(0, 1, len(t_steps))
    ys = np.log(t_steps[::-1])
    return np.exp(np.interp(np.linspace(0, 1, num), xs, ys))[::-1].copy()


def _comfy_ays(levels, steps):
    sig = list(levels)
    if steps + 1 != len(sig):
        sig = _loglinear(sig, steps + 1)
    sig[-1] = 0
    return torch.FloatTensor(sig)


def _a1111_ays(levels, n):
    sig = list(levels)
    sig = np.append(_loglinear(sig, n), [0.0]) if n != len(sig) else sig + [0.0]
    return torch.FloatTensor(sig)


def _comfy_linear_quadratic(steps, sigma_max, threshold_noise=0.025, linear_steps=None):
    if steps == 1:
        sched = [1.0, 0.0]
    else:
        linear_steps = steps // 2 if linear_steps is None else linear_steps
        lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        diff = linear_steps - threshold_noise * steps
        q = steps - linear_steps
        qc = diff / (linear_steps * q**2)
        lc = threshold_noise / linear_steps - 2 * diff / (q**2)
        c = qc * (linear_steps**2)
        sched = [1.0 - x for x in lin + [qc * (i**2) + lc * i + c for i in range(linear_steps, steps)] + [1.0]]
    return torch.FloatTensor(sched) * sigma_max


@pytest.mark.parametrize("n", STEPS)
def test_table_schedules_equal_comfyui(ds32, n):
    table = ds32.sigmas
    lo, hi = ds32.sigma_min.item(), ds32.sigma_max.item()
    assert torch.equal(S.simple(ds32, n), _comfy_simple(table, n))
    assert torch.equal(S.ddim_uniform(ds32, n), _comfy_ddim(table, n))
    assert torch.equal(S.beta_comfyui(ds32, n), _comfy_beta(table, n))
    assert torch.equal(S.linear_quadratic(ds32, n), _comfy_linear_quadratic(n, table[-1]))
    if n > 1:  # ComfyUI's kl_optimal divides by n - 1
        assert maxdiff(S.kl_optimal_comfyui(n, lo, hi), _comfy_kl(n, lo, hi)) <= 1e-6
    assert maxdiff(S.kl_optimal_a1111(n, lo, hi), _a1111_kl(n, lo, hi)) <= 1e-6
    assert maxdiff(S.beta_a1111(n, lo, hi), _beta_linear(n, lo, hi)) <= 1e-6
    for fam in ("sd1", "sdxl"):
        assert maxdiff(S.align_your_steps_comfyui(n, fam), _comfy_ays(AYS_COMFYUI_REF[fam], n)) <= 1e-6
        assert maxdiff(S.align_your_steps_a1111(n, fam), _a1111_ays(AYS_A1111_REF[fam], n)) <= 1e-6


def test_schedule_shapes_and_quirks(ds32):
    lo, hi = ds32.sigma_min.item(), ds32.sigma_max.item()
    # ddim_uniform's stride can give more steps than asked; ComfyUI's beta drops repeated timesteps.
    assert len(S.ddim_uniform(ds32, 30)) == 32 and len(S.ddim_uniform(ds32, 20)) == 21
    assert len(S.beta_comfyui(ds32, 500)) < 501
    # A1111's KL Optimal ends at sigma_min, ComfyUI's at 0.
    assert S.kl_optimal_a1111(10, lo, hi)[-1].item() == pytest.approx(lo, rel=1e-6)
    assert S.kl_optimal_comfyui(10, lo, hi)[-1] == 0
    assert S.kl_optimal_comfyui(1, lo, hi).tolist() == pytest.approx([hi, 0.0], rel=1e-6)
    # AYS at its native 10 steps is NVIDIA's table (ComfyUI: last level replaced by 0; A1111 at 11: table + 0).
    assert S.align_your_steps_comfyui(10, "sd15")[:-1].tolist() == pytest.approx(AYS_COMFYUI_REF["sd1"][:-1])
    assert S.align_your_steps_a1111(11, "SDXL")[:-1].tolist() == pytest.approx(AYS_A1111_REF["sdxl"])
    with pytest.raises(ConfigError, match="sdxl"):
        S.align_your_steps_comfyui(10, "flux")
    for n in (1, 5, 20):
        for name in S.schedule_names():
            sig = S.make_sigmas(name, ds32, n)
            assert sig.ndim == 1 and sig.dtype == torch.float32 and torch.all(sig[:-1] >= sig[1:]), name
            assert sig[-1] == 0 or name in ("kl_optimal", "kl_optimal_a1111"), name
    ds64 = DiscreteSigmas.from_betas(dtype=torch.float64)
    for name in S.schedule_names():
        assert S.make_sigmas(name, ds64, 7, dtype=torch.float64).dtype == torch.float64, name


def test_beta_ppf_matches_scipy():
    rng = np.random.default_rng(0)
    worst = 0.0
    for a, b in [(0.6, 0.6), (0.5, 0.7), (2.0, 3.0), (0.3, 0.3), (1.0, 1.0), (5.0, 0.5), (20.0, 30.0), (0.1, 0.9)]:
        ps = np.concatenate(
            [rng.random(60), [1e-12, 1e-6, 0.5, 1 - 1e-6, 1 - 1e-12], 1 - np.linspace(0, 1, 40, endpoint=False)]
        )
        for p in ps:
            x = S.beta_ppf(float(p), a, b)
            worst = max(worst, abs(x - scipy.stats.beta.ppf(p, a, b)))
            if 0.0 < x < 1.0 and p < 0.999:
                assert abs(S.beta_cdf(x, a, b) - p) < 1e-12
    assert worst < 1e-10
    assert (S.beta_ppf(0.0, 0.6, 0.6), S.beta_ppf(1.0, 0.6, 0.6)) == (0.0, 1.0)
    with pytest.raises(ConfigError):
        S.beta_ppf(0.5, 0.0, 1.0)


def test_comfy_beta_rounding_many_step_counts(ds32):
    # Every step count picks the same table rows as scipy-based ComfyUI, incl. the default's p = 0.5 tie (even n).
    for alpha, beta in [(0.6, 0.6), (0.7, 0.4), (0.3, 0.8), (2.0, 2.0)]:
        for n in range(1, 121):
            assert torch.equal(S.beta_comfyui(ds32, n, alpha, beta), _comfy_beta(ds32.sigmas, n, alpha, beta)), n
    # Known divergence: with alpha == beta, ppf(0.5) * 999 = 499.5 is an exact rint tie that scipy's last-bit noise
    # decides (0.5 -> 499 there); Sumie's exact 0.5 rounds to 500. Odd n never hit p = 0.5 and agree.
    for n in range(1, 121, 2):
        assert torch.equal(S.beta_comfyui(ds32, n, 0.5, 0.5), _comfy_beta(ds32.sigmas, n, 0.5, 0.5)), n
    ours, ref = S.beta_comfyui(ds32, 2, 0.5, 0.5), _comfy_beta(ds32.sigmas, 2, 0.5, 0.5)
    assert ours[1] == ds32.sigmas[500] and ref[1] == ds32.sigmas[499]


# --- names ---


A1111_LABELS = [
    "Automatic",
    "Uniform",
    "Karras",
    "Exponential",
    "Polyexponential",
    "SGM Uniform",
    "KL Optimal",
    "Align Your Steps",
    "Simple",
    "Normal",
    "DDIM",
    "Beta",
]
COMFY_NAMES = [
    "normal",
    "karras",
    "exponential",
    "sgm_uniform",
    "simple",
    "ddim_uniform",
    "beta",
    "linear_quadratic",
    "kl_optimal",
]


def test_names_resolve(ds32):
    for name in A1111_LABELS + COMFY_NAMES + ["SGMUniform", "KARRAS", "sgm-uniform"]:
        assert callable(S.get_schedule(name)) and callable(S.get_schedule(name, "comfyui"))
    lo, hi = ds32.sigma_min.item(), ds32.sigma_max.item()
    assert torch.equal(S.make_sigmas("Beta", ds32, 10), S.beta_a1111(10, lo, hi))
    assert torch.equal(S.make_sigmas("beta", ds32, 10, flavor="comfyui"), S.beta_comfyui(ds32, 10))
    assert torch.equal(S.make_sigmas("kl_optimal", ds32, 10, flavor="comfyui"), S.kl_optimal_comfyui(10, lo, hi))
    assert torch.equal(S.make_sigmas("Align Your Steps", ds32, 12, family="sdxl"), S.align_your_steps_a1111(12, "sdxl"))
    assert torch.equal(S.make_sigmas("Karras", ds32, 10, rho=5.0), S.karras(10, lo, hi, 5.0))
    assert torch.equal(S.make_sigmas("DDIM", ds32, 10), S.ddim_uniform(ds32, 10))
    assert torch.equal(S.make_sigmas("Uniform", ds32, 10), S.normal(ds32, 10))
    # "Automatic" follows the A1111 sampler's default schedule, and DPM2 discards the penultimate sigma.
    assert torch.equal(S.make_sigmas("Automatic", ds32, 10, sampler="Euler"), S.normal(ds32, 10))
    assert torch.equal(S.make_sigmas("Automatic", ds32, 10, sampler="DPM++ 2M"), S.karras(10, lo, hi))
    assert torch.equal(S.make_sigmas("automatic", ds32, 10, sampler="DPM++ 2M SDE"), S.exponential(10, lo, hi))
    dpm2 = S.make_sigmas("Automatic", ds32, 10, sampler="DPM2")
    full = S.karras(11, lo, hi)
    assert len(dpm2) == 11 and torch.equal(dpm2, torch.cat([full[:-2], full[-1:]]))
    with pytest.raises(ConfigError, match="karras") as err:
        S.get_schedule("cosine")
    assert "sgm_uniform" in str(err.value) and "linear_quadratic" in str(err.value)
    with pytest.raises(ConfigError):
        S.get_schedule("karras", flavor="invoke")
    with pytest.raises(ConfigError):
        S.make_sigmas("karras", ds32, 0)
    with pytest.raises(ConfigError):
        S.diffusers_sigmas(ds32, 10, "uniform")
    with pytest.raises(ConfigError):
        S.diffusers_sigmas(ds32, 10, use_karras=True, use_beta=True)
    assert isinstance(S.SCHEDULES, types.MappingProxyType)
    # Adapters carry their canonical name, and canonical names resolve to themselves in either flavor.
    canonical = {fn.__name__ for fn in S.SCHEDULES.values()}
    assert len(canonical) == 16 and "beta_comfyui" in canonical and "normal" in canonical
    for c in canonical:
        assert S.get_schedule(c).__name__ == c and S.get_schedule(c, "comfyui").__name__ == c
    assert S.get_schedule("AlignYourStepsScheduler").__name__ == "align_your_steps_comfyui"
    assert (
        S.get_schedule("beta", "comfyui").__name__ == "beta_comfyui" and S.get_schedule("Beta").__name__ == "beta_a1111"
    )


# --- img2img ---


def _a1111_img2img(sigmas_fn, p_steps, strength, fix_steps=False):
    """A1111 1.10: setup_img2img_steps then sigmas[steps - t_enc - 1:]."""
    if fix_steps:
        steps = int(p_steps / min(strength, 0.999)) if strength > 0 else 0
        t_enc = p_steps - 1
    else:
        steps = p_steps
        t_enc = int(min(strength, 0.999) * steps)
    return sigmas_fn(steps)[steps - t_enc - 1 :]


def _comfy_img2img(sigmas_fn, steps, denoise):
    if denoise is None or denoise > 0.9999:
        return sigmas_fn(steps)
    if denoise <= 0.0:
        return torch.FloatTensor([])
    return sigmas_fn(int(steps / denoise))[-(steps + 1) :]


def test_img2img_a1111_and_comfyui(ds32):
    def fn(n: int) -> torch.Tensor:
        return S.karras(n, ds32.sigma_min.item(), ds32.sigma_max.item())

    # Hand-computed from A1111's arithmetic: steps run = int(min(s, 0.999) * steps) + 1.
    for steps, s, runs in [(20, 0.75, 16), (10, 0.7, 8), (100, 0.29, 29), (20, 1.0, 20), (20, 0.0, 1), (30, 0.5, 16)]:
        sig = img2img_sigmas(fn, steps, s)
        assert len(sig) - 1 == runs and torch.equal(sig, fn(steps)[steps - runs :]), (steps, s)
    assert torch.equal(img2img_sigmas(fn, 20, 0.5, fix_steps=True), fn(40)[20:])
    for steps in (1, 5, 20, 37):
        for s in np.linspace(0, 1, 21).tolist() + [0.29, 0.33, 0.999, 0.9999]:
            assert torch.equal(img2img_sigmas(fn, steps, s), _a1111_img2img(fn, steps, s)), (steps, s)
            assert torch.equal(img2img_sigmas(fn, steps, s, "comfyui"), _comfy_img2img(fn, steps, s)), (steps, s)
            if s > 0:
                assert torch.equal(img2img_sigmas(fn, steps, s, fix_steps=True), _a1111_img2img(fn, steps, s, True))
    assert img2img_plan(20, 0.5, "comfyui") == (40, -21)
    bad_args = [dict(steps=0, strength=0.5), dict(steps=10, strength=1.5), dict(steps=10, strength=0.0, fix_steps=True)]
    for bad in bad_args:
        with pytest.raises(ConfigError):
            img2img_plan(**bad)
    with pytest.raises(ConfigError):
        img2img_plan(10, 0.5, "diffusers", fix_steps=True)


def test_noise_latent():
    g = torch.Generator().manual_seed(0)
    latent, noise = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    assert torch.equal(noise_latent(latent, noise, 3.5), latent + noise * 3.5)
    per = torch.tensor([1.0, 2.0])
    assert torch.equal(noise_latent(latent, noise, per), latent + noise * per[:, None, None, None])
    assert noise_latent(latent.double(), noise.double(), torch.tensor(2.0)).dtype == torch.float64
