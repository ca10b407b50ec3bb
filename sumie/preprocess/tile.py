"""For the tile ControlNet: ``tile_resample`` and ``blur_gaussian`` (the extension's ``processor.tile_resample`` and
``PreprocessorBlurGaussian``)."""

from __future__ import annotations

import cv2
import numpy as np

from sumie.errors import ConfigError
from sumie.preprocess.common import hwc3, resize_short_side


def tile_resample(img: np.ndarray, *, rate: float = 1.0) -> np.ndarray:
    """``processor.tile_resample``: the image unchanged when ``rate < 1.1``, else shrunk to ``int(H / rate)`` x
    ``int(W / rate)`` with INTER_AREA (the unit's resize brings it back up to the generation size)."""
    img = hwc3(img)
    if float(rate) <= 0:
        raise ConfigError(f"tile_resample: the down-sampling rate must be positive, got {rate}")
    if float(rate) < 1.1:
        return img
    h, w = int(float(img.shape[0]) / float(rate)), int(float(img.shape[1]) / float(rate))
    if h < 1 or w < 1:
        raise ConfigError(f"tile_resample: rate {rate} shrinks the {img.shape[1]}x{img.shape[0]} image to nothing")
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def blur_gaussian(img: np.ndarray, *, resolution: int = 512, sigma: float = 9.0) -> np.ndarray:
    """``PreprocessorBlurGaussian``: ``resize_image_with_pad`` (pad removed), then ``cv2.GaussianBlur((0, 0),
    sigma)`` on uint8 RGB."""
    if float(sigma) <= 0:
        raise ConfigError(f"blur_gaussian: sigma must be positive, got {sigma}")
    return cv2.GaussianBlur(resize_short_side(img, resolution), (0, 0), float(sigma))
