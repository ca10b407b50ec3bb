"""T2I-Adapter: features and UNet outputs against diffusers' ``T2IAdapter`` / ``UNet2DConditionModel``, real layouts.

Oracles: diffusers 0.42 ``T2IAdapter`` (``full_adapter``, ``full_adapter_xl``, ``light_adapter``) on random weights
and ``UNet2DConditionModel(..., down_intrablock_additional_residuals=...)`` on tiny configs of the SD1 and SDXL
structure. Tolerances: adapter features are the same convolutions in the same order, so they must be bit-identical;
UNet outputs are two different implementations, compared at 1e-4 relative to the output scale (fp32 rounding, as
tests/test_unet.py). Real layouts: the original key names are the ones diffusers' own conversion script
(``scripts/convert_original_t2i_adapter.py``) pops from ``t2iadapter_*_sd14v1.pth`` and asserts nothing is left, written
out here independently of Sumie's keymap; the SDXL files are diffusers' ``T2IAdapter`` with the configs of the
``TencentARC/t2i-adapter-*-sdxl-1.0`` repositories, built on the meta device.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import T2IAdapter
from diffusers.pipelines.t2i_adapter.pipeline_stable_diffusion_adapter import _preprocess_adapter_image
from PIL import Image
from test_unet import SDXL_TINY, _inputs, _ours_from_reference, _perturb, _reference
from torch import Tensor

from sumie.adapters.control.t2i_files import (
    ControlFile,
    adapter_config,
    diffusers_to_original,
    is_t2i_adapter,
    load_t2i_adapter,
)
from sumie.configs import SD1, SDXL, UNetConfig
from sumie.errors import CheckpointError
from sumie.models.t2i_adapter import T2IAdapterConfig, T2IAdapterModel, grey, unet_sites
from sumie.models.unet import UNetModel

PATH = Path("adapter.safetensors")
TINY_CH = [32, 64, 64, 64]
# (diffusers T2IAdapter kwargs, image-size factor): tiny widths, the real structure of each adapter type
KINDS: dict[str, tuple[dict[str, Any], int]] = {
    "sd1_rgb": (dict(in_channels=3, channels=TINY_CH, num_res_blocks=2, adapter_type="full_adapter"), 8),
    "sd1_grey": (dict(in_channels=1, channels=TINY_CH, num_res_blocks=2, adapter_type="full_adapter"), 8),
    "xl_rgb": (dict(in_channels=3, channels=TINY_CH, num_res_blocks=2, downscale_factor=16,
                    adapter_type="full_adapter_xl"), 16),
    "xl_grey": (dict(in_channels=1, channels=TINY_CH, num_res_blocks=2, downscale_factor=16,
                     adapter_type="full_adapter_xl"), 16),
    "light": (dict(in_channels=3, channels=TINY_CH[:3], num_res_blocks=4, adapter_type="light_adapter"), 8),
}


def _ref_adapter(kind: str, seed: int = 0) -> T2IAdapter:
    torch.manual_seed(seed)
    ref = T2IAdapter(**KINDS[kind][0]).eval()
    _perturb(ref, seed + 1)
    return ref


def _hint(factor: int, size: tuple[int, int] = (6, 10), batch: int = 2, seed: int = 2, grey_img: bool = False
          ) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(batch, 1 if grey_img else 3, size[0] * factor, size[1] * factor, generator=g)
    return h.expand(-1, 3, -1, -1).contiguous() if grey_img else h


def _ref_features(ref: T2IAdapter, hint: Tensor) -> list[Tensor]:
    with torch.no_grad():
        return ref(hint[:, :1] if ref.config.in_channels == 1 else hint)


def _original_keys_from_diffusers(sd: dict[str, Tensor], light: bool) -> dict[str, Tensor]:
    """The inverse of diffusers' convert_original_t2i_adapter.py pairs, spelled out for 4 levels (test-side copy)."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        parts = k.split(".")
        assert parts[0] == "adapter"
        if parts[1] == "conv_in":
            out[".".join(parts[1:])] = v
            continue
        level = int(parts[2])
        if parts[3] == "resnets":
            r = int(parts[4])
            head = f"body.{level}.body.{r}" if light else f"body.{2 * level + r}"
            out[".".join([head, *parts[5:]])] = v
        else:  # in_conv / out_conv
            head = f"body.{level}" if light else f"body.{2 * level}"
            out[".".join([head, *parts[3:]])] = v
    return out


# ----------------------------------------------------------------------------------------------------
# Features against diffusers' T2IAdapter


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_features_equal_diffusers(kind: str, layout: str) -> None:
    ref = _ref_adapter(kind)
    sd = ref.state_dict()
    if layout == "original":
        sd = _original_keys_from_diffusers(sd, light=kind == "light")
    control = load_t2i_adapter(PATH, sd)
    grey_in = KINDS[kind][0]["in_channels"] == 1
    hint = _hint(KINDS[kind][1], grey_img=grey_in)
    with torch.no_grad():
        ours = control.model.features(hint)
    expected = _ref_features(ref, hint)
    assert len(ours) == len(expected) == 4
    for a, b in zip(ours, expected, strict=True):
        assert a.shape == b.shape
        assert torch.equal(a, b)  # the same convolutions in the same order
    assert control.family == ("sdxl" if kind.startswith("xl") else "sd1")
    assert control.model.config.hint_channels == (1 if grey_in else 3)


@pytest.mark.parametrize("kind", ["sd1_rgb", "xl_rgb"])
def test_features_at_odd_sizes_equal_diffusers(kind: str) -> None:
    """Sizes whose halvings are odd: the 2x2 pooling rounds up (ceil_mode) as diffusers' and the UNet's do."""
    ref = _ref_adapter(kind, seed=3)
    control = load_t2i_adapter(PATH, ref.state_dict())
    hint = _hint(KINDS[kind][1], size=(5, 7), batch=1)
    with torch.no_grad():
        ours = control.model.features(hint)
    for a, b in zip(ours, _ref_features(ref, hint), strict=True):
        assert torch.equal(a, b)
    # 5x7 -> 3x4 -> 2x2 -> 1x1 (flooring would give 2x3 -> 1x1 -> 0x0)
    assert [tuple(f.shape[-2:]) for f in ours] == ([(5, 7), (3, 4), (2, 2), (1, 1)] if kind == "sd1_rgb"
                                                    else [(5, 7), (5, 7), (3, 4), (3, 4)])


def test_grey_input_modes() -> None:
    """A 1-channel adapter: A1111 feeds the red channel (sd-webui-controlnet ``PlugableAdapter.forward``:
    ``hint_in[:, 0:1]``), diffusers' pipeline a PIL "L" image (``_preprocess_adapter_image``), ComfyUI the mean."""
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (1, 3, 16, 24), generator=g, dtype=torch.uint8)
    hint = rgb.float() / 255
    assert torch.equal(grey(hint, "first"), hint[:, :1])
    assert torch.allclose(grey(hint, "mean"), hint.mean(1, keepdim=True), atol=0, rtol=0)
    pil = Image.fromarray(rgb[0].permute(1, 2, 0).numpy(), "RGB").convert("L")
    diffusers_in = _preprocess_adapter_image(pil, 16, 24)  # [1, 1, H, W] in [0, 1]
    diff = (grey(hint, "luma") - diffusers_in).abs().max().item()
    assert diff <= 0.5 / 255 + 1e-6, diff  # PIL rounds luma to whole levels
    assert (grey(hint, "first") - diffusers_in).abs().max() > 0.1  # the modes differ on colour images
    with pytest.raises(ValueError, match="grey mode"):
        grey(hint, "green")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["first", "luma", "mean"])
def test_grey_adapter_on_a_grey_image_equals_diffusers_in_every_mode(mode: str) -> None:
    ref = _ref_adapter("sd1_grey", seed=4)
    control = load_t2i_adapter(PATH, ref.state_dict())
    model = T2IAdapterModel(control.model.config, grey_mode=mode)  # type: ignore[arg-type]
    model.load_state_dict(control.model.state_dict())
    hint = _hint(8, grey_img=True)
    with torch.no_grad():
        ours = model.features(hint)
    for a, b in zip(ours, _ref_features(ref, hint), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # luma weights sum to 1 up to rounding


def test_colour_image_on_a_grey_adapter_takes_the_red_channel_by_default() -> None:
    ref = _ref_adapter("sd1_grey", seed=5)
    control = load_t2i_adapter(PATH, ref.state_dict())
    hint = _hint(8)
    with torch.no_grad():
        ours = control.model.features(hint)
    for a, b in zip(ours, _ref_features(ref, hint), strict=True):  # _ref_features feeds hint[:, :1]
        assert torch.equal(a, b)


def test_conv_downsampler_and_ksize3_variants() -> None:
    """``use_conv`` (down_opt.op) and ksize 3: with weights chosen to compute the same function as the plain
    adapter (a stride-2 conv whose kernel averages the 2x2 window; 3x3 kernels zero but the centre), the outputs
    equal diffusers'. Wrong placement of down_opt or of the padding would change them."""
    ref = _ref_adapter("sd1_rgb", seed=6)
    sd = _original_keys_from_diffusers(ref.state_dict(), light=False)
    for k in list(sd):
        if k.endswith("weight") and (".in_conv." in k or ".block2." in k):
            w = torch.zeros(*sd[k].shape[:2], 3, 3)
            w[:, :, 1, 1] = sd[k][:, :, 0, 0]
            sd[k] = w
    for block in (2, 4, 6):
        ch = sd[f"body.{block - 1}.block1.weight"].shape[0]
        w = torch.zeros(ch, ch, 3, 3)
        for c in range(ch):
            w[c, c, 1:, 1:] = 0.25  # rows/cols 2i, 2i+1 of a pad-1 stride-2 window
        sd[f"body.{block}.down_opt.op.weight"], sd[f"body.{block}.down_opt.op.bias"] = w, torch.zeros(ch)
    control = load_t2i_adapter(PATH, sd)
    assert control.model.config.ksize == 3 and control.model.config.conv_down
    hint = _hint(8, size=(8, 8))
    with torch.no_grad():
        ours = control.model.features(hint)
    for a, b in zip(ours, _ref_features(ref, hint), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Where the features go in the UNet


def test_unet_sites_of_the_real_unets() -> None:
    assert unet_sites(SD1.unet, 4) == (2, 5, 8, 11)  # after the last resnet/attention of each level
    assert unet_sites(SDXL.unet, 4) == (3, 5, 8, "middle")  # level 0 (no attention): after its downsampler
    with pytest.raises(ValueError, match="4 levels"):
        unet_sites(SD1.unet, 6)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_feature_shapes_fit_the_full_size_unet(family: str) -> None:
    """At 512 / 1024 px each feature has the shape of the UNet tensor it is added to (meta device)."""
    cfg = (SD1 if family == "sd1" else SDXL).unet
    ch = [320, 640, 1280, 1280]
    adapter_kw = (dict(adapter_type="full_adapter") if family == "sd1"
                  else dict(adapter_type="full_adapter_xl", downscale_factor=16))
    with torch.device("meta"):
        ref = T2IAdapter(in_channels=3, channels=ch, num_res_blocks=2, **adapter_kw)
        unet = UNetModel(cfg)
    control = load_t2i_adapter(PATH, ref.state_dict(), device="meta")
    latent = 64 if family == "sd1" else 128
    shapes: dict[int | str, tuple[int, ...]] = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: shapes.__setitem__(i, tuple(o.shape)))
             for i, b in enumerate(unet.input_blocks)]
    hooks.append(unet.middle_block.register_forward_hook(lambda m, a, o: shapes.__setitem__("middle", tuple(o.shape))))
    y = torch.zeros(1, cfg.adm_in_channels, device="meta") if cfg.adm_in_channels else None
    with torch.no_grad():
        unet(torch.zeros(1, 4, latent, latent, device="meta"), torch.zeros(1, device="meta"),
             torch.zeros(1, 77, cfg.context_dim, device="meta"), y)
        res = control.model(torch.zeros(1, 3, latent * 8, latent * 8, device="meta"))
    for h in hooks:
        h.remove()
    placed = {i: tuple(t.shape) for i, t in enumerate(res.encoder) if t is not None}
    if res.middle is not None:
        placed["middle"] = tuple(res.middle.shape)
    assert len(placed) == 4
    for site, shape in placed.items():
        assert shape == shapes[site], site


# Tiny SD1-structured UNet with four levels (the SD1 adapters have four features); one resnet per level, so the sites
# are not those of the full-size UNet and the rule is exercised, not a table.
SD1_4L = (
    dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
         norm_num_groups=8),
    UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, transformer_depth=(1, 1, 1, 0),
               transformer_depth_middle=1, num_heads=4, context_dim=32, norm_groups=8),
)
UNETS = {"sd1": (SD1_4L, "sd1_rgb", (1, 3, 5, 7)), "sdxl": (SDXL_TINY, "xl_rgb", (3, 5, 8, "middle"))}


def _close(ours: Tensor, ref: Tensor, rel: float = 1e-4) -> None:
    diff = (ours - ref).abs().max().item()
    assert diff <= rel * max(1.0, ref.abs().max().item()), f"max abs diff {diff}"


@pytest.mark.parametrize("size", [(16, 16), (10, 14)])
@pytest.mark.parametrize("name", list(UNETS))
def test_unet_with_adapter_equals_diffusers(name: str, size: tuple[int, int]) -> None:
    """UNetModel(control=adapter(hint)) == diffusers' UNet with down_intrablock_additional_residuals=adapter(hint)."""
    (dcfg, cfg), kind, sites = UNETS[name]
    unet_ref = _reference(dcfg, seed=7)
    unet = _ours_from_reference(unet_ref, cfg)
    adapter_ref = _ref_adapter(kind, seed=8)
    control = load_t2i_adapter(PATH, adapter_ref.state_dict())
    assert unet_sites(cfg, 4) == sites
    model = T2IAdapterModel(replace(control.model.config, sites=sites))
    model.load_state_dict(control.model.state_dict())
    inp = _inputs(dcfg, cfg, size=size)
    hint = _hint(8, size=size, seed=9)  # the image is 8x the latent (the SDXL adapter unshuffles it by 16)
    with torch.no_grad():
        feats = adapter_ref(hint)
        r = unet_ref(inp["x"], inp["t"], inp["context"], added_cond_kwargs=inp["added"],
                     down_intrablock_additional_residuals=[f.clone() for f in feats]).sample
        ours = unet(inp["x"], inp["t"], inp["context"], inp["y"], control=model(hint))
        plain = unet(inp["x"], inp["t"], inp["context"], inp["y"])
    _close(ours, r)
    assert (ours - plain).abs().max() > 1e-2  # the adapter measurably changes the output


# ----------------------------------------------------------------------------------------------------
# Real layouts


def _sd14v1_keys(cin: int) -> dict[str, tuple[int, ...]]:
    """t2iadapter_{canny,sketch,depth}_sd14v1.pth: the keys diffusers' converter pops, with their shapes."""
    ch = [320, 640, 1280, 1280]
    out: dict[str, tuple[int, ...]] = {"conv_in.weight": (320, cin, 3, 3), "conv_in.bias": (320,)}
    for k in range(8):
        c = ch[k // 2]
        out |= {f"body.{k}.block1.weight": (c, c, 3, 3), f"body.{k}.block1.bias": (c,),
                f"body.{k}.block2.weight": (c, c, 1, 1), f"body.{k}.block2.bias": (c,)}
    out |= {"body.2.in_conv.weight": (640, 320, 1, 1), "body.2.in_conv.bias": (640,),
            "body.4.in_conv.weight": (1280, 640, 1, 1), "body.4.in_conv.bias": (1280,)}
    return out


def _color_sd14v1_keys() -> dict[str, tuple[int, ...]]:
    """t2iadapter_color_sd14v1.pth (Adapter_light, nums_rb 4, cin 192)."""
    ch, out, cur = [320, 640, 1280, 1280], {}, 192
    for i, c in enumerate(ch):
        m = c // 4
        out |= {f"body.{i}.in_conv.weight": (m, cur, 1, 1), f"body.{i}.in_conv.bias": (m,),
                f"body.{i}.out_conv.weight": (c, m, 1, 1), f"body.{i}.out_conv.bias": (c,)}
        for j in range(4):
            out |= {f"body.{i}.body.{j}.block{b}.{p}": (m, m, 3, 3) if p == "weight" else (m,)
                    for b in (1, 2) for p in ("weight", "bias")}
        cur = c
    return out


def _meta(shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    return {k: torch.empty(s, device="meta", dtype=torch.float16) for k, s in shapes.items()}


@pytest.mark.parametrize(("name", "shapes", "hint_ch"), [
    ("t2iadapter_canny_sd14v1", _sd14v1_keys(64), 1), ("t2iadapter_sketch_sd14v1", _sd14v1_keys(64), 1),
    ("t2iadapter_depth_sd14v1", _sd14v1_keys(192), 3), ("t2iadapter_color_sd14v1", _color_sd14v1_keys(), 3)])
def test_original_sd14v1_layouts_load_completely(name: str, shapes: dict[str, tuple[int, ...]], hint_ch: int) -> None:
    assert len(shapes) == (80 if "color" in name else 38)
    sd = _meta(shapes)
    assert is_t2i_adapter(sd)
    control = load_t2i_adapter(Path(f"{name}.pth"), sd, dtype=torch.float32)
    assert isinstance(control, ControlFile)
    assert (control.kind, control.family, control.name) == ("t2i_adapter", "sd1", name)
    got = {k: tuple(v.shape) for k, v in control.model.state_dict().items()}
    assert got == shapes  # nothing missing, nothing unexpected, every shape
    assert control.model.config.hint_channels == hint_ch
    assert control.model.config.sites == (2, 5, 8, 11)
    assert control.model.dtype == torch.float32


@pytest.mark.parametrize(("repo", "in_ch", "family", "kw"), [
    ("t2i-adapter-canny-sdxl-1.0", 1, "sdxl", dict(downscale_factor=16, adapter_type="full_adapter_xl")),
    ("t2i-adapter-lineart-sdxl-1.0", 1, "sdxl", dict(downscale_factor=16, adapter_type="full_adapter_xl")),
    ("t2i-adapter-depth-midas-sdxl-1.0", 3, "sdxl", dict(downscale_factor=16, adapter_type="full_adapter_xl")),
    ("t2iadapter_canny_sd14v1", 1, "sd1", dict(adapter_type="full_adapter")),  # diffusers conversions of the SD1 ones
    ("t2iadapter_color_sd14v1", 3, "sd1", dict(channels=[320, 640, 1280], num_res_blocks=4,
                                               adapter_type="light_adapter")),
])
def test_diffusers_layouts_load_completely(repo: str, in_ch: int, family: str, kw: dict[str, Any]) -> None:
    kw = {"channels": [320, 640, 1280, 1280], "num_res_blocks": 2, **kw}
    with torch.device("meta"):
        ref = T2IAdapter(in_channels=in_ch, **kw)
    sd = ref.state_dict()
    assert is_t2i_adapter(sd)
    control = load_t2i_adapter(Path(f"{repo}.safetensors"), sd, device="meta")
    assert control.family == family and control.model.config.hint_channels == in_ch
    ours = control.model.state_dict()
    assert len(ours) == len(sd)
    mapped = diffusers_to_original(sd)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in mapped.items()}


# ----------------------------------------------------------------------------------------------------
# Detection and errors


def test_is_t2i_adapter_rejects_other_files() -> None:
    assert not is_t2i_adapter(["control_model.input_blocks.0.0.weight", "control_model.zero_convs.0.0.weight"])
    assert not is_t2i_adapter(["input_blocks.0.0.weight", "conv_in.weight"])
    assert not is_t2i_adapter(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"])
    assert not is_t2i_adapter(["controlnet_cond_embedding.conv_in.weight", "conv_in.weight"])
    assert is_t2i_adapter(["style_embedding", "transformer_layes.0.attn.in_proj_weight", "proj"])


def test_style_adapter_is_refused_clearly() -> None:
    sd = {"style_embedding": torch.zeros(1, 8, 1024), "transformer_layes.0.attn.in_proj_weight": torch.zeros(3, 3),
          "proj": torch.zeros(1024, 768)}
    with pytest.raises(CheckpointError, match=r"t2iadapter_style_sd14v1\.pth: .*style adapter.*IP-Adapter"):
        load_t2i_adapter(Path("t2iadapter_style_sd14v1.pth"), sd)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda sd: sd.pop("body.5.block2.bias"), r"layout not understood \(missing \['body\.5\.block2\.bias'\]"),
    (lambda sd: sd.__setitem__("body.3.skep.weight", torch.zeros(1)), r"unexpected \['body\.3\.skep\.weight'\]"),
    (lambda sd: sd.__setitem__("body.1.block1.weight", torch.zeros(32, 32, 1, 1)),
     r"body\.1\.block1\.weight has shape"),
    (lambda sd: sd.__setitem__("conv_in.weight", torch.zeros(32, 100, 3, 3)), r"conv_in takes 100 channels"),
    (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("body.7.")], r"7 body blocks"),
])
def test_broken_original_files_raise_checkpoint_errors(edit: Any, match: str) -> None:
    sd = _original_keys_from_diffusers(_ref_adapter("sd1_rgb").state_dict(), light=False)
    edit(sd)
    with pytest.raises(CheckpointError, match=r"T2I-Adapter broken\.pth: .*" + match):
        load_t2i_adapter(Path("broken.pth"), sd)


def test_unknown_keys_raise_checkpoint_errors() -> None:
    sd = dict(_ref_adapter("xl_rgb").state_dict())
    sd["adapter.body.0.something.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"x\.safetensors: unexpected tensor 'adapter\.body\.0\.something"):
        load_t2i_adapter(Path("x.safetensors"), sd)
    with pytest.raises(CheckpointError, match="not a T2I-Adapter layout"):
        load_t2i_adapter(Path("x.safetensors"), {"conv_in.weight": torch.zeros(1)})


def test_bad_hints_raise_clear_errors() -> None:
    control = load_t2i_adapter(PATH, _ref_adapter("xl_rgb").state_dict())
    with pytest.raises(ValueError, match=r"120x96 must be a multiple of 16 per side"):
        control.model(torch.zeros(1, 3, 96, 120))
    with pytest.raises(ValueError, match=r"must be \[B, 3, H, W\] RGB"):
        control.model(torch.zeros(1, 1, 96, 96))


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="one entry per level"):
        T2IAdapterConfig(channels=(32, 64))
    with pytest.raises(ValueError, match="multiple of unshuffle"):
        T2IAdapterConfig(cin=100)
    sd = _original_keys_from_diffusers(_ref_adapter("light").state_dict(), light=True)
    cfg, family = adapter_config(sd)
    assert (cfg.kind, cfg.nums_rb, cfg.channels, family) == ("light", 4, tuple(TINY_CH), "sd1")
    assert cfg.downs == (False, True, True, True) and cfg.sites == (2, 5, 8, 11)


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_load_controlnet_dispatches_t2i_files(tmp_path: Path, layout: str) -> None:
    """A T2I-Adapter in the ControlNet folder loads through the one entry point, ``load_controlnet``."""
    from safetensors.torch import save_file

    from sumie.adapters.control.files import load_controlnet

    ref = _ref_adapter("sd1_rgb")
    sd = ref.state_dict()
    if layout == "original":
        sd = _original_keys_from_diffusers(sd, light=False)
    path = tmp_path / "t2i.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    control = load_controlnet(path)
    assert (control.kind, control.layout, control.name) == ("t2i_adapter", "t2i_adapter", "t2i")
    hint = _hint(8)
    with torch.no_grad():
        ours_all = control.model.features(hint)
    for ours, want in zip(ours_all, _ref_features(ref, hint), strict=True):
        assert torch.equal(ours, want)
