"""Line art and scribbles from drawings: ``threshold``, ``scribble_xdog``, ``invert`` and ``lineart_standard``, as
the extension's ``scripts/preprocessor/legacy/processor.py`` and ``model_free_preprocessors.py`` define them."""

from __future__ import annotations

import cv2
import numpy as np

from sumie.preprocess.common import hwc3, resize_with_pad


def threshold(img: np.ndarray, *, resolution: int = 512, threshold: int = 127) -> np.ndarray:
    """``processor.threshold``: 255 where the smallest of R, G, B is above ``threshold``, else 0 (after
    ``resize_image_with_pad``) -> uint8 [h, w]."""
    padded, remove_pad = resize_with_pad(img, resolution)
    out = np.zeros(padded.shape[:2], np.uint8)
    out[padded.min(axis=2) > threshold] = 255
    return remove_pad(out)


def scribble_xdog(img: np.ndarray, *, resolution: int = 512, threshold: int = 32) -> np.ndarray:
    """``PreprocessorScribbleXdog``: difference of Gaussians (sigma 0.5 and 5, float32), ``dog = 255 - min_c(g5 -
    g0.5)`` clipped to uint8; white where ``2 * (255 - dog) > threshold`` -> uint8 [h, w].

    The extension computes ``2 * (255 - dog)`` in uint8, so it wraps modulo 256: the strongest responses
    (``255 - dog >= 128``) come out small and are dropped unless they wrap above the threshold. Kept as is.
    """
    padded, remove_pad = resize_with_pad(img, resolution)
    g1 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    out = np.zeros(padded.shape[:2], np.uint8)
    out[(2 * (255 - dog.astype(np.int32))) % 256 > threshold] = 255  # uint8 arithmetic, as the extension
    return remove_pad(out)


def invert(img: np.ndarray) -> np.ndarray:
    """``PreprocessorInvert`` ("invert (from white bg & black line)"): ``255 - HWC3(img)`` at the image's own size
    (the extension hides the resolution slider)."""
    return 255 - hwc3(img)


def lineart_standard(img: np.ndarray, *, resolution: int = 512) -> np.ndarray:
    """``processor.lineart_standard`` ("from white bg & black line"): ``min_c(blur6(x) - x)`` clipped at 0, divided by
    ``max(16, median of the values above 8)`` (16 when none is), times 127 -> uint8 [h, w]."""
    padded, remove_pad = resize_with_pad(img, resolution)
    x = padded.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    # max(16, nan) is 16 in Python: the extension's value (with a RuntimeWarning) when no pixel is above 8
    intensity /= max(16.0, float(np.median(strong))) if strong.size else 16.0
    intensity *= 127
    return remove_pad(intensity.clip(0, 255).astype(np.uint8))
