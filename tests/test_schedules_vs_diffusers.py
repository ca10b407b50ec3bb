"""Schedules, timesteps and img2img starts against diffusers' schedulers and pipelines (the test oracle).

The k-diffusion, scipy and A1111 / ComfyUI comparisons are in test_schedules.py, which does not need diffusers.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale
from reference_kdiffusion import load
from test_schedules import SD, maxdiff

from sumie.sampling import schedules as S
from sumie.sampling.discretization import DiscreteSigmas, make_betas
from sumie.sampling.img2img import img2img_plan, img2img_sigmas

# A1111 (modules/sd_models.py rescale_zero_terminal_snr_abar) and ComfyUI (comfy/model_sampling.py
# rescale_zero_terminal_snr_sigmas) replace diffusers' exact 0 at t = 999 by this alphas_bar.
A1111_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08


def _ds_of(sched) -> DiscreteSigmas:
    return DiscreteSigmas(sched.alphas_cumprod.clone())


EULER_OPTS = [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}]
OURS = {
    "use_karras_sigmas": "use_karras",
    "use_exponential_sigmas": "use_exponential",
    "use_beta_sigmas": "use_beta",
    "use_lu_lambdas": "use_lu_lambdas",
}


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("opts", EULER_OPTS, ids=lambda o: next(iter(o), "plain"))
def test_euler_discrete_sigmas(spacing, opts):
    worst = 0.0
    for zsnr in (False, True):
        sched = EulerDiscreteScheduler(
            **SD, timestep_spacing=spacing, steps_offset=1, rescale_betas_zero_snr=zsnr, **opts
        )
        ds = _ds_of(sched)
        for n in [1, 2, 3, 10, 20, 30, 50]:
            if n == 1 and opts:
                continue  # diffusers' own karras/exponential/beta grids need two points
            sched.set_timesteps(n)
            ts, sig = S.diffusers_sigmas(ds, n, spacing, steps_offset=1, **{OURS[k]: v for k, v in opts.items()})
            assert ts.dtype == torch.float32 and sig.dtype == torch.float32
            assert maxdiff(ts, sched.timesteps) <= 1e-4, (n, ts, sched.timesteps)  # 1 float32 ulp at t~999
            worst = max(worst, maxdiff(sig, sched.sigmas) / sched.sigmas.max().item())
    assert worst <= 1e-6


def test_euler_final_sigma_and_log_interpolation():
    _, external = load()
    sched = EulerDiscreteScheduler(**SD, timestep_spacing="linspace", final_sigmas_type="sigma_min")
    ds = _ds_of(sched)
    sched.set_timesteps(25)
    ts, sig = S.diffusers_sigmas(ds, 25, "linspace", final_sigma="sigma_min")
    assert maxdiff(sig, sched.sigmas) <= 1e-6 and sig[-1] == ds.sigmas[0]
    # k-diffusion-style (log) interpolation at the same fractional timesteps, and its difference from diffusers'.
    _, logsig = S.diffusers_sigmas(ds, 25, "linspace", interpolation="log")
    ref = external.DiscreteSchedule(ds.sigmas, False).t_to_sigma(ts)
    assert torch.equal(logsig[:-1], ref)
    assert maxdiff(logsig[:-1], sig[:-1]) > 1e-5  # the two interpolations really differ off the grid
    assert torch.equal(S.diffusers_sigmas(ds, 25, "linspace", interpolation="log")[1], S.normal(ds, 25))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("opts", EULER_OPTS + [{"use_lu_lambdas": True}], ids=lambda o: next(iter(o), "plain"))
def test_dpmsolver_multistep_sigmas_and_timesteps(spacing, opts):
    sched = DPMSolverMultistepScheduler(**SD, timestep_spacing=spacing, steps_offset=1, **opts)
    ds = _ds_of(sched)
    for n in [2, 3, 10, 20, 25, 50]:
        sched.set_timesteps(n)
        ts, sig = S.diffusers_sigmas(ds, n, spacing, rule="dpmsolver", **{OURS[k]: v for k, v in opts.items()})
        assert ts.dtype == torch.int64 and torch.equal(ts, sched.timesteps), (n, ts, sched.timesteps)
        assert maxdiff(sig, sched.sigmas) / sched.sigmas.max().item() <= 1e-6


def test_timestep_rules_every_step_count():
    T = 1000
    for spacing in ("leading", "trailing", "linspace"):
        euler = EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=1)
        dpm = UniPCMultistepScheduler(**SD, timestep_spacing=spacing, steps_offset=1)
        ddim = DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=1)
        for n in range(1, T + 1, 7):
            for sched, rule in ((euler, "euler"), (dpm, "dpmsolver"), (ddim, "ddim")):
                if rule == "dpmsolver" and spacing == "leading" and n >= T // 2:
                    continue  # step ratio 0: diffusers itself produces a degenerate grid there
                sched.set_timesteps(n)
                ours = S.diffusers_timesteps(n, spacing, rule=rule, steps_offset=1)
                assert torch.equal(ours, sched.timesteps.double()), (spacing, rule, n)


def test_zero_terminal_snr_matches_diffusers():
    zs = DiscreteSigmas.from_betas(zero_terminal_snr=True, dtype=torch.float64)
    ref = torch.cumprod(1 - diffusers_rescale(make_betas()), dim=0)
    rel = ((zs.alphas_cumprod[:-1] - ref[:-1]).abs() / ref[:-1]).max().item()
    assert rel < 1e-10
    assert ref[-1].item() < 1e-20 and zs.alphas_cumprod[-1].item() == A1111_LAST_ALPHA_CUMPROD
    assert zs.sigma_max.item() == pytest.approx(math.sqrt((1 - A1111_LAST_ALPHA_CUMPROD) / A1111_LAST_ALPHA_CUMPROD))
    assert 4500 < zs.sigma_max.item() < 4530
    assert S.normal(zs, 10)[0].item() == pytest.approx(zs.sigma_max.item(), rel=1e-6)


# --- img2img ---


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler])
def test_img2img_diffusers_get_timesteps(scheduler_cls):
    sched = scheduler_cls(**SD, timestep_spacing="leading", steps_offset=1)
    ds = _ds_of(sched)
    rule = "dpmsolver" if scheduler_cls is DPMSolverMultistepScheduler else "euler"

    def fn(n: int) -> torch.Tensor:
        return S.diffusers_sigmas(ds, n, "leading", rule=rule)[1]

    pipe = types.SimpleNamespace(scheduler=sched)
    for steps in (10, 25, 50):
        for s in (0.0, 0.1, 0.3, 0.5, 0.75, 0.8, 1.0):
            sched.set_timesteps(steps)
            timesteps, n_run = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, s, "cpu")
            ours = img2img_sigmas(fn, steps, s, "diffusers")
            assert len(ours) - 1 == n_run, (steps, s)
            begin = sched.begin_index
            if n_run:
                assert ours[0].item() == pytest.approx(sched.sigmas[begin].item(), rel=1e-6)
                assert timesteps[0].item() == pytest.approx(sched.timesteps[begin].item())
            _, start = img2img_plan(steps, s, "diffusers")
            assert start * sched.order == begin
