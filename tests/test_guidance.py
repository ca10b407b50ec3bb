"""Guidance: classifier-free guidance (batching, skipped uncond pass, several weighted conds, prompts of different
lengths in one call, CFG rescale against diffusers, ComfyUI and A1111's extension) and masked denoising (ComfyUI's
KSamplerX0Inpaint)."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import Tensor

from sumie.errors import ConfigError
from sumie.sampling.denoisers import EpsDenoiser, VDenoiser
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.guidance import cfg_model, guided_call, masked_model, repeat_to_common_length
from sumie.sampling.samplers.ode import sample_euler
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


def test_cfg_is_one_batched_call_with_uncond_last() -> None:
    x, sigma, c, u = _data()
    rec = Recorder()
    out = cfg_model(rec, {"context": c, "gain": 0.5}, {"context": u, "gain": 0.5}, 7.5)(x, sigma)
    assert len(rec.calls) == 1 and rec.calls[0]["batch"] == 6
    assert torch.equal(rec.calls[0]["context"], torch.cat([c, u])) and rec.calls[0]["gain"] == 0.5
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
    assert torch.equal(rec.calls[0]["context"], torch.cat([c[:1].expand(3, 5, 8), u[:1].expand(3, 5, 8)]))
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


# --- several conds, rows, prompts of different lengths ---


def test_weighted_conds_follow_composable_diffusion() -> None:
    """AND: x0 = u + sum_i w_i * scale * (c_i - u), all conds and the uncond in one call, rows labelled."""
    x, sigma, c, u = _data()
    c2 = c.flip(0) * 0.5
    rec = Recorder()
    labels: list[Tensor] = []

    def extra(rows: Tensor) -> dict:
        labels.append(rows)
        return {}

    out = guided_call(rec, x, sigma, [({"context": c}, 1.0), ({"context": c2}, -0.4)], {"context": u}, 5.0,
                      extra=extra)
    assert [call["batch"] for call in rec.calls] == [9]
    assert labels[0].tolist() == [1, 1, 1, 2, 2, 2, 0, 0, 0]
    ref = Recorder()
    a, b, n = ref(x, sigma, context=c), ref(x, sigma, context=c2), ref(x, sigma, context=u)
    torch.testing.assert_close(out, n + 5.0 * (a - n) - 0.4 * 5.0 * (b - n), rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="uncond"):
        guided_call(rec, x, sigma, [({"context": c}, 1.0), ({"context": c2}, 1.0)], None, 5.0)


def _attention_denoiser(x: Tensor, sigma: Tensor, *, context: Tensor) -> Tensor:
    """A toy network that reads its context through softmax attention only (queries from x)."""
    q = x.flatten(2).transpose(1, 2)  # [B, N, 4]
    w = (q @ context[..., :4].transpose(1, 2)).softmax(-1)  # [B, N, L]
    return x + (w @ context).mean(-1).view(x.shape[0], 1, 6, 6) * 0.1


def test_prompts_of_different_lengths_share_one_call_through_repetition() -> None:
    """Repeating a context to the common length changes nothing for attention: one call == two separate calls."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 6, 6, generator=g, dtype=F64)
    sigma = torch.full((3,), 1.5, dtype=F64)
    c = torch.randn(1, 6, 8, generator=g, dtype=F64)  # a "two-chunk" prompt
    u = torch.randn(1, 4, 8, generator=g, dtype=F64)  # a "one-chunk" negative prompt
    assert [r.shape[1] for r in repeat_to_common_length([c, u])] == [12, 12]
    calls: list[int] = []

    def den(xx: Tensor, s: Tensor, *, context: Tensor) -> Tensor:
        calls.append(context.shape[1])
        return _attention_denoiser(xx, s, context=context)

    out = guided_call(den, x, sigma, [({"context": c}, 1.0)], {"context": u}, 6.0, repeat_context=True)
    assert calls == [12]
    a = _attention_denoiser(x, sigma, context=c.expand(3, -1, -1))
    n = _attention_denoiser(x, sigma, context=u.expand(3, -1, -1))
    torch.testing.assert_close(out, n + 6.0 * (a - n), rtol=0, atol=1e-12)  # fp64: rounding only
    with pytest.raises(ConfigError, match="shapes differ"):  # without the opt-in: a clear error
        guided_call(den, x, sigma, [({"context": c}, 1.0)], {"context": u}, 6.0)
