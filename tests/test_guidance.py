"""Guidance: classifier-free guidance (batching, skipped uncond pass, CFG rescale against diffusers, ComfyUI and
A1111's extension), masked denoising (ComfyUI's KSamplerX0Inpaint) and per-step conditioning."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import Tensor

from sumie.errors import ConfigError
from sumie.sampling.denoisers import EpsDenoiser, VDenoiser
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.guidance import cfg_model, masked_model, step_schedule
from sumie.sampling.samplers.ode import sample_dpm_2, sample_euler
from sumie.sampling.schedules import karras

F64 = torch.float64


def _bc(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class Recorder:
    """A per-row toy denoiser ``(x, sigma, context, scale) -> x0`` that records every call."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, x: Tensor, sigma: Tensor, *, context: Tensor, gain: float = 1.0) -> Tensor:
        self.calls.append({"batch": x.shape[0], "context": context.clone(), "sigma": sigma.clone(), "gain": gain})
        c = context.flatten(1).sum(1)
        return gain * torch.tanh(x / _bc((sigma**2 + 1) ** 0.5, x) + _bc(c, x)) + 0.1 * _bc(c, x)


def _data(b: int = 3, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 6, 6, generator=g, dtype=F64) * 3
    sigma = torch.full((b,), 2.5, dtype=F64)
    cond = torch.randn(b, 5, 8, generator=g, dtype=F64) * 0.2
    uncond = torch.randn(b, 5, 8, generator=g, dtype=F64) * 0.2
    return x, sigma, cond, uncond


# --- classifier-free guidance ---


def test_cfg_is_one_batched_call_with_uncond_first() -> None:
    x, sigma, c, u = _data()
    rec = Recorder()
    out = cfg_model(rec, {"context": c, "gain": 0.5}, {"context": u, "gain": 0.5}, 7.5)(x, sigma)
    assert len(rec.calls) == 1 and rec.calls[0]["batch"] == 6
    assert torch.equal(rec.calls[0]["context"], torch.cat([u, c])) and rec.calls[0]["gain"] == 0.5
    ref = Recorder()
    cond_x0, uncond_x0 = ref(x, sigma, context=c, gain=0.5), ref(x, sigma, context=u, gain=0.5)
    torch.testing.assert_close(out, uncond_x0 + 7.5 * (cond_x0 - uncond_x0), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("scale", "with_uncond"), [(1.0, True), (6.0, False)])
def test_no_uncond_pass_at_scale_one_or_without_uncond(scale: float, with_uncond: bool) -> None:
    x, sigma, c, u = _data()
    rec = Recorder()
    model = cfg_model(rec, {"context": c}, {"context": u} if with_uncond else None, scale, rescale=0.7)
    out = model(x, sigma)
    assert [call["batch"] for call in rec.calls] == [3]
    assert torch.equal(out, Recorder()(x, sigma, context=c))


def test_cfg_broadcasts_a_single_cond_row_and_checks_shapes() -> None:
    x, sigma, c, u = _data()
    rec = Recorder()
    cfg_model(rec, {"context": c[:1]}, {"context": u[:1]}, 5.0)(x, sigma)
    assert torch.equal(rec.calls[0]["context"], torch.cat([u[:1].expand(3, 5, 8), c[:1].expand(3, 5, 8)]))
    with pytest.raises(ConfigError, match="shapes differ"):
        cfg_model(rec, {"context": c}, {"context": u[:, :4]}, 5.0)(x, sigma)
    with pytest.raises(ConfigError, match="same keys"):
        cfg_model(rec, {"context": c}, {"context": u, "gain": 1.0}, 5.0)(x, sigma)
    with pytest.raises(ConfigError, match="batch"):
        cfg_model(rec, {"context": c[:2]}, {"context": u[:2]}, 5.0)(x, sigma)
    with pytest.raises(ConfigError, match="rescale"):
        cfg_model(rec, {"context": c}, {"context": u}, 5.0, rescale=1.5)


def _net(prediction_scale: float):  # noqa: ANN202 - returns a toy UNet-like network(x_in, t, context)
    def network(x_in: Tensor, t: Tensor, *, context: Tensor) -> Tensor:
        c = context.flatten(1).mean(1)
        return prediction_scale * torch.tanh(x_in * (1 + _bc(c, x_in)) + _bc(t, x_in) / 1000)
    return network


def test_rescale_eps_space_is_diffusers_for_eps_models() -> None:
    x, sigma, c, u = _data()
    ds = DiscreteSigmas.from_betas(dtype=F64)
    net = _net(1.0)
    guided = cfg_model(EpsDenoiser(net, ds), {"context": c}, {"context": u}, 7.0, 0.7, "eps")(x, sigma)
    # diffusers' StableDiffusionPipeline: CFG on eps, then rescale_noise_cfg, then the scheduler's x0.
    x_in, t = x / _bc((sigma**2 + 1) ** 0.5, x), ds.sigma_to_t(sigma)
    eps_c, eps_u = net(x_in, t, context=c), net(x_in, t, context=u)
    eps = rescale_noise_cfg(eps_u + 7.0 * (eps_c - eps_u), eps_c, guidance_rescale=0.7)
    torch.testing.assert_close(guided, x - _bc(sigma, x) * eps, rtol=0, atol=1e-12)


def test_rescale_v_space_is_diffusers_for_v_models() -> None:
    x, sigma, c, u = _data()
    ds = DiscreteSigmas.from_betas(dtype=F64)
    net = _net(0.8)
    guided = cfg_model(VDenoiser(net, ds), {"context": c}, {"context": u}, 7.0, 0.7, "v")(x, sigma)
    s = _bc(sigma, x)
    x_in, t = x / (s**2 + 1) ** 0.5, ds.sigma_to_t(sigma)
    v_c, v_u = net(x_in, t, context=c), net(x_in, t, context=u)
    v = rescale_noise_cfg(v_u + 7.0 * (v_c - v_u), v_c, guidance_rescale=0.7)
    # diffusers' x0 from v: alpha x_vp - sigma_vp v with alpha = 1/sqrt(1+s^2), sigma_vp = s/sqrt(1+s^2).
    torch.testing.assert_close(guided, x / (s**2 + 1) - s / (s**2 + 1) ** 0.5 * v, rtol=0, atol=1e-12)


def _comfyui_rescale_cfg(x: Tensor, sigma: Tensor, cond_x0: Tensor, uncond_x0: Tensor, scale: float,
                         multiplier: float) -> Tensor:
    """ComfyUI's RescaleCFG node as a sampler_cfg_function: its args are cond = x - cond_x0 etc. and the result r
    becomes x0 = x - r (comfy/samplers.py cfg_function)."""
    cond, uncond = x - cond_x0, x - uncond_x0
    s = _bc(sigma, x)
    xs = x / (s * s + 1.0)
    cond_v = ((xs - (x - cond)) * (s**2 + 1.0) ** 0.5) / s
    uncond_v = ((xs - (x - uncond)) * (s**2 + 1.0) ** 0.5) / s
    x_cfg = uncond_v + scale * (cond_v - uncond_v)
    ro_pos = torch.std(cond_v, dim=(1, 2, 3), keepdim=True)
    ro_cfg = torch.std(x_cfg, dim=(1, 2, 3), keepdim=True)
    x_final = multiplier * (x_cfg * (ro_pos / ro_cfg)) + (1.0 - multiplier) * x_cfg
    return x - (x - (xs - x_final * s / (s * s + 1.0) ** 0.5))


def test_rescale_v_space_is_comfyui_rescalecfg() -> None:
    x, sigma, c, u = _data()
    rec = Recorder()
    guided = cfg_model(rec, {"context": c}, {"context": u}, 6.0, 0.7)(x, sigma)
    cond_x0, uncond_x0 = rec(x, sigma, context=c), rec(x, sigma, context=u)
    torch.testing.assert_close(guided, _comfyui_rescale_cfg(x, sigma, cond_x0, uncond_x0, 6.0, 0.7),
                               rtol=0, atol=1e-12)


def test_rescale_x0_space_is_a1111_extension() -> None:
    x, sigma, c, u = _data()
    rec = Recorder()
    guided = cfg_model(rec, {"context": c}, {"context": u}, 6.0, 0.7, "x0")(x, sigma)
    cond_x0, uncond_x0 = rec(x, sigma, context=c), rec(x, sigma, context=u)
    for i in range(x.shape[0]):  # CFG_Rescale_webui's cfg_replace, image by image
        xcfg = uncond_x0[i] + (cond_x0[i] - uncond_x0[i]) * 6.0
        xrescaled = xcfg * (torch.std(cond_x0[i]) / torch.std(xcfg))
        torch.testing.assert_close(guided[i], 0.7 * xrescaled + 0.3 * xcfg, rtol=0, atol=1e-12)


def test_rescale_spaces_differ_and_zero_rescale_is_plain_cfg() -> None:
    x, sigma, c, u = _data()
    rec = Recorder()
    outs = {sp: cfg_model(rec, {"context": c}, {"context": u}, 6.0, 0.7, sp)(x, sigma) for sp in ("v", "eps", "x0")}
    plain = cfg_model(rec, {"context": c}, {"context": u}, 6.0)(x, sigma)
    assert min((outs[a] - outs[b]).abs().max() for a, b in [("v", "eps"), ("v", "x0"), ("eps", "x0")]) > 1e-3
    assert all((o - plain).abs().max() > 1e-3 for o in outs.values())
    for sp in ("v", "eps", "x0"):
        torch.testing.assert_close(cfg_model(rec, {"context": c}, {"context": u}, 6.0, 0.0, sp)(x, sigma), plain,
                                   rtol=0, atol=0)
    with pytest.raises(ConfigError, match="rescale space"):
        cfg_model(rec, {"context": c}, {"context": u}, 6.0, 0.5, "noise")  # type: ignore[arg-type]


# --- masked denoising ---


def test_masked_model_blends_input_and_output_like_comfyui() -> None:
    x, sigma, _, _ = _data()
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(x.shape, generator=g, dtype=F64)
    noise = torch.randn(x.shape, generator=g, dtype=F64)
    mask = (torch.rand(3, 1, 6, 6, generator=g, dtype=F64) > 0.5).to(F64)
    mask[0, 0, 0, 0] = 0.25  # a soft mask value blends
    seen: list[Tensor] = []

    def inner(xi: Tensor, s: Tensor) -> Tensor:
        seen.append(xi.clone())
        return torch.sin(xi) * 0.5

    out = masked_model(inner, mask, latent, noise)(x, sigma)
    # KSamplerX0Inpaint: x = x * m + (latent + noise * sigma) * (1 - m); out = out * m + latent * (1 - m)
    want_in = x * mask + (latent + noise * _bc(sigma, x)) * (1 - mask)
    torch.testing.assert_close(seen[0], want_in, rtol=0, atol=0)
    torch.testing.assert_close(out, torch.sin(want_in) * 0.5 * mask + latent * (1 - mask), rtol=0, atol=0)
    seen.clear()
    out = masked_model(inner, mask, latent, noise, blend_input=False)(x, sigma)  # A1111: output blend only
    assert torch.equal(seen[0], x)
    torch.testing.assert_close(out, torch.sin(x) * 0.5 * mask + latent * (1 - mask), rtol=0, atol=0)


def test_masked_sampling_keeps_the_known_region() -> None:
    g = torch.Generator().manual_seed(2)
    latent = torch.randn(2, 4, 8, 8, generator=g, dtype=F64)
    noise = torch.randn(latent.shape, generator=g, dtype=F64)
    mask = torch.zeros(2, 1, 8, 8, dtype=F64)
    mask[:, :, 2:6, 3:7] = 1
    sigmas = karras(12, 0.03, 14.6, dtype=F64)
    model = masked_model(lambda xi, s: torch.tanh(xi / _bc((s**2 + 1) ** 0.5, xi)), mask, latent, noise)
    out = sample_euler(model, noise * sigmas[0], sigmas)
    keep = mask.expand_as(latent) == 0
    torch.testing.assert_close(out[keep], latent[keep], rtol=0, atol=1e-12)  # Euler's last step lands on x0
    assert (out[~keep] - latent[~keep]).abs().mean() > 0.1


def test_masked_model_checks_shapes() -> None:
    latent = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ConfigError, match="broadcast"):
        masked_model(lambda x, s: x, torch.ones(2, 1, 4, 4), latent, torch.zeros_like(latent))
    with pytest.raises(ConfigError, match="must broadcast to the latent"):
        masked_model(lambda x, s: x, torch.ones(2, 2, 1, 8, 8), latent, torch.zeros_like(latent))


# --- conditioning that changes during sampling ---


def test_step_schedule_maps_sigmas_to_steps() -> None:
    sigmas = karras(10, 0.03, 14.6, dtype=F64)
    sched = step_schedule([(0.5, {"tag": "a"}), (1.0, {"tag": "b"})], sigmas)
    assert [sched.step(s) for s in sigmas[:-1]] == list(range(10))
    mids = (sigmas[:-2] * sigmas[1:-1]).sqrt()  # strictly inside step i
    assert [sched.step(m) for m in mids] == list(range(9))
    assert [sched(s.reshape(1))["tag"] for s in sigmas[:-1]] == ["a"] * 5 + ["b"] * 5


@pytest.mark.parametrize(("sampler", "expected"), [
    (sample_euler, ["a"] * 5 + ["b"] * 5),
    # DPM2: the step-i evaluation at sigma_i, then one at the log-midpoint of step i (the last step is Euler).
    (sample_dpm_2, ["a"] * 10 + ["b"] * 9),
])
def test_prompt_editing_switches_at_half_the_steps(sampler, expected: list[str]) -> None:  # noqa: ANN001
    sigmas = karras(10, 0.03, 14.6, dtype=F64)
    a, b = torch.full((1, 2, 3), 0.1, dtype=F64), torch.full((1, 2, 3), -0.2, dtype=F64)
    rec = Recorder()
    cond = step_schedule([(0.5, {"context": a}), (1.0, {"context": b})], sigmas)  # "[a:b:0.5]"
    uncond = lambda s: {"context": torch.zeros(1, 2, 3, dtype=F64)}  # noqa: E731 - a callable cond works too
    sampler(cfg_model(rec, cond, uncond, 5.0), torch.ones(2, 4, dtype=F64) * sigmas[0], sigmas)
    tags = ["a" if bool((call["context"][-1] == 0.1).all()) else "b" for call in rec.calls]
    assert tags == expected
    assert all(bool((call["context"][:2] == 0).all()) for call in rec.calls)  # uncond rows first


def test_step_schedule_validates_segments() -> None:
    sigmas = karras(10, 0.03, 14.6)
    for bad in ([], [(0.5, {})], [(0.6, {}), (0.4, {}), (1.0, {})], [(0.0, {}), (1.0, {})]):
        with pytest.raises(ConfigError):
            step_schedule(bad, sigmas)
    with pytest.raises(ConfigError):
        step_schedule([(1.0, {})], sigmas[:1])
