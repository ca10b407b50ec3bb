"""ControlNet units without a full model: resize modes, control-mode scales, step ranges, row selection, CLI groups,
infotext format.

Definitions pinned (Mikubill/sd-webui-controlnet at 56cec5b2):
* ``scripts/controlnet.py: Script.detectmap_proc`` (resize modes; ``high_quality_resize``'s interpolation choice);
* ``scripts/hook.py: UnetHook.hook.forward`` (soft injection ``weight * 0.825 ** (12 - i)``, first 10 for SDXL;
  cfg injection ``control * cond_mark``) and ``guidance_schedule_handler`` (``sampling_step / total_sampling_steps``
  outside [start, end] stops the unit);
* ``scripts/controlnet.py`` ``soft_injection = control_mode != BALANCED``, ``cfg_injection = control_mode == CONTROL``;
* ``internal_controlnet/args.py: ControlNetUnit.serialize / parse`` and ``scripts/enums.py`` (names);
* diffusers 0.42 ``ControlNetModel.forward`` (guess mode ``torch.logspace(-1, 0, n)``) and
  ``StableDiffusionControlNetPipeline.__call__`` (``controlnet_keep``).
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from sumie.adapters.control import images as ci
from sumie.adapters.control import units as cu
from sumie.cli import control as control_cli
from sumie.configs import UNetConfig
from sumie.errors import ConfigError
from sumie.models.controlnet import ControlNetModel
from sumie.models.hooks import CallInfo
from sumie.pipelines.infotext import controlnets_from_infotext, parse_infotext
from sumie.pipelines.params import ControlUnit


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth image with many colours (so the extension's area / cubic branch applies)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


# ------------------------------------------------------------------------------------------------ resize modes


def test_just_resize_uses_area_when_shrinking_and_cubic_when_growing() -> None:
    x = _photo(48, 80)
    assert np.array_equal(ci.fit_image(x, 40, 24, "Just Resize"), cv2.resize(x, (40, 24), interpolation=cv2.INTER_AREA))
    assert np.array_equal(ci.fit_image(x, 160, 96, 0), cv2.resize(x, (160, 96), interpolation=cv2.INTER_CUBIC))


def test_segmentation_map_is_resized_nearest() -> None:
    x = np.zeros((30, 30, 3), np.uint8)
    x[:10], x[10:20, :, 1], x[20:, :, 2] = 200, 90, 40  # 3 colours: nearest keeps them exact
    y = ci.fit_image(x, 64, 64, "Just Resize")
    assert np.array_equal(y, cv2.resize(x, (64, 64), interpolation=cv2.INTER_NEAREST))
    assert len(np.unique(y.reshape(-1, 3), axis=0)) == 3


def test_binary_map_stays_binary() -> None:
    x = np.zeros((32, 32, 3), np.uint8)
    x[8:24, 8:24] = 255
    y = ci.fit_image(x, 50, 50, "Just Resize")
    assert set(np.unique(y).tolist()) <= {0, 255}
    assert (y[..., 0] == y[..., 1]).all()


def test_crop_and_resize_scales_by_the_larger_factor_and_crops_the_centre() -> None:
    x = _photo(48, 80)  # to 64x64: k = max(64/48, 64/80) = 4/3 -> 107x64, crop x offset (107 - 64) // 2 = 21
    big = cv2.resize(x, (107, 64), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(ci.fit_image(x, 64, 64, "Crop and Resize"), big[:, 21:85])
    t = ci.control_image(Image.fromarray(x), 64, 64, 1)
    assert t.shape == (1, 3, 64, 64) and t.dtype == torch.float32
    assert torch.equal(t, torch.from_numpy(big[:, 21:85].copy()).permute(2, 0, 1)[None].float() / 255)
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0  # [0, 1], not [-1, 1]


def test_resize_and_fill_pads_with_the_border_median() -> None:
    x = _photo(48, 80)  # to 64x64: k = min(...) = 0.8 -> 64x38, y offset (64 - 38) // 2 = 13
    y = ci.fit_image(x, 64, 64, "Resize and Fill")
    inner = cv2.resize(x, (64, 38), interpolation=cv2.INTER_AREA)
    assert np.array_equal(y[13:51], inner)
    borders = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    fill = np.median(borders, axis=0).astype(np.uint8)
    assert (y[:13] == fill).all() and (y[51:] == fill).all()


def test_grey_and_alpha_images_become_rgb_like_hwc3() -> None:
    grey = Image.fromarray(np.full((8, 8), 77, np.uint8))
    assert (ci.to_rgb(grey) == 77).all()
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    out = ci.to_rgb(Image.fromarray(rgba))
    a = np.float32(128) / np.float32(255)
    white = 255.0 * (1.0 - a)
    assert out[0, 0].tolist() == [int(200 * a + white), int(white), int(white)]  # on white, truncated


def test_diffusers_resample_is_pil_lanczos() -> None:
    x = _photo(48, 80)
    ref = np.asarray(Image.fromarray(x).resize((64, 64), Image.Resampling.LANCZOS))
    assert np.array_equal(ci.fit_image(x, 64, 64, "Just Resize", "lanczos"), ref)


@pytest.mark.parametrize(("value", "name"), [(0, "Just Resize"), (1, "Crop and Resize"), (2, "Resize and Fill"),
                                             (3, "Just Resize"), ("Inner Fit (Scale to Fit)", "Crop and Resize"),
                                             ("resize-and-fill", "Resize and Fill")])
def test_resize_mode_names_and_ints(value: str | int, name: str) -> None:
    assert ci.resize_mode_name(value) == name


@pytest.mark.parametrize(("value", "name"), [
    (0, "Balanced"), (1, "My prompt is more important"), (2, "ControlNet is more important"),
    ("prompt", "My prompt is more important"), ("ControlNet is more important", "ControlNet is more important")])
def test_control_mode_names_and_ints(value: str | int, name: str) -> None:
    assert ci.control_mode_name(value) == name


@pytest.mark.parametrize("bad", ["sideways", 7, True])
def test_unknown_modes_are_config_errors(bad: object) -> None:
    with pytest.raises(ConfigError):
        ci.control_mode_name(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ci.resize_mode_name(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ scales and steps


def test_control_scales_per_mode() -> None:
    assert cu.control_scales(13, 0.7, "Balanced") == [0.7] * 13
    soft = cu.control_scales(13, 0.7, "My prompt is more important")
    assert soft == [0.7 * 0.825 ** float(12 - i) for i in range(13)] and soft[-1] == 0.7
    assert cu.control_scales(13, 0.7, "ControlNet is more important") == soft
    assert cu.control_scales(10, 1.0, "My prompt is more important") == [0.825 ** float(12 - i) for i in range(10)]
    guess = cu.control_scales(13, 0.5, "Balanced", guess_mode=True)
    assert guess == (torch.logspace(-1, 0, 13) * 0.5).tolist()
    assert cu.control_scales(4, 2.0, "My prompt is more important", t2i=True) == [0.5, 1.24, 1.65, 2.0]


def test_a1111_step_range_lags_one_step() -> None:
    # 10 steps, start 0.3: the last finished step must reach index 3, so the unit starts at step 4
    active = [cu.unit_active(0.3, 1.0, done, 10, "a1111") for done in range(10)]
    assert active == [False] * 4 + [True] * 6
    # end 0.5: sampling_step 5 is still <= 0.5 (step 6 acts), step 7 reads 6 -> stopped
    assert [cu.unit_active(0.0, 0.5, d, 10, "a1111") for d in range(10)] == [True] * 7 + [False] * 3


def test_diffusers_step_range_is_controlnet_keep() -> None:
    n, s, e = 10, 0.3, 0.5
    keep = [1.0 - float(i / n < s or (i + 1) / n > e) for i in range(n)]  # diffusers' formula
    assert [float(cu.unit_active(s, e, i, n, "diffusers")) for i in range(n)] == keep
    assert keep == [0, 0, 0, 1, 1, 0, 0, 0, 0, 0]


def test_check_unit_ranges() -> None:
    assert cu.check_unit(1.0, 0.0, 1.0, 2, 0) == ("ControlNet is more important", "Just Resize")
    for bad in [(2.5, 0, 1), (-0.1, 0, 1), (1, -0.1, 1), (1, 0, 1.5), (1, 0.6, 0.4)]:
        with pytest.raises(ConfigError):
            cu.check_unit(*bad, "Balanced", "Just Resize")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ residuals


TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1), num_heads=2,
                  context_dim=32, norm_groups=8)


@pytest.fixture(scope="module")
def tiny_controlnet() -> ControlNetModel:
    g = torch.Generator().manual_seed(0)
    m = ControlNetModel(TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # random zero convs too
    return m.eval().requires_grad_(False)


def _inputs(b: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, 8, 8, generator=g), torch.full((b,), 500.0), torch.randn(b, 7, 32, generator=g)


def _unit(model: ControlNetModel, **kw: object) -> cu.PreparedUnit:
    img = Image.fromarray(_photo(64, 64, seed=3))
    return cu.PreparedUnit(model, img, **kw)  # type: ignore[arg-type]


def test_balanced_residuals_are_weight_times_the_controlnet(tiny_controlnet: ControlNetModel) -> None:
    x, t, ctx = _inputs()
    unit = _unit(tiny_controlnet, weight=0.6)
    r = unit.residuals(x, t, ctx, None, None, "opencv")
    hint = ci.control_image(unit.image, 64, 64, "Crop and Resize")
    raw = tiny_controlnet(x, hint.expand(4, -1, -1, -1), t, ctx)
    assert r is not None and len(r.skips) == len(raw.skips) == 4
    for a, b in zip(r.skips, raw.skips, strict=True):
        assert torch.equal(a, b * 0.6)
    assert torch.equal(r.middle, raw.middle * 0.6)  # type: ignore[operator]
    assert float(raw.middle.abs().mean()) > 1e-2  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["ControlNet is more important", "guess"])
def test_cond_only_modes_leave_uncond_rows_at_zero(tiny_controlnet: ControlNetModel, mode: str) -> None:
    x, t, ctx = _inputs()
    rows = torch.tensor([1, 1, 0, 0])  # cond rows first, as GuidedModel batches them
    unit = _unit(tiny_controlnet, weight=0.8, mode="Balanced" if mode == "guess" else mode,
                 guess_mode=mode == "guess")
    r = unit.residuals(x, t, ctx, None, CallInfo(0, torch.ones(4), rows), "opencv")
    full = tiny_controlnet(x, ci.control_image(unit.image, 64, 64).expand(4, -1, -1, -1), t, ctx)
    n = len(full.skips) + 1
    scales = cu.control_scales(n, 0.8, unit.mode, unit.guess_mode)
    assert r is not None
    for i, (a, b) in enumerate(zip([*r.skips, r.middle], [*full.skips, full.middle], strict=True)):
        assert a is not None and b is not None
        assert torch.equal(a[2:], torch.zeros_like(a[2:]))  # hook.py: control * cond_mark
        torch.testing.assert_close(a[:2], b[:2] * scales[i], rtol=1e-5, atol=1e-6)  # cond rows only, batch of 2


def test_several_units_add_and_skipped_units_do_not_run(tiny_controlnet: ControlNetModel) -> None:
    x, t, ctx = _inputs(2)
    calls = []
    a, b = _unit(tiny_controlnet, weight=0.5), _unit(tiny_controlnet, weight=1.0, mode="My prompt is more important")
    off = _unit(tiny_controlnet, weight=0.0)
    late = _unit(tiny_controlnet, start=0.5)
    handle = tiny_controlnet.register_forward_hook(lambda *_: calls.append(1))
    try:
        fn = cu.ControlResiduals([a, b, off, late], lambda: (0, 10))
        total = fn(x, t, ctx, None, None)
        assert len(calls) == 2  # weight 0 and not-yet-started units are not run
        assert cu.ControlResiduals([off, late], lambda: (0, 10))(x, t, ctx, None, None) is None
    finally:
        handle.remove()
    ra, rb = a.residuals(x, t, ctx, None, None, "opencv"), b.residuals(x, t, ctx, None, None, "opencv")
    assert total is not None and ra is not None and rb is not None
    for s, sa, sb in zip(total.skips, ra.skips, rb.skips, strict=True):
        assert torch.equal(s, sa + sb)  # type: ignore[operator]


def test_nine_channel_input_takes_the_first_four_and_hint_follows_the_call_size(
        tiny_controlnet: ControlNetModel) -> None:
    x, t, ctx = _inputs(2)
    unit = _unit(tiny_controlnet)
    nine = torch.cat([x, torch.randn(2, 5, 8, 8)], dim=1)
    r9, r4 = unit.residuals(nine, t, ctx, None, None, "opencv"), unit.residuals(x, t, ctx, None, None, "opencv")
    assert r9 is not None and r4 is not None and torch.equal(r9.middle, r4.middle)  # type: ignore[arg-type]
    big = torch.randn(2, 4, 12, 16)
    rb = unit.residuals(big, t, ctx, None, None, "opencv")
    assert rb is not None and rb.skips[0].shape[-2:] == (12, 16)  # type: ignore[union-attr]
    assert set(unit.hints) == {(64, 64, "opencv"), (96, 128, "opencv")}  # one hint per size, cached


# ------------------------------------------------------------------------------------------------ CLI groups


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    control_cli.add_generation_args(p)
    return p.parse_args(argv)


def test_cli_groups(tmp_path) -> None:  # noqa: ANN001
    img = tmp_path / "c.png"
    Image.fromarray(_photo(16, 16)).save(img)
    args = _parse(["--controlnet", "a.safetensors", "--control-image", str(img), "--control-weight", "0.5",
                   "--control-mode", "prompt", "--controlnet", "b", "--control-image", str(img),
                   "--control-end", "0.4", "--control-resize", "2"])
    units = control_cli.units_from_args(args.control, [])
    assert [u.model for u in units] == ["a.safetensors", "b"]
    assert units[0].weight == 0.5 and units[0].mode == "prompt" and units[0].end == 1.0
    assert units[1].end == 0.4 and units[1].resize_mode == 2 and units[1].weight == 1.0
    assert isinstance(units[0].image, Image.Image)


@pytest.mark.parametrize(("argv", "message"), [
    (["--control-weight", "1", "--controlnet", "a"], "before any --controlnet"),
    (["--controlnet", "a"], "has no --control-image"),
    (["--controlnet", "a", "--control-image", "IMG", "--control-image", "IMG"], "given twice"),
    (["--controlnet", "a", "--control-image", "IMG", "--control-weight", "x"], "not a number"),
    (["--controlnet", "a", "--control-image", "IMG", "--control-weight", "3"], "[0, 2]"),
    (["--controlnet", "a", "--control-image", "IMG", "--control-mode", "loud"], "control mode"),
    (["--controlnet", "a", "--control-image", "missing.png"], "cannot be read"),
])
def test_cli_group_errors(tmp_path, argv: list[str], message: str) -> None:  # noqa: ANN001
    img = tmp_path / "c.png"
    Image.fromarray(_photo(16, 16)).save(img)
    argv = [str(img) if a == "IMG" else str(tmp_path / a) if a == "missing.png" else a for a in argv]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        control_cli.units_from_args(_parse(argv).control, [])


def test_cli_fills_restored_units_in_order(tmp_path) -> None:  # noqa: ANN001
    img = tmp_path / "c.png"
    Image.fromarray(_photo(16, 16)).save(img)
    restored = [ControlUnit("x [12345678]", None, weight=0.3), ControlUnit("y", None)]
    with pytest.raises(ConfigError, match="ControlNet 1"):
        control_cli.units_from_args(_parse(["--control-image", str(img)]).control, restored)
    units = control_cli.units_from_args(_parse(["--control-image", str(img)] * 2).control, restored)
    assert [u.weight for u in units] == [0.3, 1.0] and all(isinstance(u.image, Image.Image) for u in units)


# ------------------------------------------------------------------------------------------------ infotext


def test_infotext_value_is_the_extensions_serialize_and_parses_back() -> None:
    u = ControlUnit("m", None, weight=0.75, start=0.1, end=0.9, mode=1, resize_mode="Resize and Fill")
    text = cu.infotext_value(u, "control_canny [d14c016b]")
    assert text == ("Module: none, Model: control_canny [d14c016b], Weight: 0.75, Resize Mode: Resize and Fill, "
                    "Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.1, Guidance End: 0.9, "
                    "Pixel Perfect: False, Control Mode: My prompt is more important")
    line = f'a cat\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, ControlNet 0: "{text}", ControlNet 1: ' \
           '"Module: none, Model: other [00000000], Weight: 1.0, Resize Mode: Just Resize, Processor Res: 512, ' \
           'Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, ' \
           'Control Mode: Balanced"'
    units = controlnets_from_infotext(parse_infotext(line))
    assert [(x.model, x.weight, x.start, x.end, x.mode, x.resize_mode) for x in units] == [
        ("control_canny [d14c016b]", 0.75, 0.1, 0.9, "My prompt is more important", "Resize and Fill"),
        ("other [00000000]", 1.0, 0.0, 1.0, "Balanced", "Just Resize")]
    assert all(x.image is None for x in units)


class _FakeT2I(torch.nn.Module):
    """A stand-in T2I-Adapter: ``model(hint) -> Residuals(encoder=...)``, features at input blocks 0 and 2."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, hint: torch.Tensor) -> cu.Residuals:
        self.calls += 1
        f = hint.mean(dim=1, keepdim=True)[:, :, ::8, ::8]
        return cu.Residuals(encoder=[f, None, f * 2, f * 3, f * 4])


def test_t2i_units_scale_their_features_and_run_once_per_size() -> None:
    model = _FakeT2I()
    unit = cu.PreparedUnit(model, Image.fromarray(_photo(64, 64)), weight=0.5, mode="My prompt is more important",
                           kind="t2i_adapter")
    x, t, ctx = _inputs(4)
    call = CallInfo(0, torch.ones(4), torch.tensor([1, 1, 0, 0]))
    r1 = unit.residuals(x, t, ctx, None, call, "opencv")
    r2 = unit.residuals(x, t, ctx, None, call, "opencv")
    assert model.calls == 1 and r1 is not None and r2 is not None  # computed once per size
    raw = model(ci.control_image(unit.image, 64, 64))
    assert r1.encoder[1] is None and r1.encoder[0].shape[0] == 4  # type: ignore[union-attr]
    for k, (got, want) in enumerate(zip([r1.encoder[i] for i in (0, 2, 3, 4)],
                                        [raw.encoder[i] for i in (0, 2, 3, 4)], strict=True)):
        assert got is not None and want is not None
        torch.testing.assert_close(got[0], want[0] * 0.5 * cu.T2I_SOFT[k])
    cn_mode = cu.PreparedUnit(model, unit.image, mode="ControlNet is more important", kind="t2i_adapter")
    r3 = cn_mode.residuals(x, t, ctx, None, call, "opencv")
    assert r3 is not None and torch.equal(r3.encoder[0][2:], torch.zeros_like(r3.encoder[0][2:]))  # type: ignore
    assert float(r3.encoder[0][:2].abs().sum()) > 0  # type: ignore[index]


class _FakeT2IXL(_FakeT2I):
    """An SDXL-like stand-in: three encoder features and the fourth on the middle block (sites 3, 5, 8, middle)."""

    def forward(self, hint: torch.Tensor) -> cu.Residuals:
        f = hint.mean(dim=1, keepdim=True)[:, :, ::8, ::8]
        return cu.Residuals(encoder=[None, None, None, f, None, f * 2, None, None, f * 3], middle=f * 4)


def test_t2i_units_keep_the_sdxl_middle_feature_with_the_last_scale() -> None:
    model = _FakeT2IXL()
    unit = cu.PreparedUnit(model, Image.fromarray(_photo(64, 64)), weight=0.5, mode="My prompt is more important",
                           kind="t2i_adapter")
    x, t, ctx = _inputs(2)
    r = unit.residuals(x, t, ctx, None, None, "opencv")
    raw = model(ci.control_image(unit.image, 64, 64))
    assert r is not None and r.middle is not None and raw.middle is not None
    torch.testing.assert_close(r.middle[1], raw.middle[0] * 0.5 * cu.T2I_SOFT[3])  # the 4th (last) soft scale
    torch.testing.assert_close(r.encoder[8][0], raw.encoder[8][0] * 0.5 * cu.T2I_SOFT[2])  # type: ignore[index]


def test_a_t2i_size_error_is_a_config_error() -> None:
    class Picky(_FakeT2I):
        def forward(self, hint: torch.Tensor) -> cu.Residuals:
            raise ValueError("T2I-Adapter hint 72x64 must be a multiple of 16 per side")

    unit = cu.PreparedUnit(Picky(), Image.fromarray(_photo(64, 64)), kind="t2i_adapter")
    x, t, ctx = _inputs(2)
    with pytest.raises(ConfigError, match="multiple of 16 per side; pick a width and height the adapter takes"):
        unit.residuals(x, t, ctx, None, None, "opencv")


def test_cli_img2img_unit_without_image_takes_the_init_image() -> None:
    units = control_cli.units_from_args(_parse(["--controlnet", "a", "--control-weight", "0.4"]).control, [],
                                        init_image=True)
    assert units[0].image is None and units[0].weight == 0.4  # the engine gives it the init image
    with pytest.raises(ConfigError, match=r"\[0, 2\]"):  # still validated
        control_cli.units_from_args(_parse(["--controlnet", "a", "--control-weight", "4"]).control, [],
                                    init_image=True)


def test_infotext_writes_the_modules_own_defaults_and_the_sliders_map_to_its_settings() -> None:
    """Unset (-1) settings of a canny unit are written as canny's defaults (512, 100, 200), as the extension's
    preprocessor sliders show them; threshold_a / threshold_b are the module's first and second slider."""
    text = cu.infotext_value(ControlUnit("m", None, module="canny"), "c [1]")
    assert "Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0" in text
    text = cu.infotext_value(ControlUnit("m", None, module="canny", processor_res=256, threshold_a=20,
                                         threshold_b=60), "c [1]")
    assert "Processor Res: 256, Threshold A: 20.0, Threshold B: 60.0" in text
    assert cu.module_settings("canny", 256, 20.0, 60.0) == {"resolution": 256, "low": 20, "high": 60}
    assert cu.module_settings("canny") == {}  # -1: the preprocessor's defaults
    assert cu.module_settings("threshold", -1, 90.0) == {"threshold": 90}
    with pytest.raises(ConfigError, match="unknown control module .cany."):
        cu.module_settings("cany")
