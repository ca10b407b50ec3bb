"""Running an upscaler model on a PIL image: tiled with overlap and feathered blending, then Lanczos to the target.

Tiles of ``tile`` input pixels overlap by at least ``overlap``; on its inner edges each tile's output gets zero
weight over the first quarter of the overlap (a margin whose receptive field is cut by the tile border, dropped as
Real-ESRGAN's ``tile_pad`` is) and a linear ramp over the middle half, so neighbouring tiles cross-fade instead of
meeting at a seam. Tile starts are multiples of the model's grid (the
pixel-unshuffle factor of Real-ESRGAN x2 / x1, SwinIR's window size), so tiles see the same cells as a whole-image
run. As AUTOMATIC1111's upscalers do, the model runs again while the image is smaller than the target (at most
three passes) and the result is Lanczos-resized to the exact target size.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from sumie.errors import ConfigError, SumieError
from sumie.models.upscalers.detect import Upscaler

if TYPE_CHECKING:
    from sumie.checkpoints.manager import ModelManager

__all__ = ["A1111_NAMES", "MAX_PASSES", "model_grid", "resolve_upscaler", "run_tiled", "tile_spans", "upscale"]

MAX_PASSES = 3  # A1111: an upscaler runs at most three times to reach the target
# A1111's built-in Real-ESRGAN upscaler names -> the file stems it downloads into models/RealESRGAN
A1111_NAMES = {"R-ESRGAN 4x+": "RealESRGAN_x4plus", "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
               "R-ESRGAN 2x+": "RealESRGAN_x2plus", "R-ESRGAN General 4xV3": "realesr-general-x4v3",
               "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3", "R-ESRGAN AnimeVideo": "realesr-animevideov3"}


def resolve_upscaler(manager: ModelManager, name: str | os.PathLike[str]) -> Path:
    """An upscaler's file: a path, a name in the manager's upscaler folders, or an A1111 built-in name's file."""
    text = os.fspath(name)
    try:
        return manager.resolve("upscaler", text)
    except SumieError as e:
        alias = A1111_NAMES.get(text.strip())
        if alias is not None and manager.folders is not None:
            try:
                return manager.resolve("upscaler", alias)
            except SumieError:
                pass
        if manager.folders is None:
            raise ConfigError(f"upscaler {text!r}: no such file; give the path to an upscaler model (.pth / "
                              ".safetensors) or a models folder (--models-dir) whose ESRGAN / RealESRGAN / SwinIR / "
                              "upscale_models folder holds it") from None
        raise ConfigError(f"upscaler {text!r}: {e}") from None


def tile_spans(n: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """[start, end) spans covering ``0..n``: starts are multiples of ``align``, neighbours overlap >= ``overlap``."""
    if tile <= 0 or n <= tile:
        return [(0, n)]
    stride = max(align, (tile - overlap) // align * align)
    last = (n - tile) // align * align
    spans = [(s, s + tile) for s in range(0, last, stride)]
    spans.append((last, n))
    return spans


def _ramp(start: int, end: int, n: int, overlap: int, device: torch.device) -> Tensor:
    """[end - start] weights along one axis of a tile: on each edge inside ``0..n``, zero for the first quarter of
    the overlap (the discarded margin, where the tile's receptive field is cut), then a linear ramp over its middle
    half to 1; neighbours' ramps sum to 1 where they overlap by exactly ``overlap``."""
    i = torch.arange(end - start, device=device, dtype=torch.float32)
    w = torch.ones_like(i)
    if overlap > 0:
        margin = overlap // 4
        length = overlap - 2 * margin
        if start > 0:
            w = torch.minimum(w, ((i - margin + 0.5) / length).clamp(0, 1))
        if end < n:
            w = torch.minimum(w, ((end - start - 1 - i - margin + 0.5) / length).clamp(0, 1))
    return w


def run_tiled(fn: Callable[[Tensor], Tensor], x: Tensor, scale: float, tile: int = 512, overlap: int = 32,
              align: int = 1) -> Tensor:
    """``fn`` ([B, C, h, w] -> [B, C', h * scale, w * scale]) over ``x`` [B, C, H, W] in overlapping tiles, blended.

    ``scale`` may be a fraction (a VAE encoder: 1/8) when ``align`` makes every tile start and size whole in the
    output; tiles are blended in the output's space with :func:`_ramp` weights.
    """
    _, _, h, w = x.shape
    ys, xs = tile_spans(h, tile, overlap, align), tile_spans(w, tile, overlap, align)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x).float()

    def o(v: int) -> int:
        return round(v * scale)

    out: Tensor | None = None
    total = torch.zeros(1, 1, o(h), o(w), device=x.device)
    for y0, y1 in ys:
        wy = _ramp(o(y0), o(y1), o(h), o(overlap), x.device)
        for x0, x1 in xs:
            piece = fn(x[:, :, y0:y1, x0:x1]).float()
            if out is None:
                out = torch.zeros(piece.shape[0], piece.shape[1], o(h), o(w), device=x.device)
            wx = _ramp(o(x0), o(x1), o(w), o(overlap), x.device)
            win = wy[:, None] * wx[None, :]
            out[:, :, o(y0) : o(y1), o(x0) : o(x1)] += piece * win
            total[:, :, o(y0) : o(y1), o(x0) : o(x1)] += win
    assert out is not None
    return out / total


def model_grid(module: nn.Module) -> int:
    """The input grid a model works on: pixel-unshuffle factor or window size (1 for plain convs)."""
    return int(getattr(module, "window_size", None) or getattr(module, "unshuffle", 1))


def _to_tensor(img: Image.Image, channels: int) -> Tensor:
    arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]


def _to_image(x: Tensor) -> Image.Image:
    arr = (x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, "L" if arr.shape[2] == 1 else "RGB")


def _check(tile: int, overlap: int) -> None:
    if tile < 0:
        raise ConfigError(f"upscaler tile size must be >= 0 (0 = no tiling), got {tile}")
    if overlap < 0 or (tile and overlap * 2 >= tile):
        raise ConfigError(f"upscaler tile overlap must be >= 0 and under half the tile size ({tile}), got {overlap}")


def upscale(model: Upscaler | nn.Module, image: Image.Image, scale: float | None = None, tile: int = 512,
            overlap: int = 32, *, size: tuple[int, int] | None = None, device: torch.device | str | None = None,
            dtype: torch.dtype | None = None) -> Image.Image:
    """``image`` upscaled by ``scale`` (None: the model's own) or to ``size`` = (width, height) with the model.

    ``tile``: tile size in input pixels (0: the whole image at once); ``overlap``: input pixels shared by
    neighbouring tiles. ``device`` / ``dtype``: where to run (default: the model's; otherwise a moved copy runs).
    The model always runs once, then again while the image is smaller than the target (A1111 runs none when the
    target is not larger). An alpha channel is resized with Lanczos. Returns an RGB (or L / RGBA) image of the
    target size.
    """
    up = model if isinstance(model, Upscaler) else None
    module = up.module if up is not None else model
    assert isinstance(module, nn.Module)
    model_scale = int(up.scale if up is not None else getattr(module, "scale", 0))
    if model_scale < 1:
        raise ConfigError("the upscaler module has no integer .scale; load it with sumie.models.upscalers")
    _check(tile, overlap)
    w, h = image.size
    if size is not None:
        tw, th = int(size[0]), int(size[1])
    elif scale is not None:
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"upscale factor must be a positive number, got {scale}")
        tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    else:
        tw, th = w * model_scale, h * model_scale
    if tw < 1 or th < 1:
        raise ConfigError(f"upscale target {tw}x{th} is empty")
    param = next(module.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    if param.device != device or param.dtype != dtype:  # a copy: the caller's (maybe shared) model stays put
        module = copy.deepcopy(module).to(device=device, dtype=dtype)
    channels = int(getattr(module, "in_ch", 3))
    alpha = image.getchannel("A") if "A" in image.getbands() else None
    align = model_grid(module)
    out = image
    with torch.inference_mode():
        for n in range(MAX_PASSES):  # each pass ends in a uint8 image, as A1111's passes do
            if n and (out.width >= tw and out.height >= th):
                break
            x = _to_tensor(out, channels).to(device)
            out = _to_image(run_tiled(lambda t: module(t.to(dtype)), x, model_scale, tile, overlap, align))
            if model_scale == 1:
                break
    if out.size != (tw, th):
        out = out.resize((tw, th), Image.Resampling.LANCZOS)
    if alpha is not None and out.mode == "RGB":
        out.putalpha(alpha.resize((tw, th), Image.Resampling.LANCZOS))
    return out
