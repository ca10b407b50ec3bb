"""ComfyUI's resizing (``comfy.utils.common_upscale``, ``lanczos``, ``resize_to_batch_size``) and its image to
uint8 conversion (``np.clip(255. * x, 0, 255).astype(np.uint8)``: truncation)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sumie.errors import ConfigError


def to_uint8(image: Tensor) -> np.ndarray:
    """[H, W, C] in [0, 1] -> uint8, ``np.clip(255. * x, 0, 255).astype(np.uint8)`` (truncation)."""
    return np.clip(255.0 * image.detach().float().cpu().numpy(), 0, 255).astype(np.uint8)


def _lanczos(samples: Tensor, width: int, height: int) -> Tensor:
    """[B, C, H, W] resized per image with PIL's Lanczos through uint8 (ComfyUI ``comfy.utils.lanczos``)."""
    out = []
    for img in samples:
        arr = to_uint8(img.movedim(0, -1))
        pil = Image.fromarray(arr if arr.shape[-1] != 1 else arr[..., 0])
        pil = pil.resize((width, height), resample=Image.Resampling.LANCZOS)
        t = torch.from_numpy(np.array(pil).astype(np.float32) / 255.0)
        out.append(t.movedim(-1, 0) if t.ndim == 3 else t[None])
    return torch.stack(out).to(samples)


def common_upscale(samples: Tensor, width: int, height: int, method: str, crop: str) -> Tensor:
    """[B, C, H, W] -> [B, C, height, width]: optional centre crop to the new aspect, then the resize method."""
    if crop == "center":
        old_w, old_h = samples.shape[-1], samples.shape[-2]
        old_aspect, new_aspect = old_w / old_h, width / height
        x = y = 0
        if old_aspect > new_aspect:
            x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
        elif old_aspect < new_aspect:
            y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
        samples = samples.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)
    if method == "lanczos":
        return _lanczos(samples, width, height)
    if method == "bislerp":
        raise ConfigError("the bislerp upscale method is not available in Sumie; use bilinear, bicubic, area or "
                          "nearest-exact")
    return F.interpolate(samples, size=(height, width), mode=method)


def resize_to_batch_size(t: Tensor, batch: int) -> Tensor:
    """[N, ...] -> [batch, ...] picking evenly spread rows (ComfyUI ``resize_to_batch_size``)."""
    n = t.shape[0]
    if n == batch:
        return t
    if batch <= 1:
        return t[:batch]
    if batch < n:
        scale = (n - 1) / (batch - 1)
        idx = [min(round(i * scale), n - 1) for i in range(batch)]
    else:
        scale = n / batch
        idx = [min(math.floor((i + 0.5) * scale), n - 1) for i in range(batch)]
    return t[idx]
