"""The ControlNet extension's API: units in ``alwayson_scripts`` and its ``/controlnet/*`` list routes.

A request's ``alwayson_scripts`` entry whose name is ``controlnet`` (any case, as A1111 matches script titles) holds
``{"args": [unit, ...]}``, each unit a dict with the extension's ``ControlNetUnit`` fields
(``internal_controlnet/external_code.py``): ``enabled``, ``image`` (base64, ``{"image", "mask"}`` or
``[image, mask]``; ``""`` = none), ``mask`` / ``mask_image``, ``module``, ``model``, ``weight``, ``resize_mode``,
``processor_res``, ``threshold_a``, ``threshold_b``, ``guidance_start``, ``guidance_end``, ``control_mode``,
``pixel_perfect``, and the old keys ``guidance`` (= ``guidance_end``), ``input_image`` (= ``image``). Units that are
disabled or whose model is ``"None"`` are skipped. A mask (when any pixel of it is over 127) becomes the image's
alpha, composited on white as the extension's ``HWC3`` does. ``pixel_perfect`` sets the preprocessor resolution
from the image and the generation size (``external_code.pixel_perfect_resolution``). Fields Sumie has no use for
(``low_vram``, ``save_detected_map``, ``inpaint_crop_input_image``, ...) are ignored; ``hr_option`` other than
"Both" and ``advanced_weighting`` are reported in ``info`` as ignored. Model names resolve only inside the
configured ControlNet folders; every bad value is a 422 naming ``alwayson_scripts.<key>.args[i].<field>``.
The extension appends the detected maps to the response's images; Sumie does not.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from PIL import Image

from sumie.adapters.control.images import control_mode_name, resize_mode_name
from sumie.adapters.control.units import check_unit, module_settings, unit_label
from sumie.errors import ConfigError
from sumie.pipelines.params import ControlUnit, GenerationParams
from sumie.serve.catalog import Catalog
from sumie.serve.config import Limits
from sumie.serve.decode import decode_image
from sumie.serve.errors import ApiError

__all__ = ["API_VERSION", "SCRIPT", "control_units", "router"]

SCRIPT = "controlnet"
API_VERSION = 2  # external_code.get_api_version()
_COMPAT = {"guessmode": "guess_mode", "guidance": "guidance_end", "lowvram": "low_vram", "input_image": "image"}
_NONE_MODELS = (None, "", "None", "none")


def _num(unit: dict[str, Any], name: str, default: float, where: str, kind: type = float) -> Any:
    v = unit.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and isinstance(v, float)
                                                                   and not v.is_integer()):
        raise ApiError(422, f"{where}.{name}: expected a{'n integer' if kind is int else ' number'}, got {v!r}",
                       field=f"{where}.{name}")
    return kind(v)


def _str(unit: dict[str, Any], name: str, default: str, where: str) -> str:
    v = unit.get(name, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise ApiError(422, f"{where}.{name}: expected a string, got {v!r}", field=f"{where}.{name}")
    return v


def _image(unit: dict[str, Any], where: str, limits: Limits) -> Image.Image | None:
    """The unit's control image with its mask as alpha (composited on white), or None when it has none."""
    raw, mask = unit.get("image"), unit.get("mask", unit.get("mask_image"))
    field = f"{where}.image"
    if isinstance(raw, dict):
        raw, mask, field = raw.get("image"), raw.get("mask", mask), f"{where}.image.image"
    elif isinstance(raw, (list, tuple)):
        if len(raw) != 2:
            raise ApiError(422, f"{where}.image: a list must be [image, mask]", field=f"{where}.image")
        raw, mask, field = raw[0], raw[1], f"{where}.image[0]"
    if raw in (None, ""):
        return None

    def decode(text: object, name: str) -> Image.Image:
        return decode_image(text, name, max_b64_bytes=limits.max_b64_bytes, max_pixels=limits.max_image_pixels)

    image = decode(raw, field)
    if mask in (None, ""):
        return image
    m = decode(mask, field.replace("image", "mask", 1) if field.endswith("image.image") else f"{where}.mask")
    m = m.convert("L")
    if m.getextrema()[1] <= 127:  # the extension uses a mask only where some pixel is over 127
        return image
    if m.size != image.size:
        m = m.resize(image.size, Image.Resampling.NEAREST)
    rgba = image.convert("RGBA")
    rgba.putalpha(m)
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _unit(unit: dict[str, Any], where: str, p: GenerationParams, catalog: Catalog, limits: Limits,
          hires: bool, warnings: list[str]) -> ControlUnit | None:
    """One unit dict -> a ControlUnit (None when disabled or without a model)."""
    unit = {_COMPAT.get(k, k): v for k, v in unit.items()}
    enabled = unit.get("enabled", True)
    if not isinstance(enabled, bool) and enabled is not None:
        raise ApiError(422, f"{where}.enabled: expected true or false, got {enabled!r}", field=f"{where}.enabled")
    model = unit.get("model", "None")
    if enabled is False or model in _NONE_MODELS:
        return None
    if not isinstance(model, str):
        raise ApiError(422, f"{where}.model: expected a model name, got {model!r}", field=f"{where}.model")
    path = catalog.model("controlnet", model, f"{where}.model")
    module = _str(unit, "module", "none", where)
    weight = _num(unit, "weight", 1.0, where)
    start, end = _num(unit, "guidance_start", 0.0, where), _num(unit, "guidance_end", 1.0, where)
    res = _num(unit, "processor_res", -1, where, int)
    ta, tb = _num(unit, "threshold_a", -1.0, where), _num(unit, "threshold_b", -1.0, where)
    mode = unit.get("control_mode", 0)
    resize = unit.get("resize_mode", "Crop and Resize")
    for name, value, check in (("control_mode", mode, control_mode_name), ("resize_mode", resize, resize_mode_name)):
        try:
            check(value)
        except ConfigError as e:
            raise ApiError(422, f"{where}.{name}: {e}", field=f"{where}.{name}") from None
    for name, lo, hi, value in (("weight", 0.0, 2.0, weight), ("guidance_start", 0.0, 1.0, start),
                                ("guidance_end", 0.0, 1.0, end)):
        if not lo <= value <= hi:
            raise ApiError(422, f"{where}.{name}: must be in [{lo:g}, {hi:g}], got {value}", field=f"{where}.{name}")
    try:
        check_unit(weight, start, end, mode, resize)
    except ConfigError as e:
        raise ApiError(422, f"{where}.guidance_start: {e}", field=f"{where}.guidance_start") from None
    pixel_perfect = unit.get("pixel_perfect", False)
    if not isinstance(pixel_perfect, bool):
        raise ApiError(422, f"{where}.pixel_perfect: expected true or false, got {pixel_perfect!r}",
                       field=f"{where}.pixel_perfect")
    image = _image(unit, where, limits)
    if image is None and not p.init_images:
        raise ApiError(422, f"{where}.image: a txt2img ControlNet unit needs a control image (base64)",
                       field=f"{where}.image")
    if module not in ("none", ""):
        if pixel_perfect and image is not None:
            from sumie.preprocess import pixel_perfect_resolution

            res = pixel_perfect_resolution(image.size, p.width or 512, p.height or 512, resize_mode_name(resize))
        try:
            module_settings(module, res, ta, tb)
        except ConfigError as e:
            raise ApiError(422, f"{where}.module: {e}", field=f"{where}.module") from None
    hr_option = unit.get("hr_option", "Both")
    if hires and hr_option not in (None, "Both", 0):
        warnings.append(f"{where}.hr_option {hr_option!r} is not supported by Sumie (the unit acts in both passes)")
    if unit.get("advanced_weighting"):
        warnings.append(f"{where}.advanced_weighting is not supported by Sumie and was ignored")
    return ControlUnit(model=str(path), image=image, weight=weight, start=start, end=end, mode=mode,
                       resize_mode=resize, module=module or "none", processor_res=res, threshold_a=ta,
                       threshold_b=tb, pixel_perfect=pixel_perfect)


def control_units(scripts: dict[str, Any] | None, p: GenerationParams, catalog: Catalog, limits: Limits,
                  warnings: list[str]) -> list[ControlUnit]:
    """The ControlNet units of a request's ``alwayson_scripts`` (see the module docstring); 422 naming the field."""
    key = next((k for k in (scripts or {}) if k.lower() == SCRIPT), None)
    if key is None:
        return []
    entry = scripts[key]  # type: ignore[index]
    where = f"alwayson_scripts.{key}"
    if isinstance(entry, list):
        args = entry
    elif isinstance(entry, dict):
        args = entry.get("args") or []
    elif entry is None:
        return []
    else:
        raise ApiError(422, f"{where}: expected {{\"args\": [unit, ...]}}", field=where)
    if not isinstance(args, list):
        raise ApiError(422, f"{where}.args: expected a list of units", field=f"{where}.args")
    units: list[ControlUnit] = []
    for i, raw in enumerate(args):
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise ApiError(422, f"{where}.args[{i}]: expected a unit object", field=f"{where}.args[{i}]")
        u = _unit(raw, f"{where}.args[{i}]", p, catalog, limits, p.hires is not None, warnings)
        if u is not None:
            units.append(u)
    return units


# ------------------------------------------------------------------------------------------------ routes

router = APIRouter()


@router.get("/version")
def version() -> dict[str, int]:
    """The extension's API version."""
    return {"version": API_VERSION}


@router.get("/model_list")
def model_list(request: Request, update: bool = True) -> dict[str, list[str]]:
    """The ControlNet models in the configured folders, as the extension titles them (``name [hash]``)."""
    return {"model_list": [unit_label(f.path) for f in request.app.state.sumie.folders.list("controlnet")]}


@router.get("/module_list")
def module_list(alias_names: bool = False) -> dict[str, Any]:
    """The preprocessors Sumie has (``sumie.preprocess.KINDS``) and their sliders."""
    from sumie.preprocess import KINDS

    detail: dict[str, Any] = {}
    for name, kind in KINDS.items():
        sliders = [{"name": q.name, "value": q.default, "min": q.minimum, "max": q.maximum}
                   for q in kind.params if q.type in ("int", "float")]
        detail[name] = {"model_free": True, "sliders": sliders}
    return {"module_list": list(KINDS), "module_detail": detail}


@router.get("/settings")
def settings() -> dict[str, int]:
    """How many units the UI shows (the extension's ``control_net_unit_count``; the API takes any number)."""
    return {"control_net_unit_count": 3}
