"""Control images: a picture -> RGB float [1, 3, H, W] in [0, 1] at a pass's pixel size (no [-1, 1], no normalising).

The three resize modes of A1111's ControlNet extension (``scripts/controlnet.py: Script.detectmap_proc``):

* **Just Resize**: stretched to W x H;
* **Crop and Resize** (the default; "Inner Fit"): scaled by ``max(H / h, W / w)`` to ``round(w k) x round(h k)``, then
  the centre W x H cut out (offsets ``(new - target) // 2``);
* **Resize and Fill** ("Outer Fit"): scaled by ``min(...)``, pasted at offsets ``(target - new) // 2`` on a canvas
  filled with the per-channel median of the image's border pixels (cast to uint8, as numpy's ``astype`` truncates).

Interpolation (``high_quality_resize``, ``resample="opencv"``): OpenCV ``INTER_NEAREST`` for maps of 3-199 distinct
colours (segmentation maps), else ``INTER_AREA`` when the pixel count shrinks and ``INTER_CUBIC`` when it grows; a
two-colour map with black < 16 and white > 240 (a binary map) is averaged over the channels and re-binarised with
Otsu's threshold. Not done: the extension's extra non-maximum suppression and thinning of one-pixel-wide binary edges
(``nake_nms`` / ``lvmin_thin``), which only matters when a one-pixel edge map is resized. ``resample="lanczos"`` is
diffusers' ``VaeImageProcessor`` (PIL Lanczos), for the diffusers convention. Grey images are replicated to RGB and
RGBA images composited on white (the extension's ``HWC3``); diffusers' ``convert("RGB")`` drops the alpha instead.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sumie.errors import ConfigError

__all__ = ["CONTROL_MODES", "RESIZE_MODES", "Resample", "control_image", "control_mode_name", "crop_for_inpaint",
           "fit_image", "resize_map", "resize_mode_name", "to_rgb"]

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
# the extension's aliases of the resize modes (``internal_controlnet/external_code.py: resize_mode_aliases``)
_RESIZE_ALIASES = {"Inner Fit (Scale to Fit)": "Crop and Resize", "Outer Fit (Shrink to Fit)": "Resize and Fill",
                   "Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill"}
Resample = Literal["opencv", "lanczos"]


def resize_mode_name(value: str | int) -> str:
    """A resize mode by name, alias or the API's int (0 Just Resize, 1 Crop and Resize, 2 Resize and Fill; 3, the
    extension's "Just Resize (Latent upscale)", is Just Resize) -> its name."""
    if isinstance(value, bool):
        raise ConfigError(f"control resize mode {value!r}: use one of {', '.join(RESIZE_MODES)} or 0, 1, 2")
    if isinstance(value, int):
        if value == 3:
            return "Just Resize"
        if 0 <= value < len(RESIZE_MODES):
            return RESIZE_MODES[value]
    else:
        name = _RESIZE_ALIASES.get(str(value), str(value))
        for known in RESIZE_MODES:  # case-insensitive, '-' and '_' as spaces (CLI: crop-and-resize)
            if name.lower().replace("_", " ").replace("-", " ") == known.lower():
                return known
    raise ConfigError(f"control resize mode {value!r}: use one of {', '.join(RESIZE_MODES)} (or 0, 1, 2)")


def control_mode_name(value: str | int) -> str:
    """A control mode by name or the API's int (0 Balanced, 1 My prompt is more important, 2 ControlNet is more
    important) -> its name."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(CONTROL_MODES):
        return CONTROL_MODES[value]
    if isinstance(value, str):
        short = {"balanced": 0, "prompt": 1, "controlnet": 2}
        key = value.lower().replace("_", " ").replace("-", " ")
        for i, known in enumerate(CONTROL_MODES):
            if key == known.lower() or short.get(key.replace(" ", "")) == i:
                return known
    raise ConfigError(f"control mode {value!r}: use one of {', '.join(CONTROL_MODES)} (or 0, 1, 2; or balanced, "
                      "prompt, controlnet)")


def to_rgb(image: Image.Image, resample: Resample = "opencv") -> np.ndarray:
    """A picture -> uint8 [H, W, 3]: grey replicated; alpha composited on white (A1111) or dropped (diffusers)."""
    if resample == "lanczos":
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        arr = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = arr[..., 3:4] / 255.0
        return (arr[..., :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize_map(x: np.ndarray, width: int, height: int, resample: Resample = "opencv") -> np.ndarray:
    """uint8 [h, w, 3] -> [height, width, 3] with the interpolation of the module docstring."""
    if x.shape[0] == height and x.shape[1] == width:
        return x
    if resample == "lanczos":
        return np.asarray(Image.fromarray(x).resize((width, height), Image.Resampling.LANCZOS), dtype=np.uint8)
    import cv2

    colours = len(np.unique(x.reshape(-1, x.shape[2]), axis=0))
    binary = colours == 2 and int(x.min()) < 16 and int(x.max()) > 240
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    elif width * height < x.shape[0] * x.shape[1]:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    y = cv2.resize(x, (width, height), interpolation=interpolation)
    if binary:
        grey = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        y = np.stack([grey] * 3, axis=2)
    return y


def fit_image(x: np.ndarray, width: int, height: int, resize_mode: str | int,
              resample: Resample = "opencv") -> np.ndarray:
    """uint8 [h, w, 3] -> [height, width, 3] by one of the three resize modes (module docstring)."""
    mode = resize_mode_name(resize_mode)
    if mode == "Just Resize":
        return resize_map(x, width, height, resample)
    old_h, old_w = x.shape[:2]
    k0, k1 = height / old_h, width / old_w
    if mode == "Resize and Fill":
        k = min(k0, k1)
        borders = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]], axis=0)
        out = np.tile(np.median(borders, axis=0).astype(x.dtype)[None, None], (height, width, 1))
        inner = resize_map(x, int(np.round(old_w * k)), int(np.round(old_h * k)), resample)
        nh, nw = inner.shape[:2]
        ph, pw = max(0, (height - nh) // 2), max(0, (width - nw) // 2)
        out[ph : ph + nh, pw : pw + nw] = inner[: height - ph, : width - pw]
        return out
    k = max(k0, k1)
    big = resize_map(x, int(np.round(old_w * k)), int(np.round(old_h * k)), resample)
    ph, pw = max(0, (big.shape[0] - height) // 2), max(0, (big.shape[1] - width) // 2)
    return big[ph : ph + height, pw : pw + width]


def control_image(image: Image.Image, width: int, height: int, resize_mode: str | int = "Crop and Resize",
                  resample: Resample = "opencv") -> Tensor:
    """The control hint of a pass: RGB float32 [1, 3, height, width] in [0, 1]."""
    arr = fit_image(to_rgb(image, resample), width, height, resize_mode, resample)
    if arr.shape[:2] != (height, width):
        raise ConfigError(f"control image fitted to {arr.shape[1]}x{arr.shape[0]}, not {width}x{height}")
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float() / 255.0


_A1111_MODES = {"Just Resize": "just_resize", "Crop and Resize": "crop_and_resize",
                "Resize and Fill": "resize_and_fill"}


def crop_for_inpaint(image: Image.Image, region: tuple[int, int, int, int], size: tuple[int, int], width: int,
                     height: int, resize_mode: str | int) -> Image.Image:
    """Inpainting "only masked": the control image as the extension's ``try_crop_image_with_a1111_mask`` makes it.

    Fitted to the init image's ``size`` (w, h) with the unit's resize mode by A1111's ``images.resize_image``
    (Lanczos: the extension resizes each channel as an "L" image, which A1111 always resizes with Lanczos), the mask's
    crop ``region`` (x1, y1, x2, y2) cut out, then "resize and fill"ed to the processing size, as the init image is.
    """
    from sumie.pipelines.images import resize_image

    rgb = Image.fromarray(to_rgb(image))
    fitted = resize_image(rgb, size[0], size[1], _A1111_MODES[resize_mode_name(resize_mode)])  # type: ignore[arg-type]
    return resize_image(fitted.crop(region), width, height, "resize_and_fill")
