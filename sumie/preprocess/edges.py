"""Edge maps: ``canny`` (the extension's ``PreprocessorCanny``) and ``softedge_gradient`` (Sumie's own soft edge from
image gradients; HED / PiDiNet / TEED soft edges need network weights)."""

from __future__ import annotations

import cv2
import numpy as np

from sumie.errors import ConfigError
from sumie.preprocess.common import resize_with_pad


def canny(img: np.ndarray, *, resolution: int = 512, low: int = 100, high: int = 200) -> np.ndarray:
    """``PreprocessorCanny``: ``resize_image_with_pad`` to ``resolution``, ``cv2.Canny(low, high)`` on the padded RGB
    image, pad removed -> uint8 [h, w] edges (255 on an edge)."""
    if not 1 <= int(low) <= int(high):
        raise ConfigError(f"canny: the low threshold ({low}) must be at least 1 and at most the high one ({high})")
    padded, remove_pad = resize_with_pad(img, resolution)
    return remove_pad(cv2.Canny(padded, int(low), int(high)))


def softedge_gradient(img: np.ndarray, *, resolution: int = 512, sigma: float = 1.0) -> np.ndarray:
    """Soft edges without weights: Gaussian blur (``sigma``; 0 = none), 3x3 Sobel gradient magnitude per channel,
    the largest over R, G, B, divided by its maximum -> uint8 [h, w] in 0..255 (white edges on black, the look of
    the HED / PiDiNet soft-edge maps; not their values)."""
    if float(sigma) < 0:
        raise ConfigError(f"softedge_gradient: sigma must be >= 0, got {sigma}")
    padded, remove_pad = resize_with_pad(img, resolution)
    x = padded.astype(np.float32)
    if float(sigma) > 0:
        x = cv2.GaussianBlur(x, (0, 0), float(sigma))
    gx = cv2.Sobel(x, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(x, cv2.CV_32F, 0, 1, ksize=3)
    magnitude = remove_pad(np.sqrt(gx * gx + gy * gy).max(axis=2))
    peak = float(magnitude.max())
    if peak <= 1e-5:
        return np.zeros(magnitude.shape, np.uint8)
    return (magnitude * (255.0 / peak)).round().clip(0, 255).astype(np.uint8)
