"""AutoencoderKL and TAESD: parity with diffusers on random weights, real key layouts, dtypes, meta loading."""

from __future__ import annotations

import dataclasses

import diffusers
import pytest
import torch
from reference_sd_mecha import model_config
from torch import Tensor

from sumie.checkpoints.keymaps.vae import (
    diffusers_to_ldm_vae,
    infer_vae_config,
    ldm_to_diffusers_vae,
    taesd_keys_to_sumie,
    vae_attention_to_conv,
)
from sumie.configs import SD1, SDXL, VAEConfig
from sumie.errors import CheckpointError, ConfigError
from sumie.models.packed import set_weight_packing
from sumie.models.taesd import TAESD
from sumie.models.vae import AutoencoderKL

# (sumie config, diffusers kwargs, image height, width)
TINY = [
    pytest.param(
        VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
        dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
        32,
        32,
        id="2lvl-g8",
    ),
    pytest.param(
        VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, norm_groups=32),
        dict(block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=32),
        24,
        40,
        id="3lvl-g32",
    ),
]


def assert_close(out: Tensor, ref: Tensor, rel: float = 1e-4) -> float:
    """Project tolerance: max|out - ref| <= rel * max(1, max|ref|); returns the difference."""
    assert out.shape == ref.shape
    diff = (out.float() - ref.float()).abs().max().item()
    bound = rel * max(1.0, ref.float().abs().max().item())
    assert diff <= bound, f"max abs diff {diff:.3e} > {bound:.3e}"
    return diff


def diffusers_vae(kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """Random diffusers AutoencoderKL; norms and biases perturbed so they matter."""
    n = len(kwargs["block_out_channels"])
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        **kwargs,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Fresh random weights: default-ish convs, norms around 1, small biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def images(b: int, h: int, w: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


def compare_with_diffusers(ours: AutoencoderKL, ref: torch.nn.Module, h: int, w: int) -> dict[str, float]:
    x = images(2, h, w)
    f = ours.downscale
    z = torch.randn(2, 4, h // f, w // f, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post_ref = ref.encode(x).latent_dist
        post = ours.encode(x)
        diffs = {
            "mean": assert_close(post.mean, post_ref.mean),
            "logvar": assert_close(post.logvar, post_ref.logvar),
            "std": assert_close(post.std, post_ref.std),
            # Same convention as diffusers in fp32: eps ~ randn(mean.shape, generator) on the generator's device.
            "sample": assert_close(
                post.sample(torch.Generator().manual_seed(7)), post_ref.sample(torch.Generator().manual_seed(7))
            ),
            "decode": assert_close(ours.decode(z), ref.decode(z).sample),
            # diffusers' DiagonalGaussianDistribution.mode(): the oracle, not our own mean again
            "mode": assert_close(post.mode(), post_ref.mode()),
        }
    return diffs


@pytest.mark.parametrize(("cfg", "kwargs", "h", "w"), TINY)
def test_parity_with_diffusers_through_keymap(cfg: VAEConfig, kwargs: dict, h: int, w: int) -> None:
    ref = diffusers_vae(kwargs)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(diffusers_to_ldm_vae(ref.state_dict()), strict=True)
    diffs = compare_with_diffusers(ours, ref, h, w)
    print(diffs)


@pytest.mark.parametrize(("cfg", "kwargs", "h", "w"), TINY)
def test_ldm_layout_through_diffusers_own_converter(cfg: VAEConfig, kwargs: dict, h: int, w: int) -> None:
    """Our random weights -> diffusers' LDM converter -> diffusers model: same outputs (keymap not involved)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ours = AutoencoderKL(cfg).eval()
    randomize(ours, seed=3)
    ref = diffusers_vae(kwargs, seed=5)
    ckpt = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(ckpt, dict(ref.config))
    ref.load_state_dict(converted, strict=True)
    compare_with_diffusers(ours, ref, h, w)

    # Our inverse map agrees with diffusers' converter tensor for tensor; the round trip is the identity.
    mine = ldm_to_diffusers_vae(ours.state_dict())
    assert mine.keys() == converted.keys()
    for k, v in converted.items():
        assert torch.equal(mine[k], v), k
    back = diffusers_to_ldm_vae(mine)
    assert back.keys() == ours.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k


def test_old_diffusers_attention_names_and_linear_attention() -> None:
    ref = diffusers_vae(TINY[0].values[1])
    new = ref.state_dict()
    rename = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in new.items():
        for a, b in rename.items():
            k = k.replace(f"attentions.0.{a}.", f"attentions.0.{b}.")
        old[k] = v
    assert any(".query.weight" in k for k in old)
    a, b = diffusers_to_ldm_vae(new), diffusers_to_ldm_vae(old)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)

    # Single-file checkpoints converted from diffusers sometimes keep Linear-shaped attention weights.
    flat = {k: (v.flatten(1) if ".attn_1." in k and v.ndim == 4 else v) for k, v in a.items()}
    assert flat["decoder.mid.attn_1.proj_out.weight"].ndim == 2
    fixed = vae_attention_to_conv(flat)
    assert all(torch.equal(fixed[k], a[k]) for k in a)
    AutoencoderKL(TINY[0].values[0]).load_state_dict(fixed, strict=True)


def test_keymap_errors_name_the_key() -> None:
    sd = diffusers_vae(TINY[0].values[1]).state_dict()
    sd["encoder.mid_block.attentions.0.rel_pos.weight"] = torch.zeros(1)
    sd["decoder.up_blocks.0.resnets.0.time_emb_proj.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="rel_pos") as e:
        diffusers_to_ldm_vae(sd)
    assert "time_emb_proj" in str(e.value)
    with pytest.raises(CheckpointError, match="bogus"):
        ldm_to_diffusers_vae({"encoder.bogus.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="post_quant_conv"):
        infer_vae_config(
            {
                k: v
                for k, v in diffusers_to_ldm_vae(diffusers_vae(TINY[0].values[1]).state_dict()).items()
                if not k.startswith("post_quant_conv")
            }
        )


def _mecha_vae(name: str) -> dict[str, tuple[int, ...]]:
    doc = model_config(name)
    prefix = "first_stage_model."
    return {
        k[len(prefix) :]: tuple(v["shape"])
        for comp in doc["components"].values()
        for k, v in comp.items()
        if k.startswith(prefix)
    }


@pytest.mark.parametrize(("yaml_name", "cfg"), [("sd1-ldm", SD1.vae), ("sdxl-sgm", SDXL.vae)])
def test_real_ldm_layout_matches_sd_mecha(yaml_name: str, cfg: VAEConfig) -> None:
    real = _mecha_vae(yaml_name)
    assert len(real) == 248
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours.keys() == real.keys(), (sorted(ours.keys() - real.keys()), sorted(real.keys() - ours.keys()))
    assert ours == real
    meta_sd = {k: torch.empty(s, device="meta") for k, s in real.items()}
    inferred = infer_vae_config(meta_sd)
    assert dataclasses.replace(inferred, scaling_factor=cfg.scaling_factor) == cfg
    # Our inverse keymap sends the real layout onto diffusers' full-size key set and shapes.
    n = len(cfg.ch_mult)
    with torch.device("meta"):
        dref = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
            layers_per_block=cfg.num_res_blocks,
        )
    mapped = {k: tuple(v.shape) for k, v in ldm_to_diffusers_vae(meta_sd).items()}
    assert mapped == {k: tuple(v.shape) for k, v in dref.state_dict().items()}


def test_meta_construction_and_assign_load() -> None:
    cfg = TINY[1].values[0]
    src = AutoencoderKL(cfg).eval()
    randomize(src, seed=11)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    assert list(model.buffers()) == []
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval()
    assert all(p.device.type == "cpu" for p in model.parameters())
    loaded = model.state_dict()
    assert all(loaded[k].data_ptr() == v.data_ptr() for k, v in sd.items())  # assigned, not copied
    assert loaded.keys() == src.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in src.state_dict().items())  # exactly the source's values
    x = images(1, 16, 16)
    with torch.no_grad():
        z = src.encode(x).mean
        pairs = ((model.encode(x).mean, z), (model.decode(z), src.decode(z)))
    # Same values in other memory (clones): kernels may choose their path by alignment. Measured: identical here,
    # even with memory-mapped weights; a UNet with memory-mapped weights differs by 1e-6 of its output's max on AVX2
    # AMD (test_checkpoints), so 1e-5 of the max, far below what a wrong or missing weight changes.
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_sample_draws_fp32_noise_from_generator() -> None:
    model = AutoencoderKL(TINY[0].values[0]).eval()
    randomize(model, seed=4)
    x = images(1, 16, 16)
    with torch.no_grad():
        post = model.encode(x)
        eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float32)
        assert torch.equal(post.sample(torch.Generator().manual_seed(9)), post.mean + post.std * eps)
        assert not torch.equal(post.sample(), post.sample())
        # Half-precision posteriors draw the same fp32 noise, then cast (diffusers draws in the half dtype).
        half = model.to(torch.bfloat16).encode(x)
        s = half.sample(torch.Generator().manual_seed(9))
        assert s.dtype == torch.bfloat16
        assert torch.equal(s, half.mean + half.std * eps.to(torch.bfloat16))


def test_scaling_helpers() -> None:
    model = AutoencoderKL(
        VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, scaling_factor=0.5, shift_factor=0.25)
    )
    z = torch.randn(1, 4, 2, 2)
    assert torch.allclose(model.scale_latents(z), (z - 0.25) * 0.5)
    assert torch.allclose(model.unscale_latents(model.scale_latents(z)), z)


@pytest.mark.parametrize(("dtype", "rel"), [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_close_to_fp32(dtype: torch.dtype, rel: float) -> None:
    cfg, kwargs, h, w = TINY[0].values
    ref = diffusers_vae(kwargs)
    model = AutoencoderKL(cfg).eval()
    model.load_state_dict(diffusers_to_ldm_vae(ref.state_dict()))
    x = images(1, h, w)
    with torch.no_grad():
        mean32 = model.encode(x).mean
        img32 = model.decode(mean32)
        model.to(dtype)
        post = model.encode(x)
        img = model.decode(mean32)
    for out, full in ((post.mean, mean32), (img, img32)):
        assert out.dtype == dtype
        assert torch.isfinite(out).all()
        assert_close(out, full, rel=rel)


# ------------------------------------------------------------------------------------------------- TAESD


@pytest.fixture(scope="module")
def tiny_ref() -> torch.nn.Module:
    """diffusers AutoencoderTiny with its default (= real TAESD) config, weights scaled to keep signals O(1)."""
    torch.manual_seed(0)
    model = diffusers.AutoencoderTiny().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 4:
                torch.nn.init.kaiming_normal_(p, nonlinearity="relu")
                p.mul_(0.6)
            else:
                p.normal_(0.0, 0.05)
    return model


def published_layout(diffusers_sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Diffusers AutoencoderTiny keys -> the published taesd_encoder / taesd_decoder files.

    Per diffusers' conversion script: encoder indices are the same, decoder indices are one higher
    (the published decoder Sequential starts with its Clamp layer).
    """
    enc, dec = {}, {}
    for k, v in diffusers_sd.items():
        part, layers, idx, rest = k.split(".", 3)
        assert layers == "layers"
        if part == "encoder":
            enc[f"{idx}.{rest}"] = v
        else:
            dec[f"{int(idx) + 1}.{rest}"] = v
    return enc, dec


def _taesd_io(small: bool = False) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    b, h, w = (1, 16, 24) if small else (2, 48, 64)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1, 2.5 * torch.randn(b, 4, h // 8, w // 8, generator=g)


def test_taesd_parameter_count(tiny_ref: torch.nn.Module) -> None:
    model = TAESD()
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    assert n_enc == sum(p.numel() for p in tiny_ref.encoder.parameters())
    assert n_dec == sum(p.numel() for p in tiny_ref.decoder.parameters())
    assert 1.15e6 < n_enc < 1.3e6 and 1.15e6 < n_dec < 1.3e6


def test_taesd_parity_diffusers_layout(tiny_ref: torch.nn.Module) -> None:
    model = TAESD.from_state_dict(tiny_ref.state_dict()).eval()
    x, z = _taesd_io()
    with torch.no_grad():
        enc = model.encode(x)
        ref_enc = tiny_ref.encode(x).latents
        dec = model.decode(z)
        ref_dec = tiny_ref.decode(z).sample
    assert enc.shape == (2, 4, 6, 8) and dec.shape == (2, 3, 48, 64)
    assert ref_enc.abs().max() > 0.05 and ref_dec.abs().max() > 0.5  # signals are not degenerate
    print("taesd enc", assert_close(enc, ref_enc), "dec", assert_close(dec, ref_dec))


def test_taesd_published_layout(tiny_ref: torch.nn.Module) -> None:
    enc_sd, dec_sd = published_layout(tiny_ref.state_dict())
    assert "0.weight" in enc_sd and "1.weight" in dec_sd and "0.weight" not in dec_sd
    # Sumie's own layout is the published one under encoder./decoder. prefixes.
    own = TAESD().state_dict()
    expected = {f"encoder.{k}": v.shape for k, v in enc_sd.items()}
    expected |= {f"decoder.{k}": v.shape for k, v in dec_sd.items()}
    assert {k: v.shape for k, v in own.items()} == expected

    x, z = _taesd_io()
    both = TAESD()
    both.load_part(enc_sd, "encoder")
    both.load_part(dec_sd)  # part recognised from the keys
    enc_only = TAESD.from_state_dict(enc_sd)
    dec_only = TAESD.from_state_dict(dec_sd, part="decoder")
    assert dec_only.encoder is None and enc_only.decoder is None
    with torch.no_grad():
        ref_enc = tiny_ref.encode(x).latents
        ref_dec = tiny_ref.decode(z).sample
        assert_close(both.encode(x), ref_enc)
        assert_close(both.decode(z), ref_dec)
        assert_close(enc_only.encode(x), ref_enc)
        assert_close(dec_only.decode(z), ref_dec)
    with pytest.raises(ConfigError):
        dec_only.encode(x)
    with pytest.raises(ConfigError):
        enc_only.decode(z)

    # ComfyUI's combined layout, and diffusers' sub-module layout given with a part.
    comfy = {f"taesd_encoder.{k}": v for k, v in enc_sd.items()} | {f"taesd_decoder.{k}": v for k, v in dec_sd.items()}
    comfy |= {"vae_scale": torch.tensor(1.0), "vae_shift": torch.tensor(0.0)}
    conv = taesd_keys_to_sumie(comfy)
    assert conv.keys() == own.keys()
    dec_layers = {k[len("decoder.") :]: v for k, v in tiny_ref.state_dict().items() if k.startswith("decoder.")}
    assert taesd_keys_to_sumie(dec_layers, "decoder").keys() == {f"decoder.{k}" for k in dec_sd}


def test_taesd_errors(tiny_ref: torch.nn.Module) -> None:
    sd = dict(tiny_ref.state_dict())
    sd["decoder.layers.5.conv.1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.5\.conv\.1\.weight"):
        taesd_keys_to_sumie(sd)
    with pytest.raises(CheckpointError, match="part"):
        taesd_keys_to_sumie({"0.weight": torch.zeros(1)}, part="middle")
    enc_sd, _ = published_layout(tiny_ref.state_dict())
    with pytest.raises(CheckpointError):  # encoder weights declared as a decoder
        TAESD.from_state_dict(enc_sd, part="decoder")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_taesd_half_precision(tiny_ref: torch.nn.Module, dtype: torch.dtype) -> None:
    model = TAESD.from_state_dict(tiny_ref.state_dict())
    x, z = _taesd_io(small=True)
    with torch.no_grad():
        enc32, dec32 = model.encode(x), model.decode(z)
        half = TAESD.from_state_dict(tiny_ref.state_dict(), dtype=dtype)
        enc, dec = half.encode(x), half.decode(z)
    for out, full in ((enc, enc32), (dec, dec32)):
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert_close(out, full, rel=0.05)


# ------------------------------------------------------------------------------------------- full size


@pytest.mark.slow
def test_full_size_sd_vae_parity() -> None:
    kwargs = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
    ref = diffusers_vae(kwargs)
    ours = AutoencoderKL(SD1.vae).eval()
    sd = diffusers_to_ldm_vae(ref.state_dict())
    assert infer_vae_config(sd) == SD1.vae
    ours.load_state_dict(sd, strict=True)
    print(compare_with_diffusers(ours, ref, 64, 64))


def test_inference_frees_in_place_and_matches_the_autograd_path() -> None:
    """Without autograd the decoder's SiLU and residuals reuse their input's memory: the same numbers as the
    out-of-place autograd path (packing off, so both run the same convolutions), and gradients still flow."""
    cfg, _, h, w = TINY[1].values
    model = AutoencoderKL(cfg).eval()
    randomize(model, 3)
    set_weight_packing(model, "off")
    z = torch.randn(1, 4, h // model.downscale, w // model.downscale, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        fast = model.decode(z)
    zg = z.clone().requires_grad_(True)
    slow = model.decode(zg)
    assert torch.equal(fast, slow.detach())
    slow.square().mean().backward()
    assert zg.grad is not None and bool(torch.isfinite(zg.grad).all()) and zg.grad.abs().sum() > 0
