"""ControlNet units of a request: one residual function (:data:`~sumie.pipelines.denoise.ResidualFn`) that runs every
active unit's ControlNet (or T2I-Adapter) per UNet call and sums their weighted residuals.

What each UNet call gets, as A1111's ControlNet extension computes it (``scripts/hook.py: UnetHook.hook.forward``) and
as diffusers' ``StableDiffusionControlNetPipeline`` does:

* the ControlNet sees the UNet's own input (the scaled latent; the first ``in_channels`` channels of a 9-channel
  inpainting UNet's input), timestep, context and SDXL ``y``; the hint is the control image at 8x the call's latent
  size (prepared lazily and cached per size, so the hires-fix pass gets the image fitted to its own size);
* weights: Balanced multiplies all 13 outputs (12 skips + middle; 10 for SDXL) by the weight; "My prompt is more
  important" (soft injection) multiplies output i by ``weight * 0.825 ** (12 - i)`` (the first 10 of those for
  SDXL); "ControlNet is more important" is soft injection plus cfg injection: the residuals go to the cond rows only
  (``control * cond_mark``); T2I-Adapters' soft scales are (0.25, 0.62, 0.825, 1.0);
* diffusers' ``guess_mode``: the ControlNet runs on the cond rows only and its n outputs are multiplied by
  ``weight * torch.logspace(-1, 0, n)`` (``ControlNetModel.forward``), the uncond rows get nothing;
* the step range (``start`` / ``end``): :func:`unit_active` with the convention's rule;
* a unit at weight 0 or outside its range is not run at all, so the UNet call is exactly the one without it.

Several units add their residuals (multi-ControlNet).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn

from sumie.adapters.control import images as ci
from sumie.adapters.control.images import Resample, control_mode_name, resize_mode_name
from sumie.errors import ConfigError
from sumie.models.hooks import CallInfo, Residuals

__all__ = ["SOFT_BASE", "ControlResiduals", "PreparedUnit", "StepRule", "check_unit", "control_scales",
           "infotext_value", "module_settings", "parse_infotext_value", "prepare_image", "request_units",
           "unit_active", "unit_label"]

StepRule = Literal["a1111", "diffusers"]
# inpainting "only masked": crop region (x1, y1, x2, y2), init-image size (w, h), processing size (w, h)
InpaintCrop = tuple[tuple[int, int, int, int], tuple[int, int], tuple[int, int]]
SOFT_BASE = 0.825  # the extension's soft-injection base: output i of 13 gets 0.825 ** (12 - i)
T2I_SOFT = (0.25, 0.62, 0.825, 1.0)  # the extension's soft-injection scales of a T2I-Adapter's 4 features


def unit_active(start: float, end: float, done: int, total: int, rule: StepRule = "a1111") -> bool:
    """Whether a unit acts in a UNet call of a pass of ``total`` sampler steps of which ``done`` have finished.

    A1111 (``hook.py: guidance_schedule_handler``): percent = ``state.sampling_step / steps`` where the sampling step
    is the index of the last finished step (0 before the first): stopped when percent < start or > end. diffusers
    (``controlnet_keep``): step i = ``done`` acts unless ``i / N < start or (i + 1) / N > end``.
    """
    if total <= 0:
        return True
    if rule == "a1111":
        percent = max(done - 1, 0) / total
        return not (percent < start or percent > end)
    return not (done / total < start or (done + 1) / total > end)


def control_scales(n: int, weight: float, mode: str, guess_mode: bool = False, t2i: bool = False) -> list[float]:
    """The multipliers of a unit's n outputs (skips, then the middle block) for its weight and control mode."""
    if guess_mode:
        return [float(s) for s in torch.logspace(-1, 0, n, dtype=torch.float32) * weight]  # diffusers: fp32
    if mode == "Balanced":
        return [weight] * n
    if t2i:
        if n > len(T2I_SOFT):
            raise ConfigError(f"soft injection is defined for T2I-Adapters with at most 4 features, got {n}")
        return [weight * s for s in T2I_SOFT[:n]]
    if n > 13:
        raise ConfigError(f"soft injection is defined for ControlNets with at most 13 outputs, got {n}")
    return [weight * SOFT_BASE ** float(12 - i) for i in range(13)][:n]


def check_unit(weight: float, start: float, end: float, mode: str | int, resize_mode: str | int) -> tuple[str, str]:
    """Validate a unit's numbers and names before any step runs -> (mode name, resize-mode name)."""
    if not 0.0 <= weight <= 2.0:
        raise ConfigError(f"control weight must be in [0, 2] (A1111's range), got {weight}")
    for what, v in (("start", start), ("end", end)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"control {what} must be a fraction of the steps in [0, 1], got {v}")
    if start > end:
        raise ConfigError(f"control start ({start}) is after its end ({end})")
    return control_mode_name(mode), resize_mode_name(resize_mode)


def module_settings(module: str, processor_res: int = -1, threshold_a: float = -1.0,
                    threshold_b: float = -1.0) -> dict[str, Any]:
    """The preprocessor keywords of a unit's A1111 fields: ``processor_res`` is the module's resolution,
    ``threshold_a`` / ``threshold_b`` its first and second slider (the extension's API); -1 keeps the default."""
    from sumie.preprocess import KINDS

    kind = KINDS.get(module)
    if kind is None:
        raise ConfigError(f"unknown control module {module!r}; known: {', '.join(KINDS)}")
    if kind.needs != "image":
        raise ConfigError(f"control module {module!r} needs a {kind.needs} besides the image; make the map with "
                          f"`sumie preprocess {module} ...` and give it with module none")
    out: dict[str, Any] = {}
    sliders = [q for q in kind.params if q.name != "resolution" and q.type in ("int", "float")]
    if processor_res > 0 and any(q.name == "resolution" for q in kind.params):
        out["resolution"] = int(processor_res)
    for q, v in zip(sliders, (threshold_a, threshold_b), strict=False):
        if v != -1:
            out[q.name] = int(v) if q.type == "int" else float(v)
    return out


def prepare_image(image: Any, module: str = "none",
                  crop: Callable[[Image.Image], Image.Image] | None = None,
                  settings: dict[str, Any] | None = None) -> Image.Image:
    """The unit's control map: the image (a PIL image or a file path), cropped by ``crop`` (inpainting "only
    masked"), then run through its preprocessor ``module`` with ``settings`` (:func:`module_settings`)."""
    if image is None:
        raise ConfigError("a ControlNet unit has no control image; give one (--control-image IMG)")
    if not isinstance(image, Image.Image):
        path = Path(image)
        try:
            with Image.open(path) as im:
                im.load()
                image = im.copy()
        except (OSError, ValueError) as e:
            raise ConfigError(f"control image {path}: cannot be read ({e}); give a PNG, JPEG or WebP file") from None
    try:
        image.load()
    except (OSError, ValueError) as e:
        raise ConfigError(f"control image: cannot be read ({e})") from None
    if crop is not None:
        image = crop(image)
    if module in ("none", "", None):
        return image
    from sumie.preprocess import run

    return run(module, image, **(settings or {}))


@dataclass
class PreparedUnit:
    """One unit ready to run: its network, control map and normalised settings."""

    model: nn.Module
    image: Image.Image
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"
    guess_mode: bool = False
    kind: Literal["controlnet", "t2i_adapter"] = "controlnet"
    hints: dict[tuple[int, int, str], Tensor] = field(default_factory=dict)
    t2i_cache: dict[tuple[int, int], Residuals] = field(default_factory=dict)

    @property
    def cond_only(self) -> bool:
        """Residuals on the cond rows only (cfg injection, guess mode)."""
        return self.guess_mode or self.mode == "ControlNet is more important"

    def hint(self, height: int, width: int, resample: Resample, device: torch.device) -> Tensor:
        """The control image fitted to height x width: [1, 3, H, W] in [0, 1], cached per size."""
        key = (height, width, resample)
        if key not in self.hints:
            self.hints[key] = ci.control_image(self.image, width, height, self.resize_mode, resample).to(device)
        return self.hints[key]

    def residuals(self, x_in: Tensor, t: Tensor, context: Tensor, y: Tensor | None, call: CallInfo | None,
                  resample: Resample) -> Residuals | None:
        """This unit's weighted residuals for one UNet call (None when it has no row to act on)."""
        b = x_in.shape[0]
        rows = None
        if self.cond_only and call is not None:
            rows = torch.nonzero(call.rows.to(x_in.device) != 0).flatten()
            if rows.numel() == 0:
                return None
            if rows.numel() == b:
                rows = None
        h, w = x_in.shape[-2] * 8, x_in.shape[-1] * 8
        hint = self.hint(h, w, resample, x_in.device)
        if self.kind == "t2i_adapter":
            key = (h, w)
            if key not in self.t2i_cache:
                try:
                    self.t2i_cache[key] = self.model(hint)
                except ValueError as e:  # a size the adapter cannot take (SDXL adapters: multiples of 16)
                    raise ConfigError(f"{e}; pick a width and height the adapter takes") from None
            raw = self.t2i_cache[key]
            n = sum(f is not None for f in raw.encoder) + (raw.middle is not None)  # the middle feature is last
            scales = iter(control_scales(n, self.weight, self.mode, self.guess_mode, t2i=True))
            enc = [None if f is None else f * next(scales) for f in raw.encoder]
            mid = None if raw.middle is None else raw.middle * next(scales)
            out = Residuals(encoder=[None if f is None else f.expand(b, *f.shape[1:]) for f in enc],
                            middle=None if mid is None else mid.expand(b, *mid.shape[1:]))
        else:
            in_ch = self.model.input_blocks[0][0].in_channels  # type: ignore[index]
            x = x_in[:, :in_ch]
            if rows is not None:
                x, t, context = x[rows], t[rows], context[rows]
                y = None if y is None else y[rows]
            raw = self.model(x, hint.expand(x.shape[0], -1, -1, -1), t, context, y)
            skips = list(raw.skips)
            scales = control_scales(len(skips) + 1, self.weight, self.mode, self.guess_mode)
            out = Residuals(skips=[None if s is None else s * k for s, k in zip(skips, scales, strict=False)],
                            middle=None if raw.middle is None else raw.middle * scales[-1])
        if self.kind == "t2i_adapter":  # computed once for every row: zero the uncond rows when cond-only
            return _rows_only(out, None, call, b) if self.cond_only and call is not None else out
        return out if rows is None else _rows_only(out, rows, call, b)


def _rows_only(r: Residuals, rows: Tensor | None, call: CallInfo | None, b: int) -> Residuals:
    """Residuals of the selected rows placed into zeros for the whole batch (uncond rows get nothing)."""
    def place(v: Tensor | None) -> Tensor | None:
        if v is None:
            return None
        if rows is None:  # computed for every row (T2I): zero the uncond rows
            assert call is not None
            mask = (call.rows.to(v.device) != 0).to(v.dtype).view(-1, 1, 1, 1)
            return v.expand(b, *v.shape[1:]) * mask
        full = v.new_zeros((b, *v.shape[1:]))
        full[rows] = v
        return full

    return Residuals([place(e) for e in r.encoder], [place(s) for s in r.skips], place(r.middle))


class ControlResiduals:
    """The :data:`~sumie.pipelines.denoise.ResidualFn` of a request's units: ``fn(x_in, t, context, y, call)``.

    ``progress() -> (done, total)``: finished sampler steps of the running pass and its step count (the engine's
    :class:`~sumie.pipelines.job.Progress`); ``rule``: whose start / end rule; ``resample``: how the control image is
    resized. ``base_only``: the units are the base model's (an SDXL refiner, with its other context width, runs
    without them).
    """

    base_only = True

    def __init__(self, units: Sequence[PreparedUnit], progress: Callable[[], tuple[int, int]],
                 rule: StepRule = "a1111", resample: Resample = "opencv") -> None:
        self.units = list(units)
        self.progress = progress
        self.rule: StepRule = rule
        self.resample: Resample = resample

    def active(self) -> list[PreparedUnit]:
        """The units that act in the coming UNet call (weight > 0, inside their step range)."""
        done, total = self.progress()
        return [u for u in self.units if u.weight != 0 and unit_active(u.start, u.end, done, total, self.rule)]

    def __call__(self, x_in: Tensor, t: Tensor, context: Tensor, y: Tensor | None,
                 call: CallInfo | None) -> Residuals | None:
        """Sum of the active units' residuals, or None when no unit acts (the UNet's plain call)."""
        total: Residuals | None = None
        for unit in self.active():
            r = unit.residuals(x_in, t, context, y, call, self.resample)
            if r is not None:
                total = r if total is None else total.add(r)
        return total


# ------------------------------------------------------------------------------------------------ requests


def unit_label(path: Path) -> str:
    """The extension's model title: ``name [hash]`` with A1111's old 8-hex ``model_hash`` of the file."""
    from sumie.checkpoints.io import legacy_model_hash

    return f"{path.stem} [{legacy_model_hash(path)}]" if path.is_file() else path.name


def infotext_value(unit: Any, model_label: str) -> str:
    """A unit as the extension's ``ControlNetUnit.serialize`` writes it (``Module: none, Model: ..., ...``);
    unset preprocessor settings (-1) are written as the module's defaults (canny: 512, 100, 200), the extension's
    512, 0.5, 0.5 where it has none."""
    mode, resize = control_mode_name(unit.mode), resize_mode_name(unit.resize_mode)
    defaults = [512, 0.5, 0.5]
    if unit.module not in ("none", ""):
        from sumie.preprocess import KINDS

        kind = KINDS.get(unit.module)
        params = kind.params if kind is not None else ()
        defaults[0] = next((q.default for q in params if q.name == "resolution"), 512)
        sliders = [q.default for q in params if q.name != "resolution" and q.type in ("int", "float")]
        defaults[1:1 + len(sliders[:2])] = sliders[:2]
    res = unit.processor_res if unit.processor_res >= 0 else defaults[0]
    ta = unit.threshold_a if unit.threshold_a >= 0 else defaults[1]
    tb = unit.threshold_b if unit.threshold_b >= 0 else defaults[2]
    fields = {"Module": unit.module, "Model": model_label, "Weight": float(unit.weight), "Resize Mode": resize,
              "Processor Res": int(res), "Threshold A": float(ta), "Threshold B": float(tb),
              "Guidance Start": float(unit.start), "Guidance End": float(unit.end),
              "Pixel Perfect": bool(unit.pixel_perfect), "Control Mode": mode}
    for k, v in fields.items():
        if "," in str(v) or ":" in str(v):
            raise ConfigError(f"ControlNet {k.lower()} {v!r} cannot go into the infotext (it holds ',' or ':'); "
                              "rename the file")
    return ", ".join(f"{k}: {v}" for k, v in fields.items())


def parse_infotext_value(text: str) -> dict[str, Any]:
    """The extension's ``ControlNetUnit.parse``: ``Key: value, ...`` -> {field: bool | int | float | str}."""
    out: dict[str, Any] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.strip().partition(": ")
        if not sep:
            raise ConfigError(f"ControlNet infotext item {item.strip()!r} is not 'Key: value'")
        parsed: Any = value
        if value in ("True", "False"):
            parsed = value == "True"
        else:
            for kind in (int, float):
                try:
                    parsed = kind(value)
                    break
                except ValueError:
                    continue
        out["_".join(w.lower() for w in key.split(" "))] = parsed
    return out


def request_units(units: Sequence[Any], *, resolve: Callable[[str], Path], load: Callable[[Path], nn.Module],
                  progress: Callable[[], tuple[int, int]], rule: StepRule = "a1111",
                  resample: Resample = "opencv", init: tuple[Image.Image, str] | None = None,
                  crop: InpaintCrop | None = None) -> tuple[ControlResiduals, dict[str, str]]:
    """The residual function and infotext fields (``ControlNet 0`` ...) of a request's
    :class:`~sumie.pipelines.params.ControlUnit` s: every name, file, family and image checked and every model
    loaded (once per path) before any step runs.

    ``init``: (init image, img2img resize mode) for units without an image (the extension's ``choose_input_image``
    takes ``p.init_images[0]`` with the img2img resize mode); ``crop``: inpainting "only masked" (region, init-image
    size, processing size) (:func:`~sumie.adapters.control.images.crop_for_inpaint`).
    """
    prepared: list[PreparedUnit] = []
    fields: dict[str, str] = {}
    models: dict[str, nn.Module] = {}
    for i, u in enumerate(units):
        mode, resize = check_unit(float(u.weight), float(u.start), float(u.end), u.mode, u.resize_mode)
        path = resolve(str(u.model))
        key = str(path.resolve())
        if key not in models:
            models[key] = load(path)
        source = u.image
        if source is None and init is not None:
            source, resize = init[0], resize_mode_name(init[1])
        cut = None
        if crop is not None:
            region, size, (w, h) = crop
            cut = functools.partial(ci.crop_for_inpaint, region=region, size=size, width=w, height=h,
                                    resize_mode=resize)
        settings = module_settings(u.module, int(u.processor_res), float(u.threshold_a), float(u.threshold_b)) \
            if u.module not in ("none", "") else {}
        image = prepare_image(source, u.module, cut, settings)
        kind = "t2i_adapter" if not hasattr(models[key], "input_hint_block") else "controlnet"
        prepared.append(PreparedUnit(models[key], image, float(u.weight), float(u.start), float(u.end), mode,
                                     resize, bool(u.guess_mode), kind))  # type: ignore[arg-type]
        fields[f"ControlNet {i}"] = infotext_value(u, unit_label(path))
    return ControlResiduals(prepared, progress, rule, resample), fields
