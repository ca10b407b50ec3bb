"""Hires fix (AUTOMATIC1111 1.10 ``StableDiffusionProcessingTxt2Img.sample_hr_pass``): plan and upscaling helpers.

The first pass runs at (width, height); its latents are upscaled to the target and a second img2img pass refines
them. The target is ``int(width * scale) x int(height * scale)``, or an explicit ``resize_x`` / ``resize_y`` (one of
them 0: keep the aspect ratio; both set: fill the target and crop the overflow of the latent, centred, in whole
latent pixels: A1111's ``truncate_x/y``). Upscalers:

* ``latent`` (A1111 "Latent"): ``F.interpolate(latent, size=(target_h // 8, target_w // 8), mode="bilinear",
  antialias=False)``;
* ``lanczos``: decode, truncate to uint8 as A1111 does, PIL Lanczos resize, encode again;
* any other name: an upscaler model (ESRGAN, Real-ESRGAN, SwinIR; a name in the upscaler folders or a path), as
  A1111 runs non-latent upscalers: decode, truncate to uint8, upscale with the model (tiled, repeated while smaller
  than the target), Lanczos to the target, encode.

The second pass uses A1111's fix-steps rule (``img2img_sigmas(..., fix_steps=True)``: the last ``steps`` steps of an
``int(steps / min(strength, 0.999))``-step schedule), fresh noise at the new size from the same seeds (a new
``ImageRNG``), and prompts scheduled with ``hires_steps``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from sumie.errors import ConfigError
from sumie.pipelines.params import HiresParams

__all__ = ["PIXEL_UPSCALERS", "HiresPlan", "plan_hires", "truncate_latent", "upscale_latent"]

PIXEL_UPSCALERS = ("latent", "lanczos")  # built in; any other name is an upscaler model
LATENT_MODE = {"mode": "bilinear", "antialias": False}  # A1111's "Latent" upscaler


@dataclass(frozen=True)
class HiresPlan:
    """Where the second pass runs: upscale target (A1111 ``hr_upscale_to_x/y``) and latent crop (``truncate_x/y``)."""

    width: int  # first pass
    height: int
    upscale_x: int
    upscale_y: int
    truncate_x: int = 0  # latent pixels cropped in total (half on each side, the odd one at the end)
    truncate_y: int = 0
    steps: int = 0
    strength: float = 0.7
    upscaler: str = "latent"
    factor: int = 8  # pixels per latent pixel (the VAE's downscale; A1111's opt_f)

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the second pass's latent after the crop."""
        f = self.factor
        return self.upscale_y // f - self.truncate_y, self.upscale_x // f - self.truncate_x

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the final image."""
        h, w = self.latent_size
        return w * self.factor, h * self.factor


def plan_hires(width: int, height: int, hires: HiresParams, steps: int, factor: int = 8) -> HiresPlan:
    """The second pass of a hires-fix request (A1111 ``calculate_target_resolution``); ``factor``: VAE downscale."""
    if not isinstance(hires.upscaler, str | os.PathLike) or not str(hires.upscaler).strip():
        raise ConfigError(f"hires upscaler {hires.upscaler!r} is empty; use latent, lanczos or an upscaler model name")
    if not 0.0 < hires.denoising_strength <= 1.0:
        raise ConfigError(f"hires denoising strength must be in (0, 1], got {hires.denoising_strength}")
    if hires.steps < 0:
        raise ConfigError(f"hires steps must be >= 0 (0 = same as the first pass), got {hires.steps}")
    rx, ry = int(hires.resize_x), int(hires.resize_y)
    if rx < 0 or ry < 0:
        raise ConfigError(f"hires resize must be >= 0, got {rx}x{ry}")
    tx = ty = 0
    if rx == 0 and ry == 0:
        if hires.scale <= 0:
            raise ConfigError(f"hires scale must be > 0, got {hires.scale}")
        ux, uy = int(width * hires.scale), int(height * hires.scale)
    elif ry == 0:
        ux, uy = rx, rx * height // width
    elif rx == 0:
        ux, uy = ry * width // height, ry
    else:
        if width / height < rx / ry:
            ux, uy = rx, rx * height // width
        else:
            ux, uy = ry * width // height, ry
        tx, ty = (ux - rx) // factor, (uy - ry) // factor
    if ux < factor or uy < factor:
        raise ConfigError(f"hires target {ux}x{uy} is too small; use a scale or resize of at least {factor} pixels")
    return HiresPlan(width, height, ux, uy, tx, ty, hires.steps or steps, float(hires.denoising_strength),
                     str(hires.upscaler), factor)


def upscale_latent(latent: Tensor, plan: HiresPlan) -> Tensor:
    """A1111 "Latent": bilinear [B, C, h, w] -> [B, C, upscale_y // f, upscale_x // f], no antialiasing."""
    size = (plan.upscale_y // plan.factor, plan.upscale_x // plan.factor)
    return F.interpolate(latent, size=size, **LATENT_MODE)  # type: ignore[arg-type]


def truncate_latent(latent: Tensor, plan: HiresPlan) -> Tensor:
    """Crop the overflow of an explicit resize, centred (A1111 ``samples[:, :, ty//2 : h-(ty+1)//2, ...]``)."""
    tx, ty = plan.truncate_x, plan.truncate_y
    h, w = latent.shape[-2:]
    return latent[..., ty // 2 : h - (ty + 1) // 2, tx // 2 : w - (tx + 1) // 2]
