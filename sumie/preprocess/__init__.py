"""Control-image preprocessors that need no downloaded weights, under the module names of A1111's ControlNet
extension (Mikubill/sd-webui-controlnet): ``run(kind, image, **params) -> PIL.Image`` and the table ``KINDS``.

Each result is what the extension hands to the unit (before the unit's resize to the generation size): RGB uint8,
at the preprocessor's resolution (short side = ``resolution`` for the modules that have one, the input's size for
the others, the JSON canvas for ``openpose``). ``inpaint`` is the exception: RGBA with the mask as alpha, see
:mod:`sumie.preprocess.inpaint`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from sumie.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes 32 bits

__all__ = ["KINDS", "Kind", "Param", "kind_names", "pixel_perfect_resolution", "run"]


@dataclass(frozen=True)
class Param:
    """One setting of a preprocessor: keyword of :func:`run` (CLI ``--name`` with dashes), default and range."""

    name: str
    default: Any
    type: Literal["int", "float", "bool", "image", "pose"]
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""


@dataclass(frozen=True)
class Kind:
    """A preprocessor: its A1111 module name, the function, its settings and what it matches."""

    name: str
    fn: str  # "module.function" in this package, imported on first use (OpenCV loads in ~0.1 s)
    params: tuple[Param, ...]
    matches: str
    for_model: str
    needs: str = "image"  # "image": a PIL image; "pose": a pose JSON (the image is optional); "mask": image + mask


RESOLUTION = Param("resolution", 512, "int", 64, 8192, "preprocessor resolution: the short side, in pixels")
_SEED = Param("seed", 0, "int", 0, MAX_SEED, "numpy seed of the shuffle field")
_GAMMA = Param("gamma", 1.0, "float", 0.1, 2.0, "gamma correction (the extension's slider)")


_KINDS = [
    Kind("none", "common.identity", (),
         "`PreprocessorNone`: the image unchanged (a pose, depth, normal or edge map made elsewhere)", "any"),
    Kind("canny", "edges.canny",
         (RESOLUTION, Param("low", 100, "int", 1, 255, "low threshold"), Param("high", 200, "int", 1, 255,
                                                                              "high threshold")),
         "`PreprocessorCanny`: `cv2.Canny` after `resize_image_with_pad` (exact)", "canny"),
    Kind("threshold", "lines.threshold",
         (RESOLUTION, Param("threshold", 127, "int", 0, 255, "binarization threshold")),
         "`processor.threshold`: white where min(R, G, B) > threshold (exact)", "scribble / lineart"),
    Kind("scribble_xdog", "lines.scribble_xdog",
         (RESOLUTION, Param("threshold", 32, "int", 1, 64, "XDoG threshold")),
         "`PreprocessorScribbleXdog`: difference of Gaussians 0.5 / 5, thresholded (exact, uint8 wrap included)",
         "scribble"),
    Kind("invert", "lines.invert", (), "`PreprocessorInvert` (from white bg & black line): 255 - image at its own "
         "size (exact)", "lineart / scribble / canny / mlsd"),
    Kind("lineart_standard", "lines.lineart_standard", (RESOLUTION,),
         "`processor.lineart_standard` (from white bg & black line): blur-difference line intensity (exact)",
         "lineart"),
    Kind("softedge_gradient", "edges.softedge_gradient",
         (RESOLUTION, Param("sigma", 1.0, "float", 0.0, 64.0, "Gaussian blur before the gradient (0: none)")),
         "Sumie's own: Sobel gradient magnitude, max over RGB, scaled to 0..255 (the look of HED / PiDiNet soft "
         "edges, not their values)", "softedge"),
    Kind("shuffle", "shuffle.shuffle", (RESOLUTION, _SEED),
         "`PreprocessorShuffle` / `ContentShuffleDetector`: random smooth remap (exact for the same numpy seed)",
         "shuffle"),
    Kind("tile_resample", "tile.tile_resample", (Param("rate", 1.0, "float", 1.0, 8.0, "down-sampling rate"),),
         "`processor.tile_resample`: INTER_AREA down by the rate, unchanged below 1.1 (exact)", "tile"),
    Kind("blur_gaussian", "tile.blur_gaussian",
         (RESOLUTION, Param("sigma", 9.0, "float", 0.01, 64.0, "Gaussian blur sigma")),
         "`PreprocessorBlurGaussian`: `cv2.GaussianBlur` after the resize (exact)", "tile"),
    Kind("color", "colour.color", (RESOLUTION,),
         "`annotator.color` (t2ia_color_grid): 64-pixel grid of cubic samples (exact)", "T2I-Adapter color"),
    Kind("recolor_luminance", "colour.recolor_luminance", (_GAMMA,),
         "`processor.recolor_luminance`: L of BGR2LAB on RGB data, gamma (exact)", "recolor"),
    Kind("recolor_intensity", "colour.recolor_intensity", (_GAMMA,),
         "`processor.recolor_intensity`: V of HSV = max(R, G, B), gamma (exact)", "recolor"),
    Kind("inpaint", "inpaint.inpaint", (Param("mask", None, "image", help="mask image, white = repaint"),),
         "`PreprocessorInpaint` (inpaint_global_harmonious): RGBA, mask as alpha; the ControlNet sees -1 where "
         "masked (`hook.py` inpaint protocol, `inpaint.control_hint`)", "inpaint", needs="mask"),
    Kind("openpose", "openpose.openpose",
         (Param("pose", None, "pose", help="pose JSON (dict, path or text)"),
          Param("width", None, "int", 1, 16384, "canvas width when the JSON has no canvas_width"),
          Param("height", None, "int", 1, 16384, "canvas height when the JSON has no canvas_height"),
          Param("min_confidence", 1.0, "float", 1e-6, 1.0, "keypoints below this confidence are missing"),
          Param("body", True, "bool", help="draw the body"), Param("hands", True, "bool", help="draw the hands"),
          Param("face", True, "bool", help="draw the face")),
         "`decode_json_as_poses` + `draw_poses` (`util.draw_bodypose` / `draw_handpose` / `draw_facepose`): the "
         "18-keypoint skeleton, hands and face of a pose JSON (exact)", "openpose", needs="pose"),
]
KINDS: dict[str, Kind] = {k.name: k for k in _KINDS}


def kind_names() -> list[str]:
    """The preprocessor names, in the table's order."""
    return list(KINDS)


def _check(kind: Kind, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` checked against the kind's settings (names, types, ranges), defaults filled in."""
    known = {p.name: p for p in kind.params}
    unknown = [n for n in params if n not in known]
    if unknown:
        takes = ", ".join(known) or "no settings"
        raise ConfigError(f"preprocessor {kind.name!r} takes {takes}; not {', '.join(map(repr, unknown))}")
    out: dict[str, Any] = {}
    for p in kind.params:
        v = params.get(p.name, p.default)
        if v is not None and p.type in ("int", "float"):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"{kind.name}: {p.name} must be a number, got {v!r}")
            if p.type == "int":
                if v != int(v):
                    raise ConfigError(f"{kind.name}: {p.name} must be a whole number, got {v!r}")
                v = int(v)
            else:
                v = float(v)
            if (p.minimum is not None and v < p.minimum) or (p.maximum is not None and v > p.maximum):
                raise ConfigError(f"{kind.name}: {p.name} must be from {p.minimum:g} to {p.maximum:g}, got {v:g}")
        elif p.type == "bool" and not isinstance(v, bool):
            raise ConfigError(f"{kind.name}: {p.name} must be True or False, got {v!r}")
        out[p.name] = v
    return out


def _function(kind: Kind) -> Callable[..., Any]:
    """The kind's function, its module imported now."""
    module, name = kind.fn.rsplit(".", 1)
    return getattr(importlib.import_module(f"sumie.preprocess.{module}"), name)


def pixel_perfect_resolution(size: tuple[int, int], target_w: int, target_h: int, resize_mode: str) -> int:
    """``external_code.pixel_perfect_resolution`` ("Pixel Perfect"): the resolution that maps the image's short side
    onto the generation size (``size`` = (width, height)); "Resize and Fill" fits inside, the other modes cover."""
    raw_w, raw_h = size
    k0, k1 = float(target_h) / float(raw_h), float(target_w) / float(raw_w)
    k = min(k0, k1) if resize_mode == "Resize and Fill" else max(k0, k1)
    return int(round(k * float(min(raw_h, raw_w))))


def run(kind: str, image: Image.Image | None, **params: Any) -> Image.Image:
    """Preprocess ``image`` with the A1111 module ``kind`` -> RGB PIL image (``inpaint``: RGBA, mask as alpha;
    ``openpose``: draws ``pose=``, the image is optional). Unknown kind or setting: ConfigError."""
    from PIL import Image

    from sumie.preprocess.common import to_array, to_image

    k = KINDS.get(kind)
    if k is None:
        raise ConfigError(f"unknown preprocessor {kind!r}; known: {', '.join(KINDS)}")
    settings = _check(k, params)
    fn = _function(k)
    if k.needs == "pose":
        if image is not None and not isinstance(image, Image.Image):
            raise ConfigError(f"openpose: the image (canvas size) must be a PIL image, got {type(image).__name__}")
        return to_image(fn(image, **settings))
    if not isinstance(image, Image.Image):
        raise ConfigError(f"preprocessor {kind!r} needs a PIL image, got {type(image).__name__}")
    if k.needs == "mask":
        return Image.fromarray(fn(image, **settings), "RGBA")
    return to_image(fn(to_array(image), **settings))
