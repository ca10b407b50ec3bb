"""Content shuffle (the shuffle ControlNet's input): the extension's ``ContentShuffleDetector`` with
``make_noise_disk``, its numpy random draws taken from a seeded generator instead of numpy's global state."""

from __future__ import annotations

import cv2
import numpy as np

from sumie.errors import ConfigError
from sumie.preprocess import MAX_SEED
from sumie.preprocess.common import resize_short_side


def _noise_disk(rng: np.random.RandomState, h: int, w: int, f: int) -> np.ndarray:
    """``make_noise_disk(H, W, 1, F)``: uniform noise on a (H // F + 2) x (W // F + 2) grid, cubic-upsampled to
    (H + 2F) x (W + 2F), cropped by F on each side, min-max normalised to [0, 1] -> float64 [h, w]."""
    noise = rng.uniform(low=0, high=1, size=((h // f) + 2, (w // f) + 2, 1))
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)
    noise = noise[f:f + h, f:f + w]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return noise


def shuffle_flow(h: int, w: int, seed: int, f: int = 256) -> np.ndarray:
    """The remap field of ``ContentShuffleDetector``: float32 [h, w, 2], x = disk * (w - 1) drawn first, y = disk *
    (h - 1) second, from ``np.random.RandomState(seed)`` (the same draws as ``np.random.seed(seed)``)."""
    if not 0 <= int(seed) <= MAX_SEED:
        raise ConfigError(f"shuffle: the seed must be a number from 0 to {MAX_SEED}, got {seed}")
    rng = np.random.RandomState(int(seed))
    x = _noise_disk(rng, h, w, f) * float(w - 1)
    y = _noise_disk(rng, h, w, f) * float(h - 1)
    return np.stack([x, y], axis=2).astype(np.float32)


def shuffle(img: np.ndarray, *, resolution: int = 512, seed: int = 0) -> np.ndarray:
    """``PreprocessorShuffle``: resized (``resize_image_with_pad``, pad removed; the extension fixes the resolution
    at 512), then ``cv2.remap(img, flow, INTER_LINEAR)`` with :func:`shuffle_flow` (F = 256).

    The extension seeds numpy with ``(seed + subseed) & 0xFFFFFFFF`` of the A1111 request (``subseed`` -1 counts
    as the seed), so ``seed=(2 * s) & 0xFFFFFFFF`` reproduces an A1111 image of seed ``s`` without a subseed.
    """
    img = resize_short_side(img, resolution)
    flow = shuffle_flow(img.shape[0], img.shape[1], seed)
    return cv2.remap(img, flow, None, cv2.INTER_LINEAR)
