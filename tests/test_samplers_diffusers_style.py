"""DDIM, DDPM, PLMS, UniPC and LCM in sigma space against diffusers' schedulers (0.42.1) on VP latents.

One underlying toy: the exact posterior mean of a small Gaussian mixture, written as an eps network
``net(x_vp, t)`` (t -> sigma by the discrete schedule). diffusers' scheduler loop calls it at its integer
timesteps on x_vp; the Sumie sampler calls ``EpsDenoiser(net, schedule)`` (so the sigma -> t -> sigma round trip is
exercised too) on x = x_vp * sqrt(1 + sigma^2). Same timesteps (sigmas = the training sigmas there), same start noise
(diffusers' x_vp = noise, so x = noise * sqrt(1 + sigma_0^2)), same noise draws; the final samples are compared
after x_vp = x / sqrt(1 + sigma_last^2).

Precision: diffusers builds betas and alphas_cumprod in float32 (its sigmas differ from a float64 table by up to
1.3e-5 relative), and UniPC stores its sigmas in float32. The fp64 tests give both sides the same table (the
scheduler's own alphas_cumprod, upcast) and patch the scheduler's tensors to float64, so only the order of float64
operations differs: measured max |diff| about 1e-14 (DDPM 2.5e-10: diffusers clamps the last step's zero variance
to 1e-20 and adds 1e-10 * noise), asserted at 1e-9. The stock float32 schedulers on float32 latents agree to about
8e-7 (asserted at 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, PNDMScheduler, UniPCMultistepScheduler
from gaussian_mixture import IsotropicMixture
from torch import Tensor

from sumie.errors import ConfigError
from sumie.sampling.denoisers import EpsDenoiser
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.samplers.common import append_zero
from sumie.sampling.samplers.ddim import sample_ddim, sample_ddpm
from sumie.sampling.samplers.lcm import LCMDenoiser, lcm_sigmas, lcm_timesteps, sample_lcm
from sumie.sampling.samplers.plms import sample_plms
from sumie.sampling.samplers.unipc import sample_unipc
from sumie.sampling.schedules import diffusers_sigmas

SD = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SHAPE = (2, 3, 2, 2)  # [B, C, H, W]
TOL64 = 1e-9
TOL32 = 1e-5
STEPS = [1, 4, 20]


class ToyEps:
    """eps network on VP latents: eps(x_vp, t) of the mixture, t (int or fractional) mapped to sigma."""

    def __init__(self, schedule: DiscreteSigmas, mixture: IsotropicMixture) -> None:
        self.schedule, self.mixture = schedule, mixture
        self.calls: list[float] = []

    def __call__(self, x_vp: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).expand(x_vp.shape[0])
        self.calls.append(float(t[0]))
        sigma = self.schedule.t_to_sigma(t).to(x_vp.dtype)
        s = sigma.reshape(-1, *[1] * (x_vp.ndim - 1))
        x = x_vp * (1 + s**2) ** 0.5
        return (x - self.mixture(x, sigma)) / s


def setup(sch: object, fp64: bool = True) -> tuple[DiscreteSigmas, Callable[[], ToyEps]]:
    """Same table on both sides: the scheduler's alphas_cumprod (float64 copies patched in when fp64)."""
    ac = sch.alphas_cumprod.double()
    if fp64:
        sch.alphas_cumprod = ac
        if hasattr(sch, "final_alpha_cumprod"):
            sch.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if sch.config.set_alpha_to_one else ac[0]
    ds = DiscreteSigmas(ac)
    mixture = IsotropicMixture(int(np.prod(SHAPE[1:])), cast_sigma=True)
    return ds, lambda: ToyEps(ds, mixture)


def start_noise(dtype: torch.dtype, seed: int = 7) -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def run_diffusers(sch: object, net: ToyEps, noise: Tensor, step_kwargs: Callable[[int], dict] | None = None) -> Tensor:
    """diffusers' denoising loop (init_noise_sigma = 1); Python-int timesteps keep every coefficient in float64."""
    x = noise * sch.init_noise_sigma
    for i, t in enumerate(sch.timesteps):
        t = int(t)
        eps = net(sch.scale_model_input(x, t), torch.tensor(float(t)))
        x = sch.step(eps, t, x, **(step_kwargs(i) if step_kwargs else {})).prev_sample
    return x


def run_sumie(sampler: Callable, ds: DiscreteSigmas, net: ToyEps, noise: Tensor, sigmas: Tensor,
              model: Callable | None = None, **kw: object) -> Tensor:
    """Sumie's sampler from x = noise * sqrt(1 + sigma_0^2), returned as x_vp at the last sigma."""
    sigmas = sigmas.to(noise.dtype)
    model = EpsDenoiser(net, ds) if model is None else model
    seen: list[int] = []
    x = sampler(model, noise * (1 + sigmas[0] ** 2) ** 0.5, sigmas, callback=lambda d: seen.append(d["i"]), **kw)
    assert seen == list(range(len(sigmas) - 1))
    assert x.dtype == noise.dtype and x.shape == noise.shape
    return x / (1 + sigmas[-1] ** 2) ** 0.5


def sigmas_at(ds: DiscreteSigmas, timesteps: Tensor, final: str) -> Tensor:
    """Training sigmas at descending integer timesteps, then the final level: 0 or sigma_min (alpha_bar[0])."""
    sig = ds.t_to_sigma(timesteps.double())
    return torch.cat([sig, (ds.sigma_min if final == "sigma_min" else sig.new_zeros(())).reshape(1)])


def maxdiff(a: Tensor, b: Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a.double() - b.double()).abs().max())


class ListNoise:
    """Noise sampler handing out a fixed list of draws in order, counting them."""

    def __init__(self, draws: list[Tensor]) -> None:
        self.draws, self.used = draws, 0

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        self.used += 1
        return self.draws[self.used - 1]


class GenNoise:
    """torch.randn from a seeded CPU generator: the stream diffusers' randn_tensor(generator=...) draws from."""

    def __init__(self, seed: int, dtype: torch.dtype) -> None:
        self.g, self.dtype, self.used = torch.Generator().manual_seed(seed), dtype, 0

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        self.used += 1
        return torch.randn(SHAPE, generator=self.g, dtype=self.dtype)


# ---------------------------------------------------------------- timesteps and sigmas


@pytest.mark.parametrize("steps", [1, 3, 4, 20, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_schedules_give_the_schedulers_timesteps_and_sigmas(steps: int, spacing: str) -> None:
    """sumie.sampling.schedules.diffusers_sigmas reproduces what each scheduler's set_timesteps visits."""
    kw = {"timestep_spacing": spacing, "steps_offset": 1}
    cases = [(DDIMScheduler(**SD, set_alpha_to_one=False, **kw), "ddim", "sigma_min"),
             (DDIMScheduler(**SD, set_alpha_to_one=True, **kw), "ddim", "zero"),
             (DDPMScheduler(**SD, **kw), "ddim", "zero"),
             (PNDMScheduler(**SD, skip_prk_steps=True, **kw), "ddim", "sigma_min"),
             (UniPCMultistepScheduler(**SD, final_sigmas_type="zero", **kw), "dpmsolver", "zero"),
             (UniPCMultistepScheduler(**SD, final_sigmas_type="sigma_min", **kw), "dpmsolver", "sigma_min")]
    for sch, rule, final in cases:
        sch.set_timesteps(steps)
        ds = DiscreteSigmas(sch.alphas_cumprod.double())
        ts, sigmas = diffusers_sigmas(ds, steps, spacing, steps_offset=1, final_sigma=final, rule=rule,
                                      dtype=torch.float64)
        theirs = torch.unique_consecutive(sch.timesteps)
        assert torch.equal(ts.long(), theirs), (type(sch).__name__, ts, theirs)
        assert torch.allclose(sigmas, sigmas_at(ds, theirs, final), rtol=1e-12, atol=0)
        if isinstance(sch, UniPCMultistepScheduler):
            assert torch.allclose(sigmas, sch.sigmas.double(), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- DDIM


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers(steps: int, eta: float, set_alpha_to_one: bool, spacing: str) -> None:
    sch = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=1,
                        timestep_spacing=spacing)
    sch.set_timesteps(steps)
    ds, make_net = setup(sch)
    final = "zero" if set_alpha_to_one else "sigma_min"
    sigmas = sigmas_at(ds, sch.timesteps, final)
    g = torch.Generator().manual_seed(3)
    draws = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(steps)]
    noise = start_noise(torch.float64)
    ref = run_diffusers(sch, make_net(), noise, lambda i: {"eta": eta, "variance_noise": draws[i]})
    sampler_noise = ListNoise(draws)
    ours = run_sumie(sample_ddim, ds, make_net(), noise, sigmas, eta=eta, noise_sampler=sampler_noise)
    assert maxdiff(ours, ref) < TOL64
    # noise drawn once per step that ends above sigma 0 (diffusers' last step with alpha_prev = 1 adds 0 * noise)
    assert sampler_noise.used == (0 if eta == 0 else steps - (final == "zero"))


def test_ddim_eta0_is_deterministic_and_eta_needs_noise() -> None:
    sch = DDIMScheduler(**SD)
    ds, make_net = setup(sch)
    sigmas = sigmas_at(ds, torch.tensor([999, 500, 1]), "zero")
    x = start_noise(torch.float64) * 15
    model = EpsDenoiser(make_net(), ds)
    a = sample_ddim(model, x, sigmas)
    assert torch.equal(a, sample_ddim(model, x, sigmas, eta=0.0, noise_sampler=GenNoise(0, torch.float64)))
    with pytest.raises(ConfigError):
        sample_ddim(model, x, sigmas, eta=0.5)
    with pytest.raises(ConfigError):
        sample_ddim(model, x, sigmas, eta=-1.0)
    b = sample_ddim(model, x, sigmas, eta=1.0, noise_sampler=GenNoise(0, torch.float64))
    assert maxdiff(a, b) > 1e-3  # the noise does something


@pytest.mark.parametrize("steps", [4, 20])
def test_ddim_float32_stock_scheduler(steps: int) -> None:
    sch = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sch.set_timesteps(steps)
    ds, make_net = setup(sch, fp64=False)
    sigmas = sigmas_at(ds, sch.timesteps, "sigma_min").float()
    noise = start_noise(torch.float32)
    ref = run_diffusers(sch, make_net(), noise, lambda i: {"eta": 0.0})
    ours = run_sumie(sample_ddim, ds, make_net(), noise, sigmas)
    assert maxdiff(ours, ref) < TOL32


# ---------------------------------------------------------------- DDPM


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_matches_diffusers(steps: int, spacing: str) -> None:
    sch = DDPMScheduler(**SD, clip_sample=False, variance_type="fixed_small", steps_offset=1, timestep_spacing=spacing)
    sch.set_timesteps(steps)
    ds, make_net = setup(sch)
    sigmas = sigmas_at(ds, sch.timesteps, "zero")
    noise = start_noise(torch.float64)
    gen = torch.Generator().manual_seed(11)
    ref = run_diffusers(sch, make_net(), noise, lambda i: {"generator": gen})
    sampler_noise = GenNoise(11, torch.float64)
    ours = run_sumie(sample_ddpm, ds, make_net(), noise, sigmas, noise_sampler=sampler_noise)
    # diffusers clamps the last step's variance (0) to 1e-20 and adds 1e-10 * noise there
    assert maxdiff(ours, ref) < TOL64
    assert sampler_noise.used == steps - 1


def test_ddpm_equals_ddim_eta1_and_needs_noise() -> None:
    sch = DDIMScheduler(**SD)
    ds, make_net = setup(sch)
    sigmas = sigmas_at(ds, torch.tensor([999, 700, 400, 100]), "sigma_min")
    model = EpsDenoiser(make_net(), ds)
    x = start_noise(torch.float64) * 15
    a = sample_ddpm(model, x, sigmas, noise_sampler=GenNoise(5, torch.float64))
    b = sample_ddim(model, x, sigmas, eta=1.0, noise_sampler=GenNoise(5, torch.float64))
    assert maxdiff(a, b) < 1e-12
    with pytest.raises(ConfigError):
        sample_ddpm(model, x, sigmas)


# ---------------------------------------------------------------- PLMS / PNDM


def pndm(steps: int, spacing: str = "leading") -> PNDMScheduler:
    sch = PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, timestep_spacing=spacing)
    sch.set_timesteps(steps)
    return sch


# PNDM steps to t - 1000 // N, which is the next timestep only for leading spacing or N dividing 1000 (see module doc)
@pytest.mark.parametrize(("steps", "spacing"), [(n, "leading") for n in (1, 2, 3, 4, 5, 7, 20)]
                         + [(n, "trailing") for n in (1, 4, 20)])
def test_plms_matches_diffusers_pndm(steps: int, spacing: str) -> None:
    sch = pndm(steps, spacing)
    ds, make_net = setup(sch)
    distinct = torch.unique_consecutive(sch.timesteps)
    assert len(distinct) == steps and len(sch.timesteps) == steps + (steps > 1)
    sigmas = sigmas_at(ds, distinct, "sigma_min")
    noise = start_noise(torch.float64)
    ref_net, our_net = make_net(), make_net()
    ref = run_diffusers(sch, ref_net, noise)
    ours = run_sumie(sample_plms, ds, our_net, noise, sigmas)
    assert maxdiff(ours, ref) < TOL64
    # same model evaluations at the same timesteps (N + 1 for N > 1: the pseudo improved Euler start)
    assert np.allclose(our_net.calls, ref_net.calls, rtol=0, atol=1e-6)


def test_plms_float32_stock_scheduler() -> None:
    sch = pndm(20)
    ds, make_net = setup(sch, fp64=False)
    sigmas = sigmas_at(ds, torch.unique_consecutive(sch.timesteps), "sigma_min").float()
    noise = start_noise(torch.float32)
    assert maxdiff(run_sumie(sample_plms, ds, make_net(), noise, sigmas), run_diffusers(sch, make_net(), noise)) < TOL32


# ---------------------------------------------------------------- UniPC


def unipc(steps: int, order: int, variant: str, spacing: str, final: str, lower_order_final: bool = True,
          disable_corrector: tuple[int, ...] = ()) -> UniPCMultistepScheduler:
    sch = UniPCMultistepScheduler(**SD, solver_order=order, solver_type=variant, timestep_spacing=spacing,
                                  steps_offset=1 if spacing == "leading" else 0, final_sigmas_type=final,
                                  lower_order_final=lower_order_final, disable_corrector=list(disable_corrector))
    sch.set_timesteps(steps)
    return sch


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("variant", ["bh2", "bh1"])
@pytest.mark.parametrize(("spacing", "final"), [("linspace", "zero"), ("leading", "zero"), ("trailing", "sigma_min")])
def test_unipc_matches_diffusers(steps: int, order: int, variant: str, spacing: str, final: str) -> None:
    sch = unipc(steps, order, variant, spacing, final)
    ds, make_net = setup(sch)
    sigmas = sigmas_at(ds, sch.timesteps, final)
    # diffusers' own (float32) sigmas are the same values; then give it the float64 ones
    assert torch.allclose(sch.sigmas.double(), sigmas, rtol=1e-6, atol=0)
    sch.sigmas = sigmas.clone()
    noise = start_noise(torch.float64)
    ref = run_diffusers(sch, make_net(), noise)
    if variant == "bh1" and final == "zero":
        # diffusers 0.42.1 bug: at the step to sigma 0, B(h) = -h = -inf times a zero residual gives NaN. The
        # step's limit (order 1, lower_order_final) is that step's x0 prediction, which diffusers keeps.
        assert torch.isnan(ref).all()
        ref = sch.model_outputs[-1]
    ours = run_sumie(sample_unipc, ds, make_net(), noise, sigmas, order=order, variant=variant)
    assert maxdiff(ours, ref) < TOL64


@pytest.mark.parametrize(("order", "lower_order_final", "disable_corrector"),
                         [(3, False, ()), (2, True, (0, 2)), (1, True, ()), (4, True, (1,))])
def test_unipc_options_match_diffusers(order: int, lower_order_final: bool, disable_corrector: tuple[int, ...]) -> None:
    sch = unipc(8, order, "bh2", "leading", "sigma_min", lower_order_final, disable_corrector)
    ds, make_net = setup(sch)
    sigmas = sigmas_at(ds, sch.timesteps, "sigma_min")
    sch.sigmas = sigmas.clone()
    noise = start_noise(torch.float64)
    ref = run_diffusers(sch, make_net(), noise)
    ours = run_sumie(sample_unipc, ds, make_net(), noise, sigmas, order=order, variant="bh2",
                     lower_order_final=lower_order_final, disable_corrector=disable_corrector)
    assert maxdiff(ours, ref) < TOL64


def test_unipc_corrector_matters_and_bad_options() -> None:
    sch = unipc(6, 2, "bh2", "leading", "zero")
    ds, make_net = setup(sch)
    sigmas = sigmas_at(ds, sch.timesteps, "zero")
    model = EpsDenoiser(make_net(), ds)
    x = start_noise(torch.float64) * (1 + sigmas[0] ** 2) ** 0.5
    full = sample_unipc(model, x, sigmas)
    assert maxdiff(full, sample_unipc(model, x, sigmas, disable_corrector=range(6))) > 1e-4
    assert maxdiff(full, sample_unipc(model, x, sigmas, variant="bh1")) > 1e-5
    # diffusers gives NaN for order > 1 into sigma 0; the last step is taken with order 1 here
    assert torch.isfinite(sample_unipc(model, x, sigmas, order=3, lower_order_final=False)).all()
    with pytest.raises(ConfigError):
        sample_unipc(model, x, sigmas, variant="bh3")
    with pytest.raises(ConfigError):
        sample_unipc(model, x, sigmas, order=0)


def test_unipc_float32_stock_scheduler() -> None:
    sch = unipc(20, 2, "bh2", "leading", "zero")
    ds, make_net = setup(sch, fp64=False)
    sigmas = sch.sigmas.clone()  # diffusers' float32 sigmas as they are
    noise = start_noise(torch.float32)
    ours = run_sumie(sample_unipc, ds, make_net(), noise, sigmas)
    assert maxdiff(ours, run_diffusers(sch, make_net(), noise)) < TOL32


# ---------------------------------------------------------------- LCM


@pytest.mark.parametrize("original", [50, 10])
def test_lcm_timesteps_match_diffusers(original: int) -> None:
    sch = LCMScheduler(**SD, original_inference_steps=original)
    for steps in range(1, original + 1):
        sch.set_timesteps(steps)
        assert torch.equal(lcm_timesteps(steps, original), sch.timesteps)
    sch.set_timesteps(4, strength=0.5)
    assert torch.equal(lcm_timesteps(4, original, strength=0.5), sch.timesteps)
    with pytest.raises(ConfigError):
        lcm_timesteps(original + 1, original)


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 20])
def test_lcm_matches_diffusers(steps: int) -> None:
    sch = LCMScheduler(**SD, original_inference_steps=50)
    sch.set_timesteps(steps)
    ds, make_net = setup(sch)
    sigmas = lcm_sigmas(ds, steps)
    assert torch.allclose(sigmas, sigmas_at(ds, sch.timesteps, "zero"), rtol=1e-12, atol=0)
    noise = start_noise(torch.float64)
    gen = torch.Generator().manual_seed(21)
    ref = run_diffusers(sch, make_net(), noise, lambda i: {"generator": gen})
    net = make_net()
    sampler_noise = GenNoise(21, torch.float64)
    model = LCMDenoiser(EpsDenoiser(net, ds), ds)
    ours = run_sumie(sample_lcm, ds, net, noise, sigmas, model=model, noise_sampler=sampler_noise)
    assert maxdiff(ours, ref) < TOL64
    assert sampler_noise.used == steps - 1


def test_lcm_boundary_condition_matters() -> None:
    sch = LCMScheduler(**SD)
    ds, make_net = setup(sch)
    inner = EpsDenoiser(make_net(), ds)
    lcm = LCMDenoiser(inner, ds)
    sigma = ds.sigmas[torch.tensor([19, 19])]
    x = start_noise(torch.float64)
    c_skip, c_out = lcm.scalings(sigma)
    assert torch.allclose(c_skip, torch.full_like(sigma, 0.25 / (190.0**2 + 0.25)), rtol=1e-9)
    assert torch.allclose(c_out, torch.full_like(sigma, 190.0 / (190.0**2 + 0.25) ** 0.5), rtol=1e-9)
    assert 1e-7 < maxdiff(lcm(x, sigma), inner(x, sigma)) < 1e-3
    with pytest.raises(ConfigError):
        sample_lcm(lcm, x, append_zero(ds.sigmas[torch.tensor([999, 499])]))  # re-noising needs a noise_sampler


def test_shape_agnostic_batch_of_vectors() -> None:
    """[B, D] latents work with every sampler."""
    ds = DiscreteSigmas.from_betas(dtype=torch.float64)
    mix = IsotropicMixture(5, cast_sigma=True)
    model = lambda x, s: mix(x, s)  # noqa: E731
    sigmas = sigmas_at(ds, torch.tensor([999, 666, 333, 1]), "zero")
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigmas[0]
    noise = lambda s, sn: torch.zeros(3, 5, dtype=torch.float64)  # noqa: E731
    for sampler, kw in [(sample_ddim, {"eta": 0.5}), (sample_ddpm, {}), (sample_plms, {}),
                        (sample_unipc, {"order": 3}), (sample_lcm, {})]:
        out = sampler(model, x, sigmas, noise_sampler=noise, **kw)
        assert out.shape == (3, 5) and torch.isfinite(out).all()
