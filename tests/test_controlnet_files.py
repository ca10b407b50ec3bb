"""ControlNet files of every layout: residuals vs diffusers' ControlNetModel, real key names / shapes, Control-LoRA
against its definition, and the errors.

Tolerance of the parity tests: max |Sumie - diffusers| <= 1e-5 * max |diffusers| per residual (fp32, CPU); the
two are different code on the same weights (measured: 0.0 on this machine's CPU, the kernels coincide).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel as DiffusersControlNet
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from torch import Tensor

from sumie.adapters.control.files import ControlFile, check_family, controlnet_state_dict, load_controlnet
from sumie.checkpoints.io import load_state_dict
from sumie.configs import SD1, SDXL, TINY, UNetConfig
from sumie.errors import CheckpointError, ConfigError
from sumie.models.controlnet import ControlNetModel
from sumie.models.hooks import Residuals
from sumie.models.unet import sdxl_adm_vector
from tests.control_testfiles import (
    ADM_ID_DIM,
    TINY_CONTROLNET,
    TINY_SDXL_MID,
    TINY_SDXL_SMALL,
    control_lora_tensors,
    diffusers_kwargs,
    original_state_dict,
    random_controlnet,
    random_diffusers_controlnet,
    random_unet,
    save_tensors,
    write_control_lora,
    write_diffusers,
    write_original,
)

REL_TOL = 1e-5
# an SD1-shaped ControlNet: 3 levels (the last without attention), 2 ResBlocks a level, CLIP-L's 768-wide context
SD1_SMALL = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, transformer_depth=(1, 1, 0),
                       context_dim=768)


def _inputs(cfg: UNetConfig, seed: int = 0) -> dict[str, Tensor]:
    """Latent [2, 4, 16, 16], hint [2, 3, 128, 128] in [0, 1], t [2], context [2, 7, ctx], SDXL pooled / time ids."""
    g = torch.Generator().manual_seed(seed)
    out = {"x": torch.randn(2, cfg.in_channels, 16, 16, generator=g), "hint": torch.rand(2, 3, 128, 128, generator=g),
           "t": torch.tensor([500.0, 20.0]), "context": torch.randn(2, 7, cfg.context_dim, generator=g)}
    if cfg.adm_in_channels is not None:
        out["pooled"] = torch.randn(2, cfg.adm_in_channels - 6 * ADM_ID_DIM, generator=g)
        out["time_ids"] = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 512, 16, 8, 1024, 1024]])
    return out


@torch.no_grad()
def _sumie(control: ControlFile, inp: dict[str, Tensor], hint: Tensor | None = None) -> Residuals:
    y = sdxl_adm_vector(inp["pooled"], inp["time_ids"]) if "pooled" in inp else None
    return control.model(inp["x"], inp["hint"] if hint is None else hint, inp["t"], inp["context"], y)


@torch.no_grad()
def _diffusers(model: torch.nn.Module, inp: dict[str, Tensor]) -> tuple[list[Tensor], Tensor]:
    kw = {}
    if "pooled" in inp:
        kw["added_cond_kwargs"] = {"text_embeds": inp["pooled"], "time_ids": inp["time_ids"]}
    down, mid = model(inp["x"], inp["t"], inp["context"], controlnet_cond=inp["hint"], return_dict=False, **kw)
    return list(down), mid


def _assert_parity(ours: Residuals, ref: tuple[list[Tensor], Tensor]) -> float:
    """Max relative error over all residuals; fails above REL_TOL or when counts / shapes differ."""
    down, mid = ref
    assert len(ours.skips) == len(down)
    worst = 0.0
    for a, b in [*zip(ours.skips, down, strict=True), (ours.middle, mid)]:
        assert a is not None and a.shape == b.shape
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    assert worst <= REL_TOL, worst
    return worst


# ---------------------------------------------------------------- (a) residuals vs diffusers


@pytest.mark.parametrize("name,prefix,full_model", [
    ("control_sd15.pth", True, False),  # control_v11p_sd15_canny.pth
    ("control_sd15_fp16.safetensors", False, False),  # the unprefixed safetensors conversions
    ("control_sd15_v10.ckpt", True, True),  # 1.0 files: a whole SD model beside control_model.*
])
def test_original_layout_matches_diffusers_single_file_converter(tmp_path: Path, name: str, prefix: bool,
                                                                 full_model: bool) -> None:
    """SD1 original layout vs diffusers' ControlNetModel loaded through diffusers' own single-file converter
    (``diffusers.loaders.single_file_utils.convert_controlnet_checkpoint``, which also strips ``control_model.``
    and drops the SD model of 1.0 files); the control image changes every residual."""
    path = write_original(tmp_path / name, random_controlnet(SD1_SMALL, seed=1), prefix, full_model)
    control = load_controlnet(path)
    assert (control.family, control.kind, control.hint_channels, control.layout) == ("sd1", "controlnet", 3,
                                                                                      "original")
    assert control.model.config == SD1_SMALL
    ref = DiffusersControlNet(**diffusers_kwargs(SD1_SMALL)).eval()
    ref.load_state_dict(convert_controlnet_checkpoint(load_state_dict(path), {"layers_per_block": 2}), strict=True)
    inp = _inputs(SD1_SMALL)
    ours = _sumie(control, inp)
    _assert_parity(ours, _diffusers(ref, inp))
    other = _sumie(control, inp, hint=inp["hint"].flip(-1))
    for a, b in zip([*ours.skips, ours.middle], [*other.skips, other.middle], strict=True):
        assert float((a - b).abs().max()) > 0.1 * float(a.abs().max())  # type: ignore[union-attr]


@pytest.mark.parametrize("which,folder", [
    ("sd1", False), ("sd1", True), ("sd2", True), ("sdxl", False), ("sdxl", True),
    ("sdxl_mid", True), ("sdxl_small", False),
])
def test_diffusers_layout_matches_diffusers(tmp_path: Path, which: str, folder: bool) -> None:
    """diffusers-layout files written by diffusers itself (``save_pretrained`` folder, or one safetensors file)
    give diffusers' residuals; SDXL with text_embeds / time_ids vs Sumie's ADM vector y (``sdxl_adm_vector``).
    "mid" / "small": diffusers' SDXL ControlNets with transformer_layers_per_block [0, 0, 1] / [0, 0, 0], whose
    CrossAttn levels keep zero-layer transformers (norm, proj_in, proj_out)."""
    cfg = {"sdxl_mid": TINY_SDXL_MID, "sdxl_small": TINY_SDXL_SMALL}.get(which) or TINY_CONTROLNET[which]
    ref = random_diffusers_controlnet(cfg, seed=2)
    path = write_diffusers(tmp_path / ("cn" if folder else "cn.safetensors"), ref, folder)
    control = load_controlnet(path)
    assert control.family == which.split("_")[0] and control.layout == "diffusers"
    assert control.name == "cn"
    if which == "sdxl_small":  # no cross-attention at all: the context width is the family's, unused
        assert not any("attn2" in k for k in control.model.state_dict())
        assert control.model.config == replace(cfg, context_dim=SDXL.unet.context_dim)
    else:
        assert control.model.config == cfg
    inp = _inputs(cfg)
    _assert_parity(_sumie(control, inp), _diffusers(ref, inp))


@pytest.mark.parametrize("how", ["sharded", "fp16_variant"])
def test_diffusers_folder_sharded_or_variant(tmp_path: Path, how: str) -> None:
    """Folders whose weights are sharded (``diffusion_pytorch_model.safetensors.index.json``) or only the fp16
    variant (``diffusion_pytorch_model.fp16.safetensors``), as diffusers writes them."""
    cfg = TINY_CONTROLNET["sd1"]
    ref = random_diffusers_controlnet(cfg, seed=8)
    path = tmp_path / how
    if how == "sharded":
        ref.save_pretrained(path, max_shard_size="200KB")
        assert len(list(path.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    else:
        ref.to(torch.float16).save_pretrained(path, variant="fp16")
        ref.float()
        assert (path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    control = load_controlnet(path)
    inp = _inputs(cfg)
    if how == "sharded":
        _assert_parity(_sumie(control, inp), _diffusers(ref, inp))
    else:  # the fp16-rounded weights are what both read
        stored = load_state_dict(path / "diffusion_pytorch_model.fp16.safetensors")
        assert {v.dtype for v in stored.values()} == {torch.float16} and control.model.dtype == torch.float32
        _assert_parity(_sumie(control, inp), _diffusers(ref.to(torch.float16).float(), inp))


def test_diffusers_bgr_channel_order(tmp_path: Path) -> None:
    """config.json ``controlnet_conditioning_channel_order: bgr``: diffusers flips the control image's channels."""
    cfg = TINY_CONTROLNET["sd1"]
    ref = random_diffusers_controlnet(cfg, seed=4, controlnet_conditioning_channel_order="bgr")
    path = write_diffusers(tmp_path / "bgr", ref, folder=True)
    assert json.loads((path / "config.json").read_text())["controlnet_conditioning_channel_order"] == "bgr"
    inp = _inputs(cfg)
    _assert_parity(_sumie(load_controlnet(path), inp), _diffusers(ref, inp))


# ---------------------------------------------------------------- (b) real key names and shapes


def _meta_state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}


def _assert_builds(sd: dict[str, Tensor], cfg: UNetConfig, family: str) -> None:
    """The keys read from ``sd`` fill a ControlNetModel of ``cfg`` exactly: nothing missing or unexpected, same
    shapes."""
    ldm, found, fam, hint = controlnet_state_dict(sd, "test")
    assert (found, fam, hint) == (cfg, family, 3)
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in ControlNetModel(found, hint).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ldm.items()} == want


def test_sd15_original_layout_real_keys() -> None:
    """The 340 ``control_model.*`` keys of control_v11p_sd15_canny.pth at full SD1.5 shapes: diffusers' converter
    maps every one onto diffusers' SD1.5 ControlNetModel (nothing missing / unexpected, same shapes), and Sumie
    reads them back as SD1.5's config. Shapes spot-checked against a published key dump of that file."""
    with torch.device("meta"):
        ours = ControlNetModel(SD1.unet)
        ref = DiffusersControlNet(cross_attention_dim=768)  # lllyasviel/control_v11p_sd15_canny's config
    sd = {"control_model." + k: v for k, v in _meta_state(ours).items()}
    assert len(sd) == 340
    dump = {"input_hint_block.0.weight": (16, 3, 3, 3), "input_hint_block.14.weight": (320, 256, 3, 3),
            "input_hint_block.12.weight": (256, 96, 3, 3), "zero_convs.11.0.weight": (1280, 1280, 1, 1),
            "input_blocks.7.1.transformer_blocks.0.ff.net.2.weight": (1280, 5120),
            "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 768),
            "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1), "middle_block_out.0.weight":
            (1280, 1280, 1, 1), "time_embed.0.weight": (1280, 320), "input_blocks.9.0.op.weight": (1280, 1280, 3, 3)}
    for k, shape in dump.items():
        assert tuple(sd["control_model." + k].shape) == shape, k
    converted = convert_controlnet_checkpoint(sd, {"layers_per_block": 2})
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == want
    _assert_builds(sd, SD1.unet, "sd1")


SDXL_DIFFUSERS = dict(  # diffusers/controlnet-canny-sdxl-1.0's config.json
    block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                           "CrossAttnDownBlock2D"),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


@pytest.mark.parametrize("layers,cfg", [
    ([1, 2, 10], SDXL.unet),
    ([0, 0, 1], replace(SDXL.unet, transformer_depth=(0, 0, 1), transformer_depth_middle=1,
                        attention_levels=(False, True, True))),
    ([0, 0, 0], replace(SDXL.unet, transformer_depth=(0, 0, 0), transformer_depth_middle=0,
                        attention_levels=(False, True, True))),
], ids=["full", "mid", "small"])
def test_sdxl_diffusers_layout_full_size_keys(layers: list[int], cfg: UNetConfig) -> None:
    """diffusers' SDXL ControlNetModel at full size (meta, shapes only): full, "mid" and "small" transformer
    layers per block; every key maps and the config is read from the shapes."""
    with torch.device("meta"):
        ref = DiffusersControlNet(**SDXL_DIFFUSERS, transformer_layers_per_block=layers)  # type: ignore[arg-type]
    sd = _meta_state(ref)
    assert ("down_blocks.1.attentions.0.norm.weight" in sd) and (
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight" in sd) == (layers[1] > 0))
    _assert_builds(sd, cfg, "sdxl")


# ---------------------------------------------------------------- (c) Control-LoRA


def test_control_lora_is_base_plus_low_rank_deltas(tmp_path: Path) -> None:
    """A Control-LoRA's ControlNet: every tensor is the file's full tensor if it has one, else the base UNet's,
    plus ``up.flatten(1) @ down.flatten(1)`` reshaped when the file has that pair, unscaled (ComfyUI
    ``comfy/controlnet.py``: ``ControlLora.pre_run`` copies the diffusion model's weights, then sets the file's
    tensors; ``ControlLoraOps.Linear/Conv2d.forward`` add ``mm(up.flatten(1), down.flatten(1))``)."""
    base = random_unet(TINY["sdxl"].unet, seed=5)
    tensors = control_lora_tensors(base, rank=4, seed=6)
    path = save_tensors(tensors, tmp_path / "control-lora-canny-rank4.safetensors")
    control = load_controlnet(path, base=base)
    assert (control.family, control.layout, control.hint_channels) == ("sdxl", "control_lora", 3)
    base_sd = base.state_dict()
    got = control.model.state_dict()
    n_delta = n_full = 0
    for key, value in got.items():
        stem = key.removesuffix(".weight")
        want = (tensors[key] if key in tensors else base_sd[key]).double()
        if f"{stem}.up" in tensors:
            up, down = tensors[f"{stem}.up"].double(), tensors[f"{stem}.down"].double()
            want = want + (up.flatten(1) @ down.flatten(1)).reshape(want.shape)
            n_delta += 1
        n_full += key in tensors
        torch.testing.assert_close(value.double(), want, rtol=0, atol=1e-6, msg=key)
    assert n_delta > 50 and n_full > 50
    # the deltas and the file's norms matter: the same file's full tensors on the bare base differ
    key = "input_blocks.1.0.in_layers.2.weight"
    assert float((got[key] - base_sd[key]).abs().max()) > 1e-3
    key = "input_blocks.1.0.in_layers.0.weight"  # a norm the file stores in full
    assert torch.equal(got[key], tensors[key]) and not torch.equal(got[key], base_sd[key])


def test_control_lora_takes_base_dtype(tmp_path: Path) -> None:
    """Without device / dtype the ControlNet of a Control-LoRA follows the base UNet's dtype."""
    base = random_unet(TINY["sdxl"].unet, seed=7)
    path = write_control_lora(tmp_path / "cl.safetensors", base)
    control = load_controlnet(path, base=base.to(torch.bfloat16))
    assert control.model.dtype == torch.bfloat16


# ---------------------------------------------------------------- (d) errors


def test_control_lora_needs_base(tmp_path: Path) -> None:
    path = write_control_lora(tmp_path / "cl.safetensors", random_unet(TINY["sdxl"].unet))
    with pytest.raises(CheckpointError, match=r"cl\.safetensors: is a Control-LoRA .*pass base="):
        load_controlnet(path)


def test_control_lora_for_another_base(tmp_path: Path) -> None:
    path = write_control_lora(tmp_path / "cl.safetensors", random_unet(TINY["sdxl"].unet))
    with pytest.raises(CheckpointError, match=r"cl\.safetensors: Control-LoRA keys that fit no ControlNet"):
        load_controlnet(path, base=random_unet(TINY["sd1"].unet))


def test_check_family(tmp_path: Path) -> None:
    path = write_diffusers(tmp_path / "xl.safetensors", random_diffusers_controlnet(TINY_CONTROLNET["sdxl"]), False)
    control = load_controlnet(path)
    check_family(control, "sdxl")
    msg = "ControlNet xl is for sdxl; the model is sd1: pick a ControlNet made for sd1"
    with pytest.raises(ConfigError, match=msg):
        check_family(control, "sd1")


def test_unknown_layout(tmp_path: Path) -> None:
    path = save_tensors({"encoder.conv_in.weight": torch.zeros(2, 2)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: unknown layout .*expected a ControlNet"):
        load_controlnet(path)


def test_inconsistent_family(tmp_path: Path) -> None:
    """An ADM input (SDXL) with CLIP-L's 768-wide context is no known ControlNet."""
    cfg = replace(TINY_CONTROLNET["sdxl"], context_dim=768)
    path = write_original(tmp_path / "odd.safetensors", random_controlnet(cfg))
    with pytest.raises(CheckpointError, match="cross-attention width 768 is sd1's but the ADM input is sdxl's"):
        load_controlnet(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage_pickle", "missing_key", "wrong_shape", "empty_folder",
                                    "no_file"])
def test_damaged_files(tmp_path: Path, damage: str) -> None:
    model = random_controlnet(TINY_CONTROLNET["sd1"])
    if damage == "truncated":
        path = write_original(tmp_path / "cn.safetensors", model)
        path.write_bytes(path.read_bytes()[:-1000])
        match = "truncated"
    elif damage == "garbage_pickle":
        path = tmp_path / "cn.pth"
        path.write_bytes(b"\x80\x04not a pickle at all")
        match = "not a readable PyTorch checkpoint"
    elif damage in ("missing_key", "wrong_shape"):
        sd = original_state_dict(model)
        if damage == "missing_key":
            del sd["control_model.zero_convs.3.0.weight"]
        else:
            sd["control_model.middle_block_out.0.weight"] = torch.zeros(3, 3, 1, 1)
        path = save_tensors(sd, tmp_path / "cn.safetensors")
        match = "ControlNet weights do not fit"
    elif damage == "empty_folder":
        path = tmp_path / "cn"
        path.mkdir()
        match = r"no weights file found \(looked for diffusion_pytorch_model.safetensors"
    else:
        path = tmp_path / "absent.safetensors"
        match = "no such file"
    with pytest.raises(CheckpointError, match=match) as info:
        load_controlnet(path)
    assert str(path) in str(info.value)
