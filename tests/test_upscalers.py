"""Upscaler models: parity with the authors' definitions on random weights, the real files' key layouts, detection,
tiling without seams, scale handling, the model manager, hires fix on sumie-tiny and ``sumie upscale``.

The references (tests/upscaler_reference.py) are functional forwards over the raw state dicts in the published key
layouts, written from xinntao/ESRGAN, BasicSR / Real-ESRGAN and JingyunLiang/SwinIR; spandrel and basicsr cannot be
imported here (spandrel needs torchvision).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import upscaler_reference as ref
from PIL import Image
from safetensors.torch import save_file

import sumie
from sumie.checkpoints.manager import ModelFolders, ModelManager, held_bytes
from sumie.cli.main import main
from sumie.errors import CheckpointError, ConfigError, SumieError
from sumie.models.upscalers import RRDBNet, SRVGGNetCompact, SwinIR, build_upscaler, detect_upscaler, load_upscaler
from sumie.pipelines.params import GenerationParams, HiresParams
from sumie.pipelines.upscale import resolve_upscaler, tile_spans, upscale

CONV_TOL = 1e-5  # ESRGAN / SRVGG vs the reference: the same convolutions, other elementwise code
SWIN_TOL = 2e-5  # SwinIR: SDPA with an additive mask vs explicit softmax(q k^T * scale + bias + mask) v


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference forwards take the unwrapped state dict (without ``params.`` / ``params_ema.``)."""
    return {k.split(".", 1)[1] if k.startswith(("params.", "params_ema.")) else k: v for k, v in sd.items()}


def _image(w: int, h: int, seed: int) -> Image.Image:
    """A smooth random picture with some grain (tile seams show on it)."""
    rng = np.random.default_rng(seed)
    base = Image.fromarray((rng.random((12, 10, 3)) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(base).astype(np.float64) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------------ parity

SWIN_SMALL = {"embed_dim": 24, "depths": [2, 2], "heads": [2, 3], "window_size": 4, "mlp_ratio": 2.0,
              "num_feat": 16}

PARITY: dict[str, tuple[dict[str, tuple[int, ...]], Callable[..., torch.Tensor], int, float]] = {
    # name: (key shapes, reference forward, expected scale, tolerance)
    "esrgan old x4": (ref.esrgan_old_keys(3, 3, 16, 2, 8, 2), ref.esrgan_old, 4, CONV_TOL),
    "esrgan old x2": (ref.esrgan_old_keys(3, 3, 16, 2, 8, 1), ref.esrgan_old, 2, CONV_TOL),
    "esrgan old x1": (ref.esrgan_old_keys(3, 3, 16, 1, 8, 0), ref.esrgan_old, 1, CONV_TOL),
    "real-esrgan x4": (ref.esrgan_basicsr_keys(3, 16, 2, 8, "params_ema."),
                       lambda sd, x: ref.esrgan_basicsr(_strip(sd), x, 4), 4, CONV_TOL),
    "real-esrgan x2 (unshuffle 2)": (ref.esrgan_basicsr_keys(12, 16, 2, 8, "params_ema."),
                                     lambda sd, x: ref.esrgan_basicsr(_strip(sd), x, 2), 2, CONV_TOL),
    "real-esrgan x1 (unshuffle 4)": (ref.esrgan_basicsr_keys(48, 16, 1, 8, "params_ema."),
                                     lambda sd, x: ref.esrgan_basicsr(_strip(sd), x, 1), 1, CONV_TOL),
    "srvgg x4": (ref.srvgg_keys(16, 4, 4), lambda sd, x: ref.srvgg(_strip(sd), x, 4), 4, CONV_TOL),
    "srvgg x2": (ref.srvgg_keys(8, 2, 2), lambda sd, x: ref.srvgg(_strip(sd), x, 2), 2, CONV_TOL),
}
for _up, _head, _resi in [(4, "nearest+conv", "1conv"), (2, "nearest+conv", "3conv"), (4, "pixelshuffle", "1conv"),
                          (2, "pixelshuffle", "3conv"), (3, "pixelshuffle", "1conv"),
                          (3, "pixelshuffledirect", "1conv"), (1, "", "1conv")]:
    _kw = {k: v for k, v in SWIN_SMALL.items() if k in ("depths", "heads", "window_size")}

    def _swin(sd: dict[str, torch.Tensor], x: torch.Tensor, up: int = _up, head: str = _head,
              kw: dict = _kw) -> torch.Tensor:
        return ref.swinir(_strip(sd), x, upscale=up, upsampler=head, **kw)

    PARITY[f"swinir {_head or 'restoration'} x{_up} {_resi}"] = (
        ref.swinir_keys(upscale=_up, upsampler=_head, resi_connection=_resi, **SWIN_SMALL), _swin, _up, SWIN_TOL)


@pytest.mark.parametrize("name", list(PARITY))
def test_parity_with_the_authors_definition(name: str) -> None:
    shapes, forward, scale, tol = PARITY[name]
    sd = ref.random_weights(shapes, seed=len(name))
    up = build_upscaler(sd)
    assert up.scale == scale
    g = torch.Generator().manual_seed(7)
    # 20x16: whole windows / unshuffle cells; 19x13: SwinIR reflect-pads to whole windows and crops
    sizes = [(20, 16)] + ([(19, 13)] if "unshuffle" not in name else [(20, 12)])
    for h, w in sizes:
        x = torch.rand(1, 3, h, w, generator=g)
        with torch.no_grad():
            ours, theirs = up.module(x), forward(sd, x)
        assert ours.shape == theirs.shape == (1, 3, h * scale, w * scale)
        err = (ours - theirs).abs().max().item()
        print(f"{name} {h}x{w}: max |sumie - reference| = {err:.2e} (outputs up to {theirs.abs().max():.2f})")
        assert err <= tol * max(1.0, theirs.abs().max().item())


def test_parity_fails_on_a_changed_weight() -> None:
    """The comparison sees one changed weight (so the parity tests can fail)."""
    shapes, forward, _, tol = PARITY["swinir nearest+conv x4 1conv"]
    sd = ref.random_weights(shapes, seed=1)
    up = build_upscaler(sd)
    sd = dict(sd)
    key = "params.layers.1.residual_group.blocks.1.attn.relative_position_bias_table"
    sd[key] = sd[key].clone()
    sd[key][3, 1] += 0.5
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (up.module(x) - forward(sd, x)).abs().max().item() > 100 * tol


# ------------------------------------------------------------------------------------------------ real layouts

SWIN_M = {"embed_dim": 180, "depths": [6] * 6, "heads": [6] * 6, "window_size": 8, "mlp_ratio": 2.0}
REAL_FILES: dict[str, tuple[dict[str, tuple[int, ...]], str, int, dict]] = {
    # file: (keys and shapes as published, architecture, scale, sizes the detector must find)
    "RealESRGAN_x4plus.pth": (ref.esrgan_basicsr_keys(3, 64, 23, 32, "params_ema."), "ESRGAN", 4,
                              {"feat": 64, "blocks": 23, "grow": 32, "unshuffle": 1}),
    "RealESRGAN_x2plus.pth": (ref.esrgan_basicsr_keys(12, 64, 23, 32, "params_ema."), "ESRGAN", 2,
                              {"in_ch": 3, "blocks": 23, "unshuffle": 2}),
    "RealESRGAN_x4plus_anime_6B.pth": (ref.esrgan_basicsr_keys(3, 64, 6, 32, "params_ema."), "ESRGAN", 4,
                                       {"blocks": 6}),
    "4x-UltraSharp.pth": (ref.esrgan_old_keys(3, 3, 64, 23, 32, 2), "ESRGAN", 4, {"feat": 64, "blocks": 23}),
    "4x_foolhardy_Remacri.pth": (ref.esrgan_old_keys(3, 3, 64, 23, 32, 2), "ESRGAN", 4, {"blocks": 23}),
    "ESRGAN_4x.pth": (ref.esrgan_old_keys(3, 3, 64, 23, 32, 2), "ESRGAN", 4, {"blocks": 23}),
    "1x community ESRGAN (old layout)": (ref.esrgan_old_keys(3, 3, 64, 16, 32, 0), "ESRGAN", 1, {"blocks": 16}),
    "2x community ESRGAN (old layout)": (ref.esrgan_old_keys(3, 3, 64, 23, 32, 1), "ESRGAN", 2, {"num_up": 1}),
    "realesr-general-x4v3.pth": (ref.srvgg_keys(64, 32, 4), "SRVGGNetCompact", 4, {"feat": 64, "num_conv": 32}),
    "realesr-animevideov3.pth": (ref.srvgg_keys(64, 16, 4), "SRVGGNetCompact", 4, {"num_conv": 16}),
    "001_classicalSR_DF2K_s64w8_SwinIR-M_x4.pth": (
        ref.swinir_keys(upscale=4, upsampler="pixelshuffle", **SWIN_M), "SwinIR", 4,
        {"embed_dim": 180, "depths": (6,) * 6, "window_size": 8, "upsampler": "pixelshuffle"}),
    "001_classicalSR_DF2K_s48w8_SwinIR-M_x2.pth": (
        ref.swinir_keys(upscale=2, upsampler="pixelshuffle", img_size=48, **SWIN_M), "SwinIR", 2,
        {"upsampler": "pixelshuffle"}),
    "002_lightweightSR_DIV2K_s64w8_SwinIR-S_x4.pth": (
        ref.swinir_keys(embed_dim=60, depths=[6] * 4, heads=[6] * 4, window_size=8, mlp_ratio=2.0, upscale=4,
                        upsampler="pixelshuffledirect"), "SwinIR", 4,
        {"embed_dim": 60, "depths": (6,) * 4, "upsampler": "pixelshuffledirect"}),
    "003_realSR_BSRGAN_DFO_s64w8_SwinIR-M_x4_GAN.pth": (
        ref.swinir_keys(upscale=4, upsampler="nearest+conv", prefix="params_ema.", **SWIN_M), "SwinIR", 4,
        {"upsampler": "nearest+conv", "resi_connection": "1conv"}),
    "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth": (
        ref.swinir_keys(embed_dim=240, depths=[6] * 9, heads=[8] * 9, window_size=8, mlp_ratio=2.0, upscale=4,
                        upsampler="nearest+conv", resi_connection="3conv", prefix="params_ema."), "SwinIR", 4,
        {"embed_dim": 240, "num_heads": (8,) * 9, "resi_connection": "3conv"}),
    "005_colorDN_DFWB_s128w8_SwinIR-M_noise15.pth": (
        ref.swinir_keys(upscale=1, upsampler="", img_size=128, **SWIN_M), "SwinIR", 1, {"upsampler": ""}),
}


@pytest.mark.parametrize("name", list(REAL_FILES))
def test_real_layouts_load_with_nothing_missing(name: str) -> None:
    shapes, arch, scale, sizes = REAL_FILES[name]
    sd = ref.random_weights(shapes, seed=0, device="meta")
    up = build_upscaler(sd, name)  # load_state_dict reports missing / unexpected keys as a CheckpointError
    assert (up.spec.arch, up.scale) == (arch, scale)
    assert {k: up.spec.kwargs[k] for k in sizes} == sizes
    params = {k for k, _ in up.module.named_parameters()}
    assert len(params) == len([k for k in shapes if not k.endswith(("relative_position_index", "attn_mask"))])
    assert all(p.is_meta for p in up.module.parameters())  # every parameter came from the file
    print(f"{name}: {up.spec.describe()}, {len(params)} tensors")


def test_real_esrgan_pth_and_safetensors_files(tmp_path: Path) -> None:
    """A Real-ESRGAN .pth ({"params_ema": ..., "params": ...}) through the safe pickle reader; a safetensors file."""
    shapes = ref.esrgan_basicsr_keys(12, 8, 1, 4)
    ema, plain = ref.random_weights(shapes, 1), ref.random_weights(shapes, 2)
    torch.save({"params_ema": ema, "params": plain}, tmp_path / "x2.pth")
    up = load_upscaler(tmp_path / "x2.pth")
    assert up.scale == 2 and up.name == "x2"
    assert torch.equal(up.module.conv_first.weight, ema["conv_first.weight"])  # EMA weights preferred
    save_file(plain, str(tmp_path / "x2.safetensors"))
    up = load_upscaler(tmp_path / "x2.safetensors", dtype=torch.float16)
    assert up.module.conv_first.weight.dtype == torch.float16
    assert torch.equal(up.module.conv_first.weight, plain["conv_first.weight"].half())


def test_detection_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="unknown upscaler layout.*supported: ESRGAN"):
        detect_upscaler({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)})
    old = ref.random_weights(ref.esrgan_old_keys(3, 3, 8, 1, 4, 2), 0)
    with pytest.raises(CheckpointError, match="keys do not fit: missing \\[conv_hr.bias"):
        build_upscaler({k: v for k, v in old.items() if k != "model.8.bias"}, "broken")
    bad = dict(old)
    bad["model.1.sub.0.RDB1.conv2.0.weight"] = torch.zeros(4, 99, 3, 3)
    with pytest.raises(CheckpointError, match="a tensor does not fit"):
        build_upscaler(bad)
    with pytest.raises(CheckpointError, match="unexpected layer indices"):
        build_upscaler({("model.9" + k[7:] if k.startswith("model.8.") else k): v for k, v in old.items()})
    with pytest.raises(CheckpointError, match="ESRGAN\\+"):
        detect_upscaler(old | {"model.1.sub.0.RDB1.conv1x1.weight": torch.zeros(8, 8, 1, 1)})
    vgg = ref.random_weights(ref.srvgg_keys(8, 2, 4, prefix=""), 0)
    with pytest.raises(CheckpointError, match="without PReLU"):
        detect_upscaler({k: v for k, v in vgg.items() if v.ndim != 1 or k.endswith("bias")})
    swin = ref.random_weights(ref.swinir_keys(upscale=2, upsampler="nearest+conv", **SWIN_SMALL), 0, "meta")
    with pytest.raises(CheckpointError, match="Swin2SR upscalers are not supported"):
        detect_upscaler(swin | {"params.layers.0.residual_group.blocks.0.attn.cpb_mlp.0.weight": torch.zeros(1)})
    (tmp_path / "empty.pth").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError):
        load_upscaler(tmp_path / "empty.pth")


# ------------------------------------------------------------------------------------------------ tiling


def test_tile_spans_cover_and_align() -> None:
    for n, tile, overlap, align in [(150, 64, 16, 1), (150, 64, 16, 8), (513, 512, 32, 2), (64, 64, 8, 1),
                                    (1000, 100, 30, 4)]:
        spans = tile_spans(n, tile, overlap, align)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(s % align == 0 for s, _ in spans)
        assert all(b - a <= tile + align - 1 for a, b in spans)
        assert all(a2 <= b1 - overlap for (_, b1), (a2, _) in zip(spans, spans[1:], strict=False))


def _seam_errors(up: object, img: Image.Image, tile: int, overlap: int) -> tuple[np.ndarray, float, float]:
    whole = np.asarray(upscale(up, img, tile=0)).astype(int)  # type: ignore[arg-type]
    tiled = np.asarray(upscale(up, img, tile=tile, overlap=overlap)).astype(int)  # type: ignore[arg-type]
    diff = np.abs(whole - tiled)
    return diff, float(diff.max()), float(diff.mean())


@pytest.mark.parametrize("arch", ["srvgg x4", "real-esrgan x2 (unshuffle)", "swinir x2"])
def test_tiled_equals_untiled_without_seams(arch: str) -> None:
    """Random-weight models: tiled (64 px tiles) vs one whole-image run, in uint8 levels; overlap 0 shows the seam
    the blending removes."""
    if arch == "srvgg x4":
        shapes, img, overlap, bound = ref.srvgg_keys(16, 16, 4), _image(150, 130, 0), 16, 1
    elif arch.startswith("real-esrgan"):
        shapes, img, overlap, bound = ref.esrgan_basicsr_keys(12, 16, 2, 8, "params_ema."), _image(151, 131, 1), 24, 1
    else:
        shapes = ref.swinir_keys(upscale=2, upsampler="nearest+conv", **(SWIN_SMALL | {"window_size": 8}))
        img, overlap, bound = _image(120, 100, 2), 24, 8  # shifted windows spread a cut far on random weights
    up = build_upscaler(ref.random_weights(shapes, 3))
    diff, worst, mean = _seam_errors(up, img, 64, overlap)
    cols = sorted({a * up.scale for a, _ in tile_spans(img.width, 64, overlap, 8 if "swin" in arch else 2)[1:]})
    band = np.concatenate([diff[:, c : c + overlap * up.scale] for c in cols], axis=1)
    _, worst0, mean0 = _seam_errors(up, img, 64, 0)
    print(f"{arch}: tiled vs whole, overlap {overlap}: max {worst:.0f}, mean {mean:.4f} levels (seam band: max "
          f"{band.max():.0f}, mean {band.mean():.4f}); overlap 0: max {worst0:.0f}, mean {mean0:.4f}")
    assert worst <= bound and mean <= 0.2
    assert worst0 >= 20 and mean0 > 5 * mean


def test_tiling_runs_fewer_pixels_at_once() -> None:
    """Each tile call sees at most tile (+ grid alignment) pixels per side."""
    seen: list[tuple[int, int]] = []

    class Spy(SRVGGNetCompact):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((x.shape[2], x.shape[3]))
            return super().forward(x)

    model = Spy(feat=4, num_conv=1, scale=2)
    out = upscale(model, _image(100, 70, 0), tile=32, overlap=8)
    assert out.size == (200, 140) and len(seen) == 4 * 3 and max(max(s) for s in seen) <= 32


# ------------------------------------------------------------------------------------------------ scale, dtype


@pytest.fixture(scope="module")
def x2_model() -> object:
    return build_upscaler(ref.random_weights(ref.srvgg_keys(8, 2, 2), 5))


def test_scale_other_than_the_models(x2_model: object) -> None:
    img = _image(40, 30, 4)
    once = upscale(x2_model, img, tile=0)  # type: ignore[arg-type]
    assert once.size == (80, 60)
    # below the model's scale: the model, then Lanczos down (same computation: exact)
    assert np.array_equal(np.asarray(upscale(x2_model, img, 1.5, tile=0)),  # type: ignore[arg-type]
                          np.asarray(once.resize((60, 45), Image.Resampling.LANCZOS)))
    # above: the model again on its own output (A1111), then Lanczos to the target
    twice = upscale(x2_model, once, tile=0)  # type: ignore[arg-type]
    assert np.array_equal(np.asarray(upscale(x2_model, img, 4, tile=0)), np.asarray(twice))  # type: ignore[arg-type]
    assert np.array_equal(np.asarray(upscale(x2_model, img, 3, tile=0)),  # type: ignore[arg-type]
                          np.asarray(twice.resize((120, 90), Image.Resampling.LANCZOS)))
    assert upscale(x2_model, img, size=(97, 51), tile=0).size == (97, 51)  # type: ignore[arg-type]
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.new("L", img.size, 128))
    out = upscale(x2_model, rgba, tile=0)  # type: ignore[arg-type]
    assert out.mode == "RGBA" and out.getchannel("A").getextrema() == (128, 128)


def test_dtype_and_device_leave_the_model_alone(x2_model: object) -> None:
    img = _image(24, 20, 6)
    ref32 = np.asarray(upscale(x2_model, img, tile=0)).astype(int)  # type: ignore[arg-type]
    half = np.asarray(upscale(x2_model, img, tile=0, dtype=torch.bfloat16)).astype(int)  # type: ignore[arg-type]
    assert next(x2_model.module.parameters()).dtype == torch.float32  # type: ignore[attr-defined]
    assert 0 < np.abs(ref32 - half).max() <= 12  # bf16 keeps 8 bits of mantissa: a few levels


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tile": -1}, "tile size must be >= 0"), ({"tile": 64, "overlap": 32}, "under half the tile size"),
    ({"scale": 0.0}, "positive number"), ({"scale": float("nan")}, "positive number"),
])
def test_runner_errors(x2_model: object, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        upscale(x2_model, _image(8, 8, 0), **kwargs)  # type: ignore[arg-type]


def test_module_constructors_match_detection() -> None:
    """Modules built directly give the state dicts the detector maps back to the same sizes."""
    for module in (RRDBNet(feat=8, blocks=2, grow=4, num_up=1), RRDBNet(feat=8, blocks=1, grow=4, unshuffle=4),
                   SRVGGNetCompact(feat=8, num_conv=3, scale=3),
                   SwinIR(embed_dim=12, depths=(2,), num_heads=(3,), window_size=4, scale=2, num_feat=8)):
        up = build_upscaler(module.state_dict())
        assert up.scale == module.scale and type(up.module) is type(module)


# ------------------------------------------------------------------------------------------------ manager


def _tiny_file(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params": ref.random_weights(ref.srvgg_keys(8, 2, 2, prefix=""), seed)}, path)
    return path


def test_manager_finds_and_loads_upscalers(tmp_path: Path) -> None:
    a1111 = tmp_path / "webui"
    (a1111 / "models" / "Stable-diffusion").mkdir(parents=True)
    _tiny_file(a1111 / "models" / "ESRGAN" / "4x-UltraSharp.pth")
    _tiny_file(a1111 / "models" / "RealESRGAN" / "RealESRGAN_x4plus.pth")
    _tiny_file(a1111 / "models" / "SwinIR" / "SwinIR_4x.pth")
    folders = ModelFolders(a1111)
    assert [f.name for f in folders.list("upscaler")] == ["4x-UltraSharp.pth", "RealESRGAN_x4plus.pth",
                                                          "SwinIR_4x.pth"]
    manager = ModelManager(folders)
    up = manager.get("upscaler", "4x-UltraSharp")
    assert up.scale == 2 and up.name == "4x-UltraSharp.pth" and manager.get("upscaler", "4x-UltraSharp") is up
    assert manager.loaded()[0].size_bytes == held_bytes(up) > 0
    # A1111's built-in name of a Real-ESRGAN model finds the file it downloads
    assert resolve_upscaler(manager, "R-ESRGAN 4x+") == a1111 / "models" / "RealESRGAN" / "RealESRGAN_x4plus.pth"
    with pytest.raises(ConfigError, match="no upscaler named 'Remacri'"):
        resolve_upscaler(manager, "Remacri")
    with pytest.raises(ConfigError, match="no such file; give the path to an upscaler model"):
        resolve_upscaler(ModelManager(), "R-ESRGAN 4x+")
    comfy = tmp_path / "ComfyUI"
    (comfy / "models" / "checkpoints").mkdir(parents=True)
    path = _tiny_file(comfy / "models" / "upscale_models" / "4x_foolhardy_Remacri.pth")
    assert resolve_upscaler(ModelManager(ModelFolders(comfy)), "4x_foolhardy_Remacri") == path


# ------------------------------------------------------------------------------------------------ hires fix


@pytest.fixture(scope="module")
def tiny() -> sumie.Engine:
    return sumie.load()  # the embedded sumie-tiny


def test_hires_fix_with_an_upscaler_model(tiny: sumie.Engine, tmp_path: Path) -> None:
    path = _tiny_file(tmp_path / "tiny_x2.pth", seed=3)
    calls: list[tuple[int, ...]] = []
    up = tiny.manager.get("upscaler", path)
    inner = up.module

    class Recorder(torch.nn.Module):
        scale, in_ch = inner.scale, inner.in_ch

        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(x.shape))
            return self.inner(x)

    up.module = Recorder()
    try:
        p = GenerationParams(prompt="a lighthouse", seed=3, steps=2, width=64, height=64,
                             hires=HiresParams(scale=1.5, upscaler=str(path), steps=1, denoising_strength=0.5))
        r = tiny.generate(p)
    finally:
        up.module = inner
    assert r.images[0].size == (96, 96)
    assert calls == [(1, 3, 64, 64)]  # the decoded first pass, once; x2 then Lanczos down to 96
    assert "Hires upscaler: tiny_x2," in r.infotexts[0]  # A1111 names the model by its file stem
    lanczos = tiny.generate(GenerationParams(prompt="a lighthouse", seed=3, steps=2, width=64, height=64,
                                             hires=HiresParams(scale=1.5, upscaler="lanczos", steps=1,
                                                               denoising_strength=0.5)))
    assert not np.array_equal(np.asarray(r.images[0]), np.asarray(lanczos.images[0]))
    with pytest.raises(SumieError, match="no such file"):
        tiny.generate(GenerationParams(prompt="x", steps=1, width=64, height=64,
                                       hires=HiresParams(upscaler=str(tmp_path / "missing.pth"), steps=1)))


def test_infotext_upscaler_names() -> None:
    from sumie.pipelines.infotext import params_from_infotext

    p = params_from_infotext("x\nSteps: 20, Sampler: Euler, Seed: 1, Denoising strength: 0.5, "
                             "Hires upscaler: R-ESRGAN 4x+, RNG: CPU")
    assert p.hires is not None and p.hires.upscaler == "R-ESRGAN 4x+"
    with pytest.raises(ConfigError, match="Latent \\(nearest-exact\\)"):
        params_from_infotext("x\nSteps: 20, Sampler: Euler, Seed: 1, Denoising strength: 0.5, "
                             "Hires upscaler: Latent (nearest-exact), RNG: CPU")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_upscale_writes_the_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _tiny_file(tmp_path / "models" / "upscale_models" / "tiny_x2.pth", seed=4)
    (tmp_path / "models" / "checkpoints").mkdir()
    src = tmp_path / "in.png"
    _image(40, 30, 9).save(src)
    out = tmp_path / "out" / "big.png"
    assert main(["upscale", str(src), "--upscaler", str(model), "--tile", "16", "--overlap", "4",
                 "-o", str(out), "--device", "cpu"]) == 0
    assert "SRVGGNetCompact x2" in capsys.readouterr().out
    with Image.open(out) as im:
        written = np.asarray(im.convert("RGB"))
    expected = upscale(load_upscaler(model), Image.open(src), tile=16, overlap=4)
    assert written.shape == (60, 80, 3) and np.array_equal(written, np.asarray(expected))
    # by name in a models folder, another scale, no tiling
    out2 = tmp_path / "named.png"
    assert main(["upscale", str(src), "--upscaler", "tiny_x2", "--models-dir", str(tmp_path), "--scale", "3",
                 "--tile", "0", "-o", str(out2)]) == 0
    with Image.open(out2) as im:
        assert im.size == (120, 90)


def test_cli_generate_with_hires_upscaler(tmp_path: Path) -> None:
    model = _tiny_file(tmp_path / "tiny_x2.pth", seed=5)
    out = tmp_path / "hires.png"
    assert main(["generate", "a cat", "--seed", "2", "--steps", "2", "--width", "64", "--height", "64",
                 "--hires-upscaler", str(model), "--hires-steps", "1", "--hires-scale", "1.5", "-q",
                 "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (96, 96) and "Hires upscaler: tiny_x2" in im.info["parameters"]


CLI_ERRORS = {
    "missing upscaler": (["--upscaler", "{tmp}/nope.pth", "-o", "{tmp}/o.png"], "upscaler '"),
    "unknown layout": (["--upscaler", "{other}", "-o", "{tmp}/o.png"], "unknown upscaler layout"),
    "bad tile": (["--upscaler", "{model}", "--tile", "-5", "-o", "{tmp}/o.png"], "--tile -5"),
    "bad overlap": (["--upscaler", "{model}", "--tile", "32", "--overlap", "16", "-o", "{tmp}/o.png"], "--overlap"),
    "bad scale": (["--upscaler", "{model}", "--scale", "0", "-o", "{tmp}/o.png"], "--scale 0"),
    "output exists": (["--upscaler", "{model}", "-o", "{tmp}/in.png"], "already exists"),
    "bad suffix": (["--upscaler", "{model}", "-o", "{tmp}/o.gif"], "unknown image type"),
    "bad device": (["--upscaler", "{model}", "--device", "bogus", "-o", "{tmp}/o.png"], "--device bogus"),
}


@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_cli_upscale_errors_are_one_line(tmp_path: Path, case: str) -> None:
    model = _tiny_file(tmp_path / "tiny.pth")
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    _image(16, 16, 0).save(tmp_path / "in.png")
    argv, message = CLI_ERRORS[case]
    names = {"tmp": str(tmp_path), "model": str(model), "other": str(tmp_path / "other.safetensors")}
    r = subprocess.run([sys.executable, "-m", "sumie", "upscale", str(tmp_path / "in.png"),
                        *[a.format(**names) for a in argv]], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(Path(sumie.__file__).parents[1]), "PATH": "/usr/bin:/bin"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("sumie: error: ") and message in lines[0], (
        r.stderr)
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "o.gif").exists()
