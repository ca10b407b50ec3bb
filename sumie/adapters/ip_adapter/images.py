"""CLIP image preprocessing exactly as transformers' ``CLIPImageProcessor`` (its PIL backend) computes it.

RGB (transparency composited onto white), shortest side resized to 224 with PIL's bicubic filter (the long side
``int(224 * long / short)``, truncated), centre crop 224 x 224 (top / left offsets rounded down), values times
1/255 in float64 then float32, then ``(x - mean) / std`` in float32 with OpenAI's mean and std.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sumie.errors import ConfigError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "clip_preprocess", "to_rgb"]


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto a white background (transformers ``convert_to_rgb``)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _one(image: Image.Image, size: int) -> np.ndarray:
    """One PIL image -> float32 [3, size, size], normalised."""
    im = to_rgb(image)
    w, h = im.size
    if min(w, h) < 1:
        raise ConfigError(f"reference image of size {w}x{h} is empty")
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if new_long < size:
        raise ConfigError(f"reference image of size {w}x{h} cannot be centre-cropped to {size}x{size}")
    arr = np.asarray(im.resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    arr = arr[top : top + size, left : left + size].transpose(2, 0, 1)
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(OPENAI_CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.array(OPENAI_CLIP_STD, dtype=np.float32)[:, None, None]
    return (x - mean) / std


def clip_preprocess(images: Sequence[Image.Image], size: int = 224) -> Tensor:
    """PIL images (any size, any mode) -> pixel values [N, 3, size, size] float32 for the CLIP image encoder."""
    if not images:
        raise ConfigError("an IP-Adapter unit needs at least one reference image")
    return torch.from_numpy(np.stack([_one(im, size) for im in images]))
