"""The VAE at the edges of the pipeline: images -> scaled latents, latents -> images, and cheap previews.

* :func:`encode` is the one "image to scaled latent" of the engine (img2img, inpainting, the inpainting UNet's
  masked image, Lanczos hires fix): one image at a time, so a latent never depends on the batch it was in; the
  posterior mean (A1111 convention, deterministic) or a sample from each image's own generator (diffusers).
* :func:`decode` decodes one latent at a time (A1111 ``decode_latent_batch``) and checks the result: a half-precision
  VAE that overflows to NaN/inf is converted to float32 and the decode retried (A1111's automatic ``--no-half-vae``),
  with a warning; NaN in a float32 VAE is a :class:`~sumie.errors.NaNError`.
* both take a :class:`~sumie.pipelines.vae_tiling.VAETiling`: tiled passes for big images, automatic when the whole
  image would not fit in memory (:mod:`sumie.pipelines.vae_tiling`); ``mode="off"`` is the untiled pass exactly.
* :class:`Previewer` turns the sampler's current prediction into small RGB images: TAESD when loaded, else A1111's
  "Approx cheap" linear latent -> RGB factors for the SD and SDXL VAEs, else the full VAE.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from PIL import Image
from torch import Tensor

from sumie.configs import VAEConfig
from sumie.errors import ConfigError, NaNError
from sumie.memory import trim_heap
from sumie.models.taesd import TAESD
from sumie.models.vae import AutoencoderKL
from sumie.pipelines.images import to_image
from sumie.pipelines.vae_tiling import VAETiling, decode_tiled, encode_tiled, plan_tiles

PreviewMethod = Literal["auto", "taesd", "cheap", "vae"]
Warn = Callable[[str], None]

# A1111 1.10 ``sd_vae_approx.cheap_approximation``: scaled latent channels -> RGB in [-1, 1] (4 x 3).
CHEAP_FACTORS = {
    "sd": ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    "sdxl": ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
             (-0.3730, -0.2499, -0.2088)),
}
_SD_VAE = VAEConfig()

__all__ = ["CHEAP_FACTORS", "Previewer", "VAETiling", "cheap_factors", "check_taesd_decoder", "decode",
           "decode_images", "decode_taesd", "encode"]


def encode(vae: AutoencoderKL, x: Tensor, generators: Sequence[torch.Generator | None] | None = None,
           tiling: VAETiling | None = None) -> Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/f, W/f] float32, one image at a time.

    Without ``generators`` the posterior mean; with them, a sample drawn from ``generators[i]`` for image i.
    ``tiling``: when to encode in tiles (None: auto with the defaults).
    """
    device = next(vae.parameters()).device
    tiling = tiling or VAETiling()
    tile = plan_tiles("encode", vae, x.shape[-2], x.shape[-1], tiling)
    out = []
    for i in range(x.shape[0]):
        if tile is None:
            post = vae.encode(x[i : i + 1].to(device))
        else:
            post = encode_tiled(vae, x[i : i + 1].to(device), tile, tiling.overlap)
        z = post.mean if generators is None else post.sample(generators[i])
        out.append(vae.scale_latents(z).float())
    return torch.cat(out)


def _decode_one(vae: AutoencoderKL, latent: Tensor, tile: int | None = None, overlap: int = 0) -> Tensor:
    """One scaled latent [1, C, h, w] -> image [1, 3, H, W] float32, unchecked; in ``tile``-pixel tiles if given."""
    z = vae.unscale_latents(latent)
    return (vae.decode(z) if tile is None else decode_tiled(vae, z, tile, overlap)).float()


def decode(vae: AutoencoderKL, latent: Tensor, warn: Warn | None = None, tiling: VAETiling | None = None) -> Tensor:
    """Scaled latents [B, C, h, w] -> images [B, 3, H, W] float32 (unclamped), one at a time; NaN-checked.

    ``tiling``: when to decode in tiles (None: auto with the defaults).
    """
    if not bool(torch.isfinite(latent).all()):
        raise NaNError("the latent given to the VAE decoder holds NaN or infinite values: sampling diverged; "
                       "lower the CFG scale or run the UNet in float32 (--dtype fp32)")
    tiling = tiling or VAETiling()
    if latent.device.type == "cpu":
        trim_heap()  # the denoising loop's freed buffers go back to the kernel before the decoder's come (memory)
    f = vae.downscale
    tile = plan_tiles("decode", vae, latent.shape[-2] * f, latent.shape[-1] * f, tiling)
    out = []
    for i in range(latent.shape[0]):
        x = _decode_one(vae, latent[i : i + 1], tile, tiling.overlap)
        if not bool(torch.isfinite(x).all()):
            if vae.dtype == torch.float32:
                raise NaNError("VAE decode produced NaN or infinite values from a finite latent in float32: the VAE "
                               "weights are broken; load another VAE with --vae")
            was = str(vae.dtype).removeprefix("torch.")
            vae.to(torch.float32)  # for the rest of this engine's life, as A1111 does
            if warn is not None:
                warn(f"the VAE overflowed in {was} (NaN in the decoded image); it now runs in float32 and the image "
                     "was decoded again (A1111's automatic --no-half-vae; pass --vae-dtype fp32 to start that way)")
            x = _decode_one(vae, latent[i : i + 1], tile, tiling.overlap)
            if not bool(torch.isfinite(x).all()):
                raise NaNError("VAE decode produced NaN or infinite values even in float32: the VAE weights are "
                               "broken; load another VAE with --vae")
        out.append(x)
    return torch.cat(out)


def decode_images(vae: AutoencoderKL, latent: Tensor, rounding: Literal["truncate", "round"] = "truncate",
                  warn: Warn | None = None, tiling: VAETiling | None = None) -> list[Image.Image]:
    """Scaled latents -> RGB images (A1111 truncates to uint8, diffusers rounds)."""
    return to_image(decode(vae, latent, warn, tiling), rounding)


def check_taesd_decoder(taesd: TAESD | None, vae: AutoencoderKL) -> TAESD:
    """The TAESD that decodes this VAE's latents in its place, or a ConfigError saying why it cannot."""
    if taesd is None or taesd.decoder is None:
        raise ConfigError("TAESD decode needs a TAESD decoder: load one (--taesd FILE, sumie.load(..., taesd=FILE)) "
                          "or turn TAESD decode off")
    if vae.downscale != 8 or vae.config.z_channels != taesd.latent_channels:
        raise ConfigError(f"TAESD decodes {taesd.latent_channels}-channel latents 8x; this model's VAE has "
                          f"{vae.config.z_channels} channels at {vae.downscale}x: turn TAESD decode off")
    return taesd


def decode_taesd(taesd: TAESD, latent: Tensor) -> Tensor:
    """Scaled latents [B, C, h, w] -> images [B, 3, 8h, 8w] float32 with TAESD, one at a time; NaN-checked."""
    out = torch.cat([taesd.decode(latent[i : i + 1]).float() for i in range(latent.shape[0])])
    if not bool(torch.isfinite(out).all()):
        raise NaNError("TAESD decode produced NaN or infinite values: run it in float32 or use the full VAE")
    return out


def cheap_factors(vae: VAEConfig) -> Tensor | None:
    """A1111's "Approx cheap" factors [C, 3] for the standard SD (0.18215) or SDXL (0.13025) VAE, else None."""
    if vae.z_channels != 4 or vae.ch != _SD_VAE.ch or vae.ch_mult != _SD_VAE.ch_mult:
        return None  # another VAE (sumie-tiny's own): its latent space has other colours
    key = {0.18215: "sd", 0.13025: "sdxl"}.get(round(vae.scaling_factor, 5))
    return None if key is None else torch.tensor(CHEAP_FACTORS[key])


class Previewer:
    """Current prediction (scaled latents [B, C, h, w]) -> RGB images; see the module docstring for the methods."""

    def __init__(self, vae: AutoencoderKL, taesd: TAESD | None = None, method: PreviewMethod = "auto") -> None:
        factors = cheap_factors(vae.config)
        if method == "auto":
            method = "taesd" if taesd is not None else "cheap" if factors is not None else "vae"
        if method == "taesd" and taesd is None:
            raise ValueError("TAESD previews need a TAESD decoder")
        if method == "cheap" and factors is None:
            raise ValueError("this VAE has no cheap latent -> RGB factors; use the taesd or vae previews")
        self.vae, self.taesd, self.method, self.factors = vae, taesd, method, factors

    def __call__(self, latent: Tensor) -> list[Image.Image]:
        """[B, C, h, w] -> B images: latent size for "cheap", full size otherwise."""
        if self.method == "taesd":
            assert self.taesd is not None
            x = self.taesd.decode(latent.to(self.taesd.dtype)).float()
        elif self.method == "cheap":
            assert self.factors is not None
            x = torch.einsum("blxy,lr->brxy", latent.float(), self.factors.to(latent.device))
        else:
            x = torch.cat([_decode_one(self.vae, latent[i : i + 1]) for i in range(latent.shape[0])])
        return to_image(torch.nan_to_num(x), "truncate")
