"""Shared steps of the control-image preprocessors, with the semantics of A1111's ControlNet extension
(Mikubill/sd-webui-controlnet): ``annotator/util.py: HWC3`` and ``scripts/utils.py: resize_image_with_pad``."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

from sumie.errors import ConfigError

__all__ = ["hwc3", "identity", "resize_short_side", "resize_with_pad", "to_array", "to_image"]


def hwc3(x: np.ndarray) -> np.ndarray:
    """``HWC3``: uint8 [H, W] / [H, W, 1|3|4] -> [H, W, 3]; grey is repeated, RGBA is composited over white in
    float32 (``rgb * a + 255 * (1 - a)``, then clip and truncate to uint8)."""
    if x.dtype != np.uint8:
        raise ConfigError(f"preprocessor images are uint8, got {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ConfigError(f"an image is [H, W] or [H, W, 1|3|4], got {list(x.shape)}")
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, :3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def to_array(image: Image.Image) -> np.ndarray:
    """A PIL image as the extension's input array: uint8 [H, W, 3] RGB through ``HWC3`` (transparency over white)."""
    if not isinstance(image, Image.Image):
        raise ConfigError(f"a preprocessor needs a PIL image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ConfigError(f"cannot preprocess an empty {image.width}x{image.height} image")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return hwc3(np.asarray(image.convert("RGBA")))
    return hwc3(np.asarray(image.convert("RGB")))


def to_image(x: np.ndarray) -> Image.Image:
    """uint8 [H, W] / [H, W, 1|3|4] -> an RGB PIL image (``HWC3``, as the extension applies to every result)."""
    return Image.fromarray(np.ascontiguousarray(hwc3(x)), "RGB")


def identity(img: np.ndarray) -> np.ndarray:
    """``PreprocessorNone``: the image as is (already RGB through ``HWC3``)."""
    return img


def _pad64(x: int) -> int:
    """``pad64``: the pixels that bring ``x`` up to a multiple of 64."""
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def resize_with_pad(img: np.ndarray, resolution: int) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """``resize_image_with_pad``: scale so the SHORT side is ``resolution`` (sizes rounded; INTER_CUBIC when
    enlarging, INTER_AREA otherwise), then pad right / bottom by edge replication to multiples of 64.

    Returns the padded image and ``remove_pad``, which crops a result back to the scaled (unpadded) size.
    """
    resolution = int(resolution)
    if resolution < 1:
        raise ConfigError(f"resolution must be a positive number of pixels, got {resolution}")
    img = hwc3(img)
    h_raw, w_raw = img.shape[:2]
    k = float(resolution) / float(min(h_raw, w_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    h, w = int(np.round(float(h_raw) * k)), int(np.round(float(w_raw) * k))
    if h < 1 or w < 1:
        raise ConfigError(f"resolution {resolution} makes the {w_raw}x{h_raw} image {w}x{h}; use a larger one")
    img = cv2.resize(img, (w, h), interpolation=interpolation)
    padded = np.pad(img, [[0, _pad64(h)], [0, _pad64(w)], [0, 0]], mode="edge")

    def remove_pad(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[:h, :w])

    return np.ascontiguousarray(padded), remove_pad


def resize_short_side(img: np.ndarray, resolution: int) -> np.ndarray:
    """``resize_with_pad`` without the padding: the image scaled so its short side is ``resolution``."""
    padded, remove_pad = resize_with_pad(img, resolution)
    return remove_pad(padded)
