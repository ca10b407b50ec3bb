"""Tiled VAE decode / encode (sumie.pipelines.vae_tiling): the seam error against a whole-image pass on random-weight
VAEs (two tiny test configs, sumie-tiny's config) and sumie-tiny's trained VAE, bounds that fail without blending;
exact equality with tiling off; the memory plan's auto decision and its errors; the engine and CLI options."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import Tensor

import sumie
from sumie.cli.main import main
from sumie.configs import VAEConfig
from sumie.errors import ConfigError
from sumie.models.vae import AutoencoderKL
from sumie.pipelines import vae_io
from sumie.pipelines import vae_tiling as vt
from sumie.pipelines.params import GenerationParams
from sumie.pipelines.upscale import run_tiled, tile_spans

TINY_VAES = {
    "2lvl-g8": VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
    "3lvl-g32": VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, norm_groups=32),
    "sumie-tiny-cfg": VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
}
H, W, TILE, OVERLAP = 160, 224, 96, 32  # image pixels; 2 x 3 tiles


@pytest.fixture(scope="module")
def engine() -> sumie.Engine:
    e = sumie.load()
    e.show_progress = False
    return e


def random_vae(name: str) -> AutoencoderKL:
    """A random VAE from a seeded generator (no global seed): weights N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2),
    biases N(0, 0.1^2)."""
    vae = AutoencoderKL(TINY_VAES[name]).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * noise + (1.0 if "norm" in n and n.endswith("weight") else 0.0))
    return vae


def vae_of(name: str, engine: sumie.Engine) -> AutoencoderKL:
    return engine.models.vae if name == "sumie-tiny" else random_vae(name)


def seam_mask(n: int, spans: list[tuple[int, int]]) -> Tensor:
    """[n] bool: positions covered by more than one span (the blended bands)."""
    count = torch.zeros(n)
    for a, b in spans:
        count[a:b] += 1
    return count > 1


def seam_stats(out: Tensor, ref: Tensor, f_in: int, f_out: float, tile: int, overlap: int,
               align: int) -> dict[str, float]:
    """Error of a tiled result against the whole-image one: max / mean inside the seam bands and elsewhere, and the
    largest jump of the error field between neighbouring pixels (a visible seam is a jump)."""
    _, _, h, w = out.shape
    n_h, n_w = round(h / f_out), round(w / f_out)
    ys = [(round(a * f_out), round(b * f_out)) for a, b in tile_spans(n_h, tile, overlap, align)]
    xs = [(round(a * f_out), round(b * f_out)) for a, b in tile_spans(n_w, tile, overlap, align)]
    band = seam_mask(h, ys)[:, None] | seam_mask(w, xs)[None, :]
    err = (out - ref).abs().amax(1)[0]
    e = (out - ref)[0]
    jump = max((e[:, 1:] - e[:, :-1]).abs().mean(0).amax().item(), (e[1:] - e[:-1]).abs().mean(1).amax().item())
    return {"seam_max": err[band].max().item(), "seam_mean": err[band].mean().item(),
            "rest_mean": err[~band].mean().item() if (~band).any() else 0.0, "jump": jump}


def whole_jump(ref: Tensor) -> float:
    """The largest mean neighbour difference of the reference itself (its own texture), for scale."""
    e = ref[0]
    return max((e[:, 1:] - e[:, :-1]).abs().mean(0).amax().item(), (e[1:] - e[:-1]).abs().mean(1).amax().item())


def check_seams(kind: str, name: str, got: dict[str, float], cut: dict[str, float], cut_jump: float,
                ref: Tensor) -> None:
    """The bounds: inside the blended bands the error is no larger than inside the tiles (it is GroupNorm drift, not
    a seam: mean <= 1.1 x the rest's); the error field's largest jump is under half the hard cut's; the seam's max
    error under 40% of the reference's range. Removing the blending (a hard cut) breaks the first two."""
    scale = (ref.max() - ref.min()).item()
    print(f"\n{kind} {name}: blended {got}, hard cut {cut | {'jump': cut_jump}}, reference range {scale:.3f}")
    assert got["seam_mean"] <= 1.1 * got["rest_mean"], got
    assert cut["seam_mean"] > 1.1 * cut["rest_mean"], cut  # the bound tells a hard seam from a blended one
    assert got["jump"] <= 0.5 * cut_jump, (got, cut_jump)
    assert got["seam_max"] <= 0.4 * scale, (got, scale)


@pytest.mark.parametrize("name", [*TINY_VAES, "sumie-tiny"])
def test_tiled_decode_seams_against_whole_decode(name: str, engine: sumie.Engine) -> None:
    vae = vae_of(name, engine)
    f = vae.downscale
    z = torch.randn(1, 4, H // f, W // f, generator=torch.Generator().manual_seed(1)) * 2
    with torch.inference_mode():
        ref = vae.decode(z).float()
        out = vt.decode_tiled(vae, z, TILE, OVERLAP)
        h = vae.decoder.head(vae.post_quant_conv(z))
        hard = run_tiled(vae.decoder.upsample, h, f, TILE // f, 0)  # blending removed: tiles meet at a cut
    assert out.shape == ref.shape
    got = seam_stats(out, ref, 1, f, TILE // f, OVERLAP // f, 1)
    cut = seam_stats(hard, ref, 1, f, TILE // f, OVERLAP // f, 1)
    check_seams("decode", name, got, cut, seam_stats(hard, ref, 1, f, TILE // f, 0, 1)["jump"], ref)


@pytest.mark.parametrize("name", [*TINY_VAES, "sumie-tiny"])
def test_tiled_encode_seams_against_whole_encode(name: str, engine: sumie.Engine) -> None:
    vae = vae_of(name, engine)
    f = vae.downscale
    g = torch.Generator().manual_seed(2)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, H // 8, W // 8, generator=g), size=(H, W), mode="bicubic",
                                        align_corners=False).clamp(0, 1) * 2 - 1
    x = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    with torch.inference_mode():
        ref = vae.encode(x).mean
        out = vt.encode_tiled(vae, x, TILE, OVERLAP).mean
        feats = run_tiled(vae.encoder.features, x, 1 / f, TILE, 0, f)
        hard = torch.chunk(vae.quant_conv(vae.encoder.head(feats)), 2, dim=1)[0]
    assert out.shape == ref.shape
    got = seam_stats(out, ref, f, 1 / f, TILE, OVERLAP, f)
    cut = seam_stats(hard, ref, f, 1 / f, TILE, OVERLAP, f)
    check_seams("encode", name, got, cut, seam_stats(hard, ref, f, 1 / f, TILE, 0, f)["jump"], ref)


def test_tiling_off_is_the_untiled_pass_exactly() -> None:
    vae = random_vae("2lvl-g8")
    z = torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(3))
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.inference_mode():
        want_img = torch.cat([vae.decode(vae.unscale_latents(z[i : i + 1])).float() for i in range(2)])
        want_lat = torch.cat([vae.scale_latents(vae.encode(x[i : i + 1]).mean).float() for i in range(2)])
        for tiling in (vt.VAETiling("off", 64, 16), vt.VAETiling("auto", 64, 16, budget=1 << 40)):
            assert torch.equal(vae_io.decode(vae, z, tiling=tiling), want_img)
            assert torch.equal(vae_io.encode(vae, x, tiling=tiling), want_lat)
        on = vt.VAETiling("on", 64, 16)
        assert not torch.equal(vae_io.decode(vae, z, tiling=on), want_img)
        assert not torch.equal(vae_io.encode(vae, x, tiling=on), want_lat)


def test_auto_tiles_only_when_the_whole_pass_does_not_fit() -> None:
    vae = random_vae("2lvl-g8")
    h, w = 256, 384
    whole = vt.decode_bytes(vae.config, h, w, torch.float32)
    # one tile (64 px, the last one up to a grid cell longer), the mid block whole (4 maps of 64 channels at latent
    # size), the float32 image and weights
    tiled_need = (vt.decode_bytes(vae.config, 64 + 2, 64 + 2, torch.float32) + 4 * 64 * (h // 2) * (w // 2) * 4
                  + 4 * h * w * 4)
    assert tiled_need < whole
    between = vt.VAETiling("auto", 64, 16, budget=(whole + tiled_need) // 2)
    assert vt.plan_tiles("decode", vae, h, w, dataclasses.replace(between, budget=whole)) is None
    assert vt.plan_tiles("decode", vae, h, w, between) == 64
    assert vt.plan_tiles("decode", vae, h, w, vt.VAETiling("on", 64, 16)) == 64
    assert vt.plan_tiles("decode", vae, h, w, vt.VAETiling("off", 64, 16)) is None
    z = torch.randn(1, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():  # the auto decision is what runs
        assert torch.equal(vae_io.decode(vae, z, tiling=between),
                           vt.decode_tiled(vae, vae.unscale_latents(z), 64, 16))
    with pytest.raises(ConfigError, match=r"needs about .* GiB whole and .* GiB in 64-pixel tiles"):
        vt.plan_tiles("decode", vae, h, w, dataclasses.replace(between, budget=tiled_need - 1))
    assert vt.plan_tiles("decode", vae, h, w, dataclasses.replace(between, budget=tiled_need)) == 64
    with pytest.raises(ConfigError, match="turn VAE tiling on"):
        vt.plan_tiles("decode", vae, h, w, vt.VAETiling("off", 64, 16, budget=whole // 2))
    enc_whole = vt.encode_bytes(vae.config, h, w, torch.float32)
    assert vt.plan_tiles("encode", vae, h, w, vt.VAETiling("auto", 64, 16, budget=enc_whole // 2)) == 64
    # half precision halves the activations
    assert vt.decode_bytes(vae.config, h, w, torch.float16) < 0.6 * whole


def test_sd_vae_estimate_is_near_the_measured_peak() -> None:
    # measured on this CPU (growth of ru_maxrss in a fresh process, float32 SD VAE, 1024 x 1024, one thread): decode
    # 3871 MiB, encode 3096 MiB; the estimates must cover them with at most 50% to spare
    measured_dec, measured_enc = 3871 * 2**20, 3096 * 2**20
    est_dec = vt.decode_bytes(VAEConfig(), 1024, 1024, torch.float32)
    est_enc = vt.encode_bytes(VAEConfig(), 1024, 1024, torch.float32)
    assert measured_dec <= est_dec <= 1.5 * measured_dec, est_dec
    assert measured_enc <= est_enc <= 1.5 * measured_enc, est_enc


def test_free_memory_reads_the_system() -> None:
    free = vt.free_memory(torch.device("cpu"))
    assert 0 < free < 1 << 50


def test_engine_tiling_options_and_early_memory_error(engine: sumie.Engine) -> None:
    base = GenerationParams("a red circle", steps=3, seed=1, width=96, height=64)
    auto = engine.generate(base).images[0]
    off = engine.generate(dataclasses.replace(base, vae_tiling="off")).images[0]
    assert np.array_equal(np.asarray(auto), np.asarray(off))  # small: auto decodes whole
    on = engine.generate(dataclasses.replace(base, vae_tiling="on", vae_tile_size=64)).images[0]
    assert on.size == off.size and not np.array_equal(np.asarray(on), np.asarray(off))
    events: list[object] = []
    engine.memory_budget = 1000
    try:
        with pytest.raises(ConfigError, match="needs about"):
            engine.generate(base, progress=events.append)
    finally:
        engine.memory_budget = None
    assert events == []  # refused before the first step
    with pytest.raises(ConfigError, match="vae tile size must be a multiple of 8"):
        engine.generate(dataclasses.replace(base, vae_tile_size=100))


def test_cli_vae_tiling_flags(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "x", "--vae-tile-size", "100", "-o", str(tmp_path), "-q"]) == 2  # type: ignore[arg-type]
    assert "--vae-tile-size must be a multiple of 8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "x", "--vae-tiling", "maybe"])
    out = tmp_path / "a.png"  # type: ignore[operator]
    assert main(["generate", "x", "--steps", "2", "--width", "64", "--height", "64", "--vae-tiling", "on",
                 "--vae-tile-size", "32", "-o", str(out), "-q"]) == 0
    assert out.exists()
