"""Tiled VAE decode / encode for big images, and the memory plan that decides when to tile.

Method: ComfyUI's ``VAEDecodeTiled`` / ``VAEEncodeTiled`` (``comfy/sd.py`` ``decode_tiled_`` / ``encode_tiled_``
over ``comfy/utils.py`` ``tiled_scale``: tiles with overlap, feathered together), with one change, and not A1111's
"Tiled VAE" extension (which synchronises GroupNorm statistics across tiles). The global part of each network (the
mid block with its attention, at latent size, where memory is small) runs once on the whole latent-size map; only
the convolutional full-resolution levels run in tiles, with :func:`sumie.pipelines.upscale.run_tiled`'s spans and
weights:

* decode: the mid block's output in latent tiles of ``tile / f`` latent pixels overlapping by ``overlap / f``
  (f: the VAE's downscale) through the up levels, blended in pixel space (weight zero over the first quarter of the
  overlap, whose receptive field is cut by the tile border, then a linear ramp over its middle half);
* encode: pixel tiles starting on multiples of f through the down levels, blended in latent space the same way, then
  the mid block and output layers on the whole map.

A tile's GroupNorm layers see only the tile, so a tiled result is not the whole-image one: the difference is
measured in ``tests/test_vae_tiling.py`` (README "Big images"). ``mode="auto"`` tiles only when the whole pass would
not fit: :func:`decode_bytes` / :func:`encode_bytes` estimate the activation memory of the full-resolution levels
(calibrated on the SD VAE in float32 on a CPU at 1024x1024: decode measured 4.06 GB peak growth, estimated
4.75 GB; encode 3.25 GB, estimated 3.56 GB), compared with the free memory (CUDA: ``torch.cuda.mem_get_info``
plus the allocator's cached free blocks; CPU: ``MemAvailable`` of ``/proc/meminfo``) or a given budget. When not
even one tile fits, :class:`~sumie.errors.ConfigError` says how much memory the job needs, before anything runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from sumie.configs import VAEConfig
from sumie.errors import ConfigError
from sumie.models.vae import AutoencoderKL, DiagonalGaussian
from sumie.pipelines.upscale import run_tiled

__all__ = ["TilingMode", "VAETiling", "decode_bytes", "decode_tiled", "encode_bytes", "encode_tiled", "free_memory",
           "plan_tiles", "request_tiling"]

TilingMode = Literal["auto", "on", "off"]
_MARGIN = 1.1  # headroom over the estimate (allocator rounding, convolution workspaces)
_GIB = 1024**3


@dataclass(frozen=True)
class VAETiling:
    """When and how the VAE tiles: ``mode`` auto (only when the whole image would not fit) / on / off; ``tile`` and
    ``overlap`` in image pixels (ComfyUI's defaults 512 / 64); ``budget``: bytes a pass may use (None: the free
    memory of the device)."""

    mode: TilingMode = "auto"
    tile: int = 512
    overlap: int = 64
    budget: int | None = None

    def check(self, factor: int = 8) -> None:
        """ConfigError unless the mode is known and tile / overlap are usable for a VAE of downscale ``factor``."""
        if self.mode not in ("auto", "on", "off"):
            raise ConfigError(f"VAE tiling {self.mode!r}: use auto, on or off")
        if self.tile < 4 * factor or self.tile % factor:
            raise ConfigError(f"VAE tile size {self.tile}: use a multiple of {factor} of at least {4 * factor} pixels")
        if self.overlap < 0 or self.overlap % factor or 2 * self.overlap >= self.tile:
            raise ConfigError(f"VAE tile overlap {self.overlap}: use a multiple of {factor} under half the tile size "
                              f"({self.tile})")
        if self.budget is not None and self.budget <= 0:
            raise ConfigError(f"VAE memory budget {self.budget}: give a positive number of bytes")


def request_tiling(mode: TilingMode, tile: int, factor: int, budget: int | None = None) -> VAETiling:
    """The tiling of a request (``GenerationParams.vae_tiling`` / ``vae_tile_size``): overlap an eighth of the tile
    (ComfyUI's 64 for 512), on the VAE's grid of ``factor`` pixels; checked."""
    tiling = VAETiling(mode, tile, tile // 8 // factor * factor, budget)
    tiling.check(factor)
    return tiling


def _bytes_per(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def decode_bytes(cfg: VAEConfig, height: int, width: int, dtype: torch.dtype) -> int:
    """Estimated peak bytes of decoding to a height x width image: the last upsample and the first full-resolution
    ResnetBlock hold ~4 maps of the widest full-resolution width (``ch * ch_mult[1]``), plus the float32 output."""
    c = cfg.ch * cfg.ch_mult[min(1, len(cfg.ch_mult) - 1)]
    return int(_MARGIN * height * width * (4 * c * _bytes_per(dtype) + 2 * cfg.out_channels * 4))


def encode_bytes(cfg: VAEConfig, height: int, width: int, dtype: torch.dtype) -> int:
    """Estimated peak bytes of encoding a height x width image: ~6 maps of ``ch`` channels at full resolution."""
    return int(_MARGIN * height * width * (6 * cfg.ch + cfg.in_channels) * _bytes_per(dtype))


def free_memory(device: torch.device) -> int:
    """Bytes a pass may still allocate: CUDA free memory plus the caching allocator's free blocks; elsewhere the
    system's ``MemAvailable`` (``os.sysconf`` when /proc/meminfo is missing)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _gib(n: int) -> str:
    return f"{n / _GIB:.2f} GiB"


def plan_tiles(kind: Literal["decode", "encode"], vae: AutoencoderKL, height: int, width: int,
               tiling: VAETiling) -> int | None:
    """The tile size in pixels for a ``kind`` pass over a height x width image, or None for a whole-image pass.

    ``off``: None; ``on``: ``tiling.tile``; ``auto``: None when the whole pass fits the budget, else the tile.
    Raises ConfigError, naming the memory needed, when the pass does not fit even tiled (tiled modes) or whole
    (``off`` with an explicit budget).
    """
    tiling.check(vae.downscale)
    device = next(vae.parameters()).device
    estimate = decode_bytes if kind == "decode" else encode_bytes
    whole = estimate(vae.config, height, width, vae.dtype)
    budget = tiling.budget if tiling.budget is not None else free_memory(device)
    if tiling.mode == "off":
        if tiling.budget is not None and whole > budget:
            raise ConfigError(f"VAE {kind} of a {width}x{height} image needs about {_gib(whole)}; the budget is "
                              f"{_gib(budget)}: turn VAE tiling on (--vae-tiling auto) or make the image smaller")
        return None
    if tiling.mode == "auto" and whole <= budget:
        return None
    span = tiling.tile + vae.downscale  # the last tile of a row may be up to one grid cell longer
    tile_h, tile_w = min(height, span), min(width, span)
    # the tile's own activations, the global part at latent size, the float32 accumulators of the blended result
    cfg, latent_px = vae.config, (height // vae.downscale) * (width // vae.downscale)
    top = cfg.ch * cfg.ch_mult[-1]  # the global part (mid block) runs whole at latent size: ~4 maps of ``top``
    buffers = 4 * top * latent_px * _bytes_per(vae.dtype)
    if kind == "decode":  # float32 image [3] and weights [1]
        buffers += 4 * height * width * (cfg.out_channels + 1)
    else:  # float32 features [top] and weights [1] at latent size
        buffers += 4 * latent_px * (top + 1)
    needed = estimate(vae.config, tile_h, tile_w, vae.dtype) + buffers
    if needed > budget:
        raise ConfigError(f"VAE {kind} of a {width}x{height} image needs about {_gib(whole)} whole and "
                          f"{_gib(needed)} in {tiling.tile}-pixel tiles; {_gib(budget)} is free on {device}: use a "
                          "smaller VAE tile size (--vae-tile-size), a smaller image, or another device")
    return tiling.tile


def decode_tiled(vae: AutoencoderKL, z: Tensor, tile: int, overlap: int) -> Tensor:
    """Unscaled latents [B, C, h, w] -> images [B, 3, f*h, f*w] float32: the decoder's global part (conv_in, mid
    block with attention) on the whole latent, its up levels in latent tiles of ``tile / f`` (pixels ``tile``,
    overlap ``overlap``) blended in pixel space."""
    f, dec = vae.downscale, vae.decoder
    h = dec.head(vae.post_quant_conv(z.to(vae.dtype)))
    return run_tiled(dec.upsample, h, f, tile // f, overlap // f)


def encode_tiled(vae: AutoencoderKL, x: Tensor, tile: int, overlap: int) -> DiagonalGaussian:
    """Images [B, 3, H, W] -> posterior over latents [B, C, H/f, W/f]: the encoder's down levels in pixel tiles
    (starts on multiples of f) blended in latent space, then its global part (mid block with attention, output) on
    the whole latent-size map."""
    f, enc = vae.downscale, vae.encoder
    h = run_tiled(lambda t: enc.features(t.to(vae.dtype)), x, 1 / f, tile, overlap, f)
    return DiagonalGaussian(vae.quant_conv(enc.head(h.to(vae.dtype))))
