"""k-diffusion family samplers (sumie.sampling.samplers.ode / ancestral / sde) against k-diffusion 0.1.1.post1.

Same nonlinear denoiser (the exact posterior mean of a small Gaussian mixture, fp64), same sigmas (Karras and the
discrete 'normal' schedule from k-diffusion's DiscreteSchedule.get_sigmas), same noise (twin ImageRNGs, or
BrownianNoise vs k-diffusion's BrownianTreeNoiseSampler with the same seeds): the final sample and every denoised
x0 the callback sees agree to 1e-5. Measured: bitwise equal, except LMS (quadrature, ~1e-15) and, in fp64 only,
the Brownian cases (~1e-6: BrownianNoise normalises the float32 increment in float64, k-diffusion in float32).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from reference_kdiffusion import load
from torch import Tensor

from sumie.errors import ConfigError
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.noise import BrownianNoise, ImageRNG
from sumie.sampling.samplers import ancestral, ode, sde
from sumie.sampling.samplers.ode import lms_coefficients
from sumie.sampling.samplers.sde import restart_steps

TOL = 1e-5
SHAPE = (2, 3)  # per-image shape; the batch is [B, 2, 3]
SEEDS = [1234, 1235]
SIGMA_MIN, SIGMA_MAX = 0.0291675, 14.614642
# torchsde warns when a query sits an ulp outside its float32 tree (sigma_max recomputed as exp(log(sigma_max)))
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")


class Mixture:
    """Exact denoiser E[x0 | x0 + sigma n = x] of an isotropic Gaussian mixture: nonlinear, every sigma matters."""

    def __init__(self, dim: int = 6, k: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mu = (torch.randn(k, dim, generator=g, dtype=torch.float64) * 1.5).to(dtype)
        self.var = ((0.2 + torch.rand(k, generator=g, dtype=torch.float64)) ** 2).to(dtype)
        self.logw = torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), 0).to(dtype)
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls += 1
        assert sigma.shape == (x.shape[0],)
        xf = x.reshape(x.shape[0], -1)
        var = self.var[None] + sigma[:, None] ** 2  # [B, K]
        diff = xf[:, None] - self.mu[None]  # [B, K, D]
        logp = self.logw - xf.shape[1] / 2 * var.log() - diff.pow(2).sum(-1) / (2 * var)
        w = torch.softmax(logp, -1)
        x0k = self.mu[None] + (self.var[None] / var)[..., None] * diff
        return (w[..., None] * x0k).sum(1).reshape(x.shape)


def karras(n: int) -> Tensor:
    ks, _ = load()
    return ks.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX).double()


def discrete(n: int) -> Tensor:
    _, ke = load()
    return ke.DiscreteSchedule(DiscreteSigmas.from_betas(dtype=torch.float64).sigmas, False).get_sigmas(n)


SCHEDULES = {"karras": karras, "normal": discrete}


def start(sigmas: Tensor, seeds: list[int] = SEEDS) -> Tensor:
    return ImageRNG(seeds, SHAPE, dtype=sigmas.dtype).first() * sigmas[0]


class Recorder:
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def __call__(self, info: dict) -> None:
        self.steps.append(info)


class StepNoise:
    """Churn noise as a function of the step: ours is asked noise(sigmas[i], .), k-diffusion calls randn_like once
    per step whether or not it churns; both get table[i]."""

    def __init__(self, sigmas: Tensor, shape: tuple[int, ...]) -> None:
        g = torch.Generator().manual_seed(99)
        self.sigmas = sigmas
        self.table = torch.randn((len(sigmas),) + shape, generator=g, dtype=torch.float64).to(sigmas.dtype)
        self.count = 0

    def ours(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return self.table[int((self.sigmas == sigma).nonzero()[0])]

    def theirs(self, x: Tensor) -> Tensor:
        self.count += 1
        return self.table[self.count - 1].to(x.dtype)


# name -> (k-diffusion function name, sumie function, options, noise kind)
CASES: dict[str, tuple[str, Callable, dict, str | None]] = {
    "euler": ("sample_euler", ode.sample_euler, {}, None),
    "euler_churn": ("sample_euler", ode.sample_euler, {"s_churn": 2.0, "s_noise": 1.003}, "churn"),
    "euler_churn_window": ("sample_euler", ode.sample_euler, {"s_churn": 8.0, "s_tmin": 0.3, "s_tmax": 4.0}, "churn"),
    "heun": ("sample_heun", ode.sample_heun, {}, None),
    "heun_churn": ("sample_heun", ode.sample_heun, {"s_churn": 1.0, "s_tmin": 0.1}, "churn"),
    "dpm_2": ("sample_dpm_2", ode.sample_dpm_2, {}, None),
    "dpm_2_churn": ("sample_dpm_2", ode.sample_dpm_2, {"s_churn": 1.0, "s_tmax": 3.0}, "churn"),
    "lms": ("sample_lms", ode.sample_lms, {}, None),
    "lms_order2": ("sample_lms", ode.sample_lms, {"order": 2}, None),
    "dpmpp_2m": ("sample_dpmpp_2m", ode.sample_dpmpp_2m, {}, None),
    "euler_ancestral": ("sample_euler_ancestral", ancestral.sample_euler_ancestral, {}, "white"),
    "euler_ancestral_eta0": ("sample_euler_ancestral", ancestral.sample_euler_ancestral, {"eta": 0.0}, "white"),
    "euler_ancestral_s_noise": ("sample_euler_ancestral", ancestral.sample_euler_ancestral,
                                {"eta": 0.7, "s_noise": 1.01}, "white"),
    "dpm_2_ancestral": ("sample_dpm_2_ancestral", ancestral.sample_dpm_2_ancestral, {}, "white"),
    "dpm_2_ancestral_eta0": ("sample_dpm_2_ancestral", ancestral.sample_dpm_2_ancestral, {"eta": 0.0}, "white"),
    "dpm_2_ancestral_eta1.5": ("sample_dpm_2_ancestral", ancestral.sample_dpm_2_ancestral, {"eta": 1.5}, "white"),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", ancestral.sample_dpmpp_2s_ancestral, {}, "white"),
    "dpmpp_2s_ancestral_eta0": ("sample_dpmpp_2s_ancestral", ancestral.sample_dpmpp_2s_ancestral, {"eta": 0.0},
                                "white"),
    "dpmpp_2s_ancestral_eta1.5": ("sample_dpmpp_2s_ancestral", ancestral.sample_dpmpp_2s_ancestral,
                                  {"eta": 1.5, "s_noise": 0.98}, "white"),
    "dpmpp_sde": ("sample_dpmpp_sde", sde.sample_dpmpp_sde, {}, "brownian"),
    "dpmpp_sde_white": ("sample_dpmpp_sde", sde.sample_dpmpp_sde, {"s_noise": 1.02}, "white"),
    "dpmpp_sde_eta0": ("sample_dpmpp_sde", sde.sample_dpmpp_sde, {"eta": 0.0}, "brownian"),
    "dpmpp_sde_r": ("sample_dpmpp_sde", sde.sample_dpmpp_sde, {"r": 1 / 3, "eta": 0.5}, "brownian"),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", sde.sample_dpmpp_2m_sde, {}, "brownian"),
    "dpmpp_2m_sde_white": ("sample_dpmpp_2m_sde", sde.sample_dpmpp_2m_sde, {"eta": 0.6}, "white"),
    "dpmpp_2m_sde_eta0": ("sample_dpmpp_2m_sde", sde.sample_dpmpp_2m_sde, {"eta": 0.0}, "brownian"),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", sde.sample_dpmpp_2m_sde, {"solver_type": "heun"}, "brownian"),
    "dpmpp_2m_sde_heun_eta0": ("sample_dpmpp_2m_sde", sde.sample_dpmpp_2m_sde,
                               {"solver_type": "heun", "eta": 0.0}, "brownian"),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", sde.sample_dpmpp_3m_sde, {}, "brownian"),
    "dpmpp_3m_sde_white": ("sample_dpmpp_3m_sde", sde.sample_dpmpp_3m_sde, {"s_noise": 0.99}, "white"),
    "dpmpp_3m_sde_eta0": ("sample_dpmpp_3m_sde", sde.sample_dpmpp_3m_sde, {"eta": 0.0}, "brownian"),
}

# k-diffusion's 2M/3M SDE read `h` after a lone final step that never set it: one step raises UnboundLocalError.
KD_ONE_STEP_BROKEN = {"sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"}


def run_pair(case: str, sigmas: Tensor) -> tuple[Tensor, Tensor, Recorder, Recorder]:
    """(ours, reference, our callback record, reference callback record) on identical inputs and noise."""
    ks, _ = load()
    kname, ours_fn, opts, noise = CASES[case]
    dtype = sigmas.dtype
    x = start(sigmas)
    ours_cb, ref_cb = Recorder(), Recorder()
    ours_kw: dict = {}
    ref_kw: dict = {}
    if noise == "white":
        ours_kw["noise_sampler"] = ImageRNG([s + 7 for s in SEEDS], SHAPE, dtype=dtype)
        ref_kw["noise_sampler"] = ImageRNG([s + 7 for s in SEEDS], SHAPE, dtype=dtype)
    elif noise == "brownian":
        pos = sigmas[sigmas > 0]
        smin, smax = pos.min(), sigmas.max()
        ours_kw["noise_sampler"] = BrownianNoise(SEEDS, SHAPE, float(smin), float(smax), dtype=dtype)
        tree = ks.BrownianTreeNoiseSampler(x.float(), smin.float(), smax.float(), seed=SEEDS)
        if dtype == torch.float32:
            ref_kw["noise_sampler"] = tree
        else:
            # BrownianNoise asks its float32 trees at float32 times and a Brownian path moves ~sqrt(dt) between two
            # nearby times, so in fp64 the reference tree is asked at the same float32-rounded sigmas
            ref_kw["noise_sampler"] = lambda a, b: tree(a.float(), b.float())
    steps = StepNoise(sigmas, x.shape)
    if noise == "churn":
        ours_kw["noise_sampler"] = steps.ours
    model = Mixture(dtype=dtype)
    out = ours_fn(model, x.clone(), sigmas, callback=ours_cb, **ours_kw, **opts)
    ref_fn = getattr(ks, kname)
    if noise == "churn":
        orig = torch.randn_like
        torch.randn_like = steps.theirs
        try:
            ref = ref_fn(model, x.clone(), sigmas, callback=ref_cb, disable=True, **ref_kw, **opts)
        finally:
            torch.randn_like = orig
    else:
        ref = ref_fn(model, x.clone(), sigmas, callback=ref_cb, disable=True, **ref_kw, **opts)
    return out, ref, ours_cb, ref_cb


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("n", [1, 2, 20])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_kdiffusion(case: str, schedule: str, n: int) -> None:
    sigmas = SCHEDULES[schedule](n)
    kname = CASES[case][0]
    if n == 1 and kname in KD_ONE_STEP_BROKEN:
        with pytest.raises(UnboundLocalError):
            run_pair(case, sigmas)
        # ours: the lone step is the denoising step x <- x0(x, sigma_max)
        x = start(sigmas)
        out = CASES[case][1](Mixture(), x.clone(), sigmas, eta=0.0)
        assert max_diff(out, Mixture()(x, sigmas[:1].expand(2))) == 0
        return
    out, ref, ours_cb, ref_cb = run_pair(case, sigmas)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert max_diff(out, ref) <= TOL, (case, schedule, n, max_diff(out, ref))
    assert len(ours_cb.steps) == len(ref_cb.steps) == n
    for a, b in zip(ours_cb.steps, ref_cb.steps, strict=True):
        assert a["i"] == b["i"]
        assert max_diff(a["denoised"], b["denoised"]) <= TOL
        assert max_diff(a["x"], b["x"]) <= TOL
        assert abs(float(a["sigma"]) - float(b["sigma"])) <= 1e-12
        assert abs(float(a["sigma_hat"]) - float(b["sigma_hat"])) <= 1e-12


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_kdiffusion_float32(case: str, schedule: str) -> None:
    """A1111's setting: float32 latents and sigmas, k-diffusion's BrownianTreeNoiseSampler used as is."""
    sigmas = SCHEDULES[schedule](12).float()
    out, ref, ours_cb, ref_cb = run_pair(case, sigmas)
    assert out.dtype == torch.float32
    assert max_diff(out, ref) <= TOL, (case, schedule, max_diff(out, ref))
    for a, b in zip(ours_cb.steps, ref_cb.steps, strict=True):
        assert max_diff(a["denoised"], b["denoised"]) <= TOL


def test_noise_actually_used() -> None:
    """The stochastic cases are not trivially equal: other seeds give a clearly different sample."""
    sigmas = karras(8)
    for case in ("euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "euler_churn"):
        a, _, _, _ = run_pair(case, sigmas)
        _, fn, opts, noise = CASES[case]
        x = start(sigmas)
        if noise == "brownian":
            ns = BrownianNoise([5, 6], SHAPE, SIGMA_MIN, SIGMA_MAX, dtype=torch.float64)
        else:
            ns = ImageRNG([5, 6], SHAPE, dtype=torch.float64)
        b = fn(Mixture(), x, sigmas, noise_sampler=ns, **opts)
        assert max_diff(a, b) > 1e-3, case


def test_lms_coefficients_match_scipy_quad() -> None:
    ks, _ = load()
    sigmas = karras(12)
    t = sigmas.numpy()
    for order in (1, 2, 3, 4):
        for i in range(order - 1, 12):
            ours = lms_coefficients(sigmas, i, order)
            ref = [ks.linear_multistep_coeff(order, t, i, j) for j in range(order)]
            assert max(abs(a - b) for a, b in zip(ours, ref, strict=True)) <= 1e-12 * max(1.0, abs(t[i]))
    with pytest.raises(ConfigError):
        lms_coefficients(sigmas, 1, 4)


# ---- per-image noise: image 1 of a batch seeded [s, s+1] equals seed s+1 alone -----------------------------------

STOCHASTIC = {
    "euler_churn": (ode.sample_euler, {"s_churn": 2.0}, "white"),
    "heun_churn": (ode.sample_heun, {"s_churn": 2.0}, "white"),
    "dpm_2_churn": (ode.sample_dpm_2, {"s_churn": 2.0}, "white"),
    "euler_ancestral": (ancestral.sample_euler_ancestral, {}, "white"),
    "dpm_2_ancestral": (ancestral.sample_dpm_2_ancestral, {}, "white"),
    "dpmpp_2s_ancestral": (ancestral.sample_dpmpp_2s_ancestral, {}, "white"),
    "dpmpp_sde": (sde.sample_dpmpp_sde, {}, "brownian"),
    "dpmpp_2m_sde": (sde.sample_dpmpp_2m_sde, {}, "brownian"),
    "dpmpp_2m_sde_heun": (sde.sample_dpmpp_2m_sde, {"solver_type": "heun"}, "brownian"),
    "dpmpp_3m_sde": (sde.sample_dpmpp_3m_sde, {}, "brownian"),
    "restart": (sde.sample_restart, {}, "white"),
}


@pytest.mark.parametrize("case", list(STOCHASTIC))
def test_per_image_noise(case: str) -> None:
    fn, opts, kind = STOCHASTIC[case]
    sigmas = karras(20)
    s = 4321

    def run(seeds: list[int]) -> Tensor:
        rng = ImageRNG(seeds, SHAPE, dtype=torch.float64)
        x = rng.first() * sigmas[0]
        if kind == "brownian":
            ns = BrownianNoise(seeds, SHAPE, SIGMA_MIN, SIGMA_MAX, dtype=torch.float64)
        else:
            ns = rng
        return fn(Mixture(), x, sigmas, noise_sampler=ns, **opts)

    batch, alone, other = run([s, s + 1]), run([s + 1]), run([s])
    assert max_diff(batch[1], alone[0]) <= 1e-12
    assert max_diff(batch[0], other[0]) <= 1e-12
    assert max_diff(batch[0], batch[1]) > 1e-2


@pytest.mark.parametrize("case", list(STOCHASTIC))
def test_require_noise(case: str) -> None:
    fn, opts, _ = STOCHASTIC[case]
    sigmas = karras(20)
    with pytest.raises(ConfigError, match="noise_sampler"):
        fn(Mixture(), start(sigmas), sigmas, **opts)


def test_deterministic_without_noise() -> None:
    """eta = 0 (and no churn) needs no noise sampler; eta = 0 Euler ancestral is Euler."""
    sigmas = karras(10)
    x = start(sigmas)
    for fn in (ancestral.sample_euler_ancestral, ancestral.sample_dpm_2_ancestral,
               ancestral.sample_dpmpp_2s_ancestral, sde.sample_dpmpp_sde, sde.sample_dpmpp_2m_sde,
               sde.sample_dpmpp_3m_sde):
        assert torch.isfinite(fn(Mixture(), x, sigmas, eta=0.0)).all()
    a = ancestral.sample_euler_ancestral(Mixture(), x, sigmas, eta=0.0)
    assert max_diff(a, ode.sample_euler(Mixture(), x, sigmas)) <= 1e-12
    with pytest.raises(ConfigError):
        sde.sample_dpmpp_2m_sde(Mixture(), x, sigmas, eta=0.0, solver_type="euler")


def test_shape_agnostic_and_float32() -> None:
    """[B, D] inputs and float32 work; float32 stays float32 and is close to the fp64 result."""
    sigmas = karras(10)
    x = start(sigmas).reshape(2, -1)
    model, m32 = Mixture(), Mixture(dtype=torch.float32)
    for fn in (ode.sample_euler, ode.sample_heun, ode.sample_dpm_2, ode.sample_lms, ode.sample_dpmpp_2m):
        a = fn(model, x, sigmas)
        b = fn(m32, x.float(), sigmas.float())
        assert b.dtype == torch.float32 and a.shape == x.shape
        assert max_diff(a, b.double()) < 1e-3


# ---- Restart (A1111's restart_sampler; no k-diffusion reference) -------------------------------------------------


def test_restart_without_restarts_is_heun() -> None:
    for n in (1, 2, 10, 20, 40):
        sigmas = karras(n)
        x = start(sigmas)
        cb_a, cb_b = Recorder(), Recorder()
        a = sde.sample_restart(Mixture(), x, sigmas, restart_list={}, callback=cb_a)
        b = ode.sample_heun(Mixture(), x, sigmas, callback=cb_b)
        assert max_diff(a, b) == 0
        assert len(cb_a.steps) == len(cb_b.steps) == n
        for p, q in zip(cb_a.steps, cb_b.steps, strict=True):
            assert max_diff(p["denoised"], q["denoised"]) == 0
    # under 20 steps the default restart list is empty
    sigmas = karras(19)
    x = start(sigmas)
    assert max_diff(sde.sample_restart(Mixture(), x, sigmas), ode.sample_heun(Mixture(), x, sigmas)) == 0


def test_restart_default_schedule() -> None:
    """A1111's default: the step count is kept; the main schedule is Karras between the same end points; the restart
    segment runs from the sigma nearest 2 down to the one nearest 0.1 (9 steps once, or steps // 4 twice from 36)."""
    for n, seg, times in ((20, 9, 1), (35, 9, 1), (36, 9, 2), (40, 10, 2)):
        sigmas = discrete(n)
        steps = restart_steps(sigmas, None)
        assert len(steps) == n
        main = karras_between(n - seg * times, sigmas[-2], sigmas[0])
        jumps = [k for k in range(1, len(steps)) if steps[k][0] > steps[k - 1][1]]
        assert len(jumps) == times
        lo = int((main - 0.1).abs().argmin())
        hi = int((main - 2.0).abs().argmin())
        assert jumps[0] == lo  # the restart happens right after reaching the sigma nearest 0.1
        for j in jumps:
            assert float(steps[j][0]) == pytest.approx(float(main[hi]), rel=1e-12)
            assert float(steps[j - 1][1]) == pytest.approx(float(main[lo]), rel=1e-12)
            seg_sigmas = [float(steps[j + k][0]) for k in range(seg)] + [float(steps[j + seg - 1][1])]
            assert seg_sigmas == pytest.approx(karras_between(seg + 1, main[lo], main[hi])[:-1].tolist(), rel=1e-12)
        assert float(steps[0][0]) == pytest.approx(float(sigmas[0]), rel=1e-12)
        assert float(steps[-1][1]) == 0.0
    # an explicit list, snapped to the schedule
    sigmas = karras(10)
    steps = restart_steps(sigmas, {0.5: (4, 3, 5.0)})
    assert len(steps) == 10 + 3 * 3


def karras_between(n: int, lo: Tensor | float, hi: Tensor | float, rho: float = 7.0) -> Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    a, b = float(hi) ** (1 / rho), float(lo) ** (1 / rho)
    return torch.cat([(a + ramp * (b - a)) ** rho, torch.zeros(1, dtype=torch.float64)])


def test_restart_keeps_the_marginals() -> None:
    """On Gaussian data N(0, s^2) with its exact denoiser, x ~ N(0, s^2 + sigma^2) all along: the restart noise must be
    exactly the variance gap sqrt(sigma_hi^2 - sigma_lo^2) for the samples to end at variance s^2."""
    s2 = 0.5**2

    def gauss(x: Tensor, sigma: Tensor) -> Tensor:
        return x * (s2 / (s2 + sigma**2))[:, None]

    n_img = 4000
    sigmas = karras(40)
    rng = ImageRNG(range(n_img), (1,), dtype=torch.float64)
    x = rng.first() * (sigmas[0] ** 2 + s2) ** 0.5
    seen = Recorder()
    out = sde.sample_restart(gauss, x, sigmas, noise_sampler=rng, callback=seen)
    levels = [float(c["sigma"]) for c in seen.steps]
    assert len(levels) == 40 and sum(b > a for a, b in zip(levels, levels[1:], strict=False)) == 2  # two restarts
    var = float(out.var())
    assert abs(var - s2) < 0.03, var
    # without the restart noise (s_noise=0) the variance collapses: the test above can fail
    rng = ImageRNG(range(n_img), (1,), dtype=torch.float64)
    x = rng.first() * (sigmas[0] ** 2 + s2) ** 0.5
    bad = sde.sample_restart(gauss, x, sigmas, noise_sampler=rng, s_noise=0.0)
    assert float(bad.var()) < 0.6 * s2
