"""Colour maps: ``color`` (the T2I-Adapter colour grid, ``annotator/color``) and ``recolor_luminance`` /
``recolor_intensity`` (the recolor ControlNet's inputs, ``processor.recolor_*``)."""

from __future__ import annotations

import cv2
import numpy as np

from sumie.errors import ConfigError
from sumie.preprocess.common import hwc3

GRID = 64  # pixels per colour cell


def color(img: np.ndarray, *, resolution: int = 512) -> np.ndarray:
    """``annotator.color.apply_color``: shortest side resized to ``resolution`` (INTER_AREA, even when enlarging;
    the long side ``round(long / short * resolution)``), then INTER_CUBIC down to ``(w // 64, h // 64)`` cells and
    INTER_NEAREST back up to (w, h): a grid of flat colours, each the cubic sample at its cell's centre."""
    img = hwc3(img)
    h, w = img.shape[:2]
    if h < w:
        size = (int(round(w / h * resolution)), int(resolution))
    else:
        size = (int(resolution), int(round(h / w * resolution)))
    if min(size) < GRID:
        raise ConfigError(f"color: resolution {resolution} leaves less than one {GRID}-pixel cell; use >= {GRID}")
    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    cells = cv2.resize(img, (w // GRID, h // GRID), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(cells, (w, h), interpolation=cv2.INTER_NEAREST)


def _gamma(channel: np.ndarray, gamma: float) -> np.ndarray:
    """``(v / 255) ** gamma * 255`` clipped and truncated to uint8."""
    if float(gamma) <= 0:
        raise ConfigError(f"recolor: gamma must be positive, got {gamma}")
    out = (channel.astype(np.float32) / 255.0) ** float(gamma)
    return (out * 255.0).clip(0, 255).astype(np.uint8)


def recolor_luminance(img: np.ndarray, *, gamma: float = 1.0) -> np.ndarray:
    """``processor.recolor_luminance``: the L channel of ``cv2.COLOR_BGR2LAB`` applied to the RGB array (the
    extension's channel order, so R and B swap roles), gamma-corrected -> uint8 [H, W]."""
    return _gamma(cv2.cvtColor(hwc3(img), cv2.COLOR_BGR2LAB)[:, :, 0], gamma)


def recolor_intensity(img: np.ndarray, *, gamma: float = 1.0) -> np.ndarray:
    """``processor.recolor_intensity``: the V channel of ``cv2.COLOR_BGR2HSV`` (= max of R, G, B), gamma-corrected
    -> uint8 [H, W]."""
    return _gamma(cv2.cvtColor(hwc3(img), cv2.COLOR_BGR2HSV)[:, :, 2], gamma)
