"""UNet: parity with diffusers UNet2DConditionModel, real LDM/sgm key layouts, config inference, dtypes."""

from __future__ import annotations

import functools
import resource
import time
from dataclasses import replace
from typing import Any

import diffusers
import pytest
import torch
from diffusers import UNet2DConditionModel
from reference_sd_mecha import model_config

from sumie.checkpoints.keymaps.unet import diffusers_to_ldm_unet, infer_unet_config, ldm_to_diffusers_unet
from sumie.configs import SD1, SD2, SDXL, SDXL_REFINER, UNetConfig
from sumie.errors import CheckpointError
from sumie.models.hooks import Residuals
from sumie.models.unet import UNetModel, sdxl_adm_vector, timestep_embedding

LDM_PREFIX = "model.diffusion_model."

# Tiny variants: (diffusers config dict, our UNetConfig). diffusers' attention_head_dim is a head COUNT here.
SD1_TINY = (
    dict(
        block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
    ),
    UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, transformer_depth=(1, 1, 0),
        transformer_depth_middle=1, num_heads=4, context_dim=32, norm_groups=8,
    ),
)
SD2_TINY = (
    dict(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48, attention_head_dim=(2, 4),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), use_linear_projection=True,
        norm_num_groups=16,
    ),
    UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
        transformer_depth_middle=1, num_head_channels=16, context_dim=48, use_linear_in_transformer=True,
        norm_groups=16,
    ),
)
SDXL_TINY = (
    dict(
        block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=40,
        attention_head_dim=(2, 4, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
        transformer_layers_per_block=(1, 1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8, norm_num_groups=32,
    ),
    UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, transformer_depth=(0, 1, 2),
        transformer_depth_middle=2, num_head_channels=16, context_dim=40, use_linear_in_transformer=True,
        adm_in_channels=24 + 6 * 8, norm_groups=32,
    ),
)
REFINER_TINY = (
    dict(
        block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=24,
        attention_head_dim=(2, 4, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
        transformer_layers_per_block=2, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 5 * 8, norm_num_groups=16,
    ),
    UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(0, 2, 0),
        transformer_depth_middle=2, num_head_channels=16, context_dim=24, use_linear_in_transformer=True,
        adm_in_channels=16 + 5 * 8, norm_groups=16,
    ),
)
INPAINT_TINY = (
    dict(SD1_TINY[0], in_channels=9),
    replace(SD1_TINY[1], in_channels=9),
)
TINY = {"sd1": SD1_TINY, "sd2": SD2_TINY, "sdxl": SDXL_TINY, "refiner": REFINER_TINY, "inpaint": INPAINT_TINY}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Make every parameter random (norm weights/biases included), so swapped keys cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _reference(dcfg: dict[str, Any], seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**dcfg).eval()
    _perturb(ref, seed + 1)
    return ref


POOLED_DIM = {72: 24, 56: 16}  # tiny adm_in_channels -> pooled width (SDXL-like: 6 time ids, refiner-like: 5)


def _inputs(
    dcfg: dict[str, Any], cfg: UNetConfig, size: tuple[int, int] = (16, 16), batch: int = 2, seed: int = 3
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    inp: dict[str, Any] = {
        "x": torch.randn(batch, cfg.in_channels, *size, generator=g),
        "t": torch.tensor([999.0, 1.5, 500.0, 37.0][:batch]),
        "context": torch.randn(batch, 7, cfg.context_dim, generator=g),
        "added": None,
        "y": None,
    }
    if cfg.adm_in_channels is not None:
        dim = dcfg["addition_time_embed_dim"]
        pooled = torch.randn(batch, POOLED_DIM[cfg.adm_in_channels], generator=g)
        n_ids = (cfg.adm_in_channels - pooled.shape[1]) // dim
        ids = torch.tensor([[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0], [512.0, 512.0, 8.0, 0.0, 6.0, 1.0]])
        ids = ids[:batch, :n_ids]
        inp["added"] = {"text_embeds": pooled, "time_ids": ids}
        inp["y"] = sdxl_adm_vector(pooled, ids, embed_dim=dim)
    return inp


def _ref_out(ref: UNet2DConditionModel, inp: dict[str, Any], **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return ref(inp["x"], inp["t"], inp["context"], added_cond_kwargs=inp["added"], **kw).sample


def _ours(model: UNetModel, inp: dict[str, Any], **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(inp["x"], inp["t"], inp["context"], inp["y"], **kw)


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> float:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= rel * max(1.0, ref.abs().max().item()), f"max abs diff {diff}"
    return diff


def _ours_from_reference(ref: UNet2DConditionModel, cfg: UNetConfig) -> UNetModel:
    with torch.device("meta"):
        model = UNetModel(cfg)
    model.load_state_dict(diffusers_to_ldm_unet(ref.state_dict(), cfg), strict=True, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Parity with diffusers through our keymap


@pytest.mark.parametrize("name", list(TINY))
def test_parity_via_our_keymap(name: str) -> None:
    dcfg, cfg = TINY[name]
    ref = _reference(dcfg)
    model = _ours_from_reference(ref, cfg)
    inp = _inputs(dcfg, cfg)
    r = _ref_out(ref, inp)
    _assert_close(_ours(model, inp), r)
    assert r.abs().max() > 0.1  # a real signal, not zeros


def test_parity_float64() -> None:
    """In fp64 rounding cannot hide a semantic difference (e.g. something computed in fp32 on the way)."""
    dcfg, cfg = SDXL_TINY
    ref = _reference(dcfg, seed=9).double()
    model = _ours_from_reference(ref, cfg)
    inp = _inputs(dcfg, cfg)
    # /3: values that fp32 cannot represent, so a silent fp32 round trip shows up
    inp["x"], inp["context"] = inp["x"].double() / 3, inp["context"].double() / 3
    pooled, ids = inp["added"]["text_embeds"].double() / 3, inp["added"]["time_ids"].double()
    inp["added"] = {"text_embeds": pooled, "time_ids": ids}
    inp["y"] = sdxl_adm_vector(pooled, ids, embed_dim=dcfg["addition_time_embed_dim"])
    out = _ours(model, inp)
    assert out.dtype == torch.float64
    _assert_close(out, _ref_out(ref, inp), rel=1e-10)


@pytest.mark.parametrize("name", ["sd1", "sdxl", "refiner"])
def test_parity_odd_latent_size(name: str) -> None:
    """Sizes not divisible by 2**(levels-1): upsampling goes to the skip's size, as diffusers does."""
    dcfg, cfg = TINY[name]
    ref = _reference(dcfg, seed=5)
    model = _ours_from_reference(ref, cfg)
    inp = _inputs(dcfg, cfg, size=(10, 14), batch=2)
    _assert_close(_ours(model, inp), _ref_out(ref, inp))


def test_parity_control_residuals() -> None:
    """Residuals(skips=..., middle=...) equal diffusers' down/mid additional residuals (ControlNet)."""
    dcfg, cfg = SDXL_TINY
    ref = _reference(dcfg, seed=7)
    model = _ours_from_reference(ref, cfg)
    inp = _inputs(dcfg, cfg)
    feats: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, o: feats.append(o)) for b in model.input_blocks]
    mid: list[torch.Tensor] = []
    hooks.append(model.middle_block.register_forward_hook(lambda m, a, o: mid.append(o)))
    plain = _ours(model, inp)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(11)
    skips = [torch.randn(f.shape, generator=g) for f in feats]
    middle = torch.randn(mid[0].shape, generator=g)
    r = _ref_out(ref, inp, down_block_additional_residuals=tuple(skips), mid_block_additional_residual=middle)
    ours = _ours(model, inp, control=Residuals(skips=skips, middle=middle))
    _assert_close(ours, r)
    assert (ours - plain).abs().max() > 1e-2


def test_sdxl_adm_vector_matches_diffusers_layout() -> None:
    pooled = torch.randn(2, 5)
    ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [512.0, 768.0, 3.0, 4.0, 512.0, 768.0]])
    y = sdxl_adm_vector(pooled, ids, embed_dim=8)
    assert y.shape == (2, 5 + 6 * 8)
    torch.testing.assert_close(y[:, :5], pooled)
    emb = diffusers.models.embeddings.get_timestep_embedding(ids.flatten(), 8, True, 0)
    torch.testing.assert_close(y[:, 5:], emb.reshape(2, -1))


def test_timestep_embedding_matches_diffusers() -> None:
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    for dim in (8, 320, 1280):
        ref = diffusers.models.embeddings.get_timestep_embedding(t, dim, True, 0)  # flip to cos-first, no shift
        torch.testing.assert_close(timestep_embedding(t, dim), ref)


# ----------------------------------------------------------------------------------------------------
# Our LDM layout is the real one: diffusers' own LDM converter loads our state dict


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl", "refiner"])
def test_layout_via_diffusers_converter(name: str) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    dcfg, cfg = TINY[name]
    torch.manual_seed(0)
    model = UNetModel(cfg).eval()
    _perturb(model, 1)
    ckpt = {LDM_PREFIX + k: v for k, v in model.state_dict().items()}
    ref = UNet2DConditionModel(**dcfg).eval()
    converted = convert_ldm_unet_checkpoint(ckpt, dict(ref.config))
    ref.load_state_dict(converted, strict=True)
    inp = _inputs(dcfg, cfg, seed=4)
    _assert_close(_ours(model, inp), _ref_out(ref, inp))


# ----------------------------------------------------------------------------------------------------
# Key maps


@pytest.mark.parametrize("name", list(TINY))
def test_keymap_roundtrip_and_no_copies(name: str) -> None:
    dcfg, cfg = TINY[name]
    torch.manual_seed(0)
    sd = UNet2DConditionModel(**dcfg).state_dict()
    ldm = diffusers_to_ldm_unet(sd, cfg)
    assert len(ldm) == len(sd)
    back = ldm_to_diffusers_unet(ldm, cfg)
    assert back.keys() == sd.keys()
    assert all(back[k] is sd[k] for k in sd)


def test_keymap_names_unmappable_keys() -> None:
    dcfg, cfg = SD1_TINY
    sd = dict(UNet2DConditionModel(**dcfg).state_dict())
    sd["down_blocks.0.resnets.0.weird.weight"] = torch.zeros(1)
    sd["class_embedding.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"weird.*class_embedding|class_embedding.*weird"):
        diffusers_to_ldm_unet(sd, cfg)
    with pytest.raises(CheckpointError, match="foo.bar"):
        ldm_to_diffusers_unet({"foo.bar": torch.zeros(1)}, cfg)


# ----------------------------------------------------------------------------------------------------
# Real checkpoint layouts (sd-mecha's key/shape lists) and config inference


@functools.cache
def _mecha_keys(name: str) -> dict[str, tuple[int, ...]]:
    keys = model_config(name)["components"]["diffuser"]
    return {k[len(LDM_PREFIX) :]: tuple(v["shape"]) for k, v in keys.items() if k.startswith(LDM_PREFIX)}


def _meta_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = UNetModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("yaml_name", "cfg"), [("sd1-ldm", SD1.unet), ("sdxl-sgm", SDXL.unet)])
def test_state_dict_equals_real_layout(yaml_name: str, cfg: UNetConfig) -> None:
    real = _mecha_keys(yaml_name)
    ours = _meta_shapes(cfg)
    assert sorted(set(real) - set(ours)) == [], "missing"
    assert sorted(set(ours) - set(real)) == [], "unexpected"
    assert {k: v for k, v in ours.items() if real[k] != v} == {}


@pytest.mark.parametrize(
    "cfg",
    [SD1.unet, SD2.unet, SDXL.unet, SDXL_REFINER.unet, replace(SD1.unet, in_channels=9),
     replace(SD2.unet, in_channels=9)],
    ids=["sd1", "sd2", "sdxl", "sdxl_refiner", "sd1_inpaint", "sd2_inpaint"],
)
def test_infer_unet_config(cfg: UNetConfig) -> None:
    with torch.device("meta"):
        sd = UNetModel(cfg).state_dict()
    assert infer_unet_config(sd) == cfg


def test_infer_unet_config_on_real_layout() -> None:
    shapes = _mecha_keys("sdxl-sgm")
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert infer_unet_config(sd) == SDXL.unet


def test_infer_unet_config_rejects_non_unet() -> None:
    with pytest.raises(CheckpointError):
        infer_unet_config({"encoder.conv_in.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------
# Meta construction, dtypes


def test_meta_construction_and_assign_load() -> None:
    dcfg, cfg = SD2_TINY
    torch.manual_seed(0)
    real = UNetModel(cfg).eval()
    _perturb(real, 2)
    with torch.device("meta"):
        model = UNetModel(cfg)
    assert all(p.is_meta for p in model.parameters()) and not list(model.buffers())
    model.load_state_dict(real.state_dict(), strict=True, assign=True)
    assert not any(p.is_meta for p in model.parameters())
    inp = _inputs(dcfg, cfg)
    torch.testing.assert_close(_ours(model.eval(), inp), _ours(real, inp), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_half_precision_close_to_fp32(name: str, dtype: torch.dtype) -> None:
    dcfg, cfg = TINY[name]
    torch.manual_seed(0)
    model = UNetModel(cfg).eval()
    _perturb(model, 1)
    inp = _inputs(dcfg, cfg)
    ref = _ours(model, inp)
    half = model.to(dtype)
    out = _ours(half, inp)  # fp32 inputs: cast inside, output in x's dtype
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    inp_h = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    out_h = _ours(half, inp_h)
    assert out_h.dtype == dtype and torch.isfinite(out_h).all()
    scale = ref.abs().max().item()
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    assert (out - ref).abs().max().item() <= tol * scale
    assert (out_h.float() - ref).abs().max().item() <= 2 * tol * scale


# ----------------------------------------------------------------------------------------------------
# Full-size parity (slow): reference and ours share the same parameter tensors, so one copy lives in memory


def _full_size_parity(dcfg: dict[str, Any], cfg: UNetConfig, adm: bool) -> None:
    t0 = time.time()
    ref = _reference(dcfg)
    model = _ours_from_reference(ref, cfg)
    ours_ptrs = {p.data_ptr() for p in model.parameters()}
    assert ours_ptrs == {p.data_ptr() for p in ref.parameters()}  # shared, not copied
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, 32, 32, generator=g)
    t = torch.tensor([421.0])
    context = torch.randn(1, 77, cfg.context_dim, generator=g)
    added = y = None
    if adm:
        pooled = torch.randn(1, 1280, generator=g)
        ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
        added, y = {"text_embeds": pooled, "time_ids": ids}, sdxl_adm_vector(pooled, ids)
    with torch.no_grad():
        r = ref(x, t, context, added_cond_kwargs=added).sample
        o = model(x, t, context, y)
    diff = _assert_close(o, r)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    secs = time.time() - t0
    print(f"max diff {diff:.3g} (ref max {r.abs().max():.3g}); {secs:.0f} s; peak RSS {peak_gib:.1f} GiB")


SD15_DIFFUSERS = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL_DIFFUSERS = dict(
    block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


@pytest.mark.slow
def test_full_size_sd15_parity() -> None:
    _full_size_parity(SD15_DIFFUSERS, SD1.unet, adm=False)


@pytest.mark.slow
def test_full_size_sdxl_parity() -> None:
    _full_size_parity(SDXL_DIFFUSERS, SDXL.unet, adm=True)
