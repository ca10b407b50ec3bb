"""Latent and VAE nodes (nodes.py: EmptyLatentImage, LatentUpscale, LatentUpscaleBy, LatentFromBatch,
RepeatLatentBatch, SetLatentNoiseMask, VAEDecode, VAEEncode, VAEEncodeForInpaint, InpaintModelConditioning).

LATENT ``samples`` are unscaled VAE latents as in ComfyUI (the sampler scales them on the way in and out).
VAE images are ``x * 2 - 1`` in, ``clamp((x + 1) / 2, 0, 1)`` out; encoding takes the posterior mean.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from sumie.comfy.nodes.base import MAX_RESOLUTION, InputTypes, Node, RunContext
from sumie.comfy.nodes.image import common_upscale
from sumie.comfy.values import NodeOutput
from sumie.errors import NaNError
from sumie.models.vae import AutoencoderKL

LATENT_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]


def vae_decode(vae: AutoencoderKL, samples: Tensor) -> Tensor:
    """Unscaled latents [B, C, h, w] -> IMAGE [B, H, W, 3] in [0, 1], one image at a time."""
    device = next(vae.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(samples.shape[0]):
            x = vae.decode(samples[i:i + 1].to(device)).float()
            if not bool(torch.isfinite(x).all()):
                raise NaNError("VAE decode produced NaN or infinite values; run the VAE in float32 or load "
                               "another VAE")
            out.append(torch.clamp((x + 1.0) / 2.0, 0.0, 1.0).cpu())
    return torch.cat(out).movedim(1, -1)


def vae_encode(vae: AutoencoderKL, pixels: Tensor) -> Tensor:
    """IMAGE [B, H, W, >=3] -> unscaled latents [B, C, H/f, W/f] (posterior means), one image at a time."""
    device = next(vae.parameters()).device
    x = pixels[..., :3].movedim(-1, 1) * 2.0 - 1.0
    with torch.no_grad():
        return torch.cat([vae.encode(x[i:i + 1].to(device)).mean.float().cpu() for i in range(x.shape[0])])


def crop_pixels(pixels: Tensor, f: int) -> Tensor:
    """IMAGE cut to a multiple of ``f`` on both sides, centred (``vae_encode_crop_pixels``)."""
    h, w = (pixels.shape[1] // f) * f, (pixels.shape[2] // f) * f
    if (h, w) == tuple(pixels.shape[1:3]):
        return pixels
    y0, x0 = (pixels.shape[1] % f) // 2, (pixels.shape[2] % f) // 2
    return pixels[:, y0:y0 + h, x0:x0 + w, :]


class EmptyLatentImage(Node):
    """nodes.py ``EmptyLatentImage``: zeros [B, 4, H/8, W/8] (a model with another layout gets its own size)."""

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The empty latent image batch.",)
    CATEGORY = "latent"
    DESCRIPTION = "Create a new batch of empty latent images to be denoised via sampling."
    DISPLAY_NAME = "Empty Latent Image"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Width, height, batch size."""
        return {"required": {
            "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                              "tooltip": "The width of the latent images in pixels."}),
            "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "The height of the latent images in pixels."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096,
                                   "tooltip": "The number of latent images in the batch."}),
        }}

    def run(self, ctx: RunContext, width: int, height: int, batch_size: int = 1) -> NodeOutput:
        """The zero latent, marked with its downscale ratio 8."""
        latent = torch.zeros([batch_size, 4, height // 8, width // 8])
        return NodeOutput(({"samples": latent, "downscale_ratio_spacial": 8},))


class LatentUpscale(Node):
    """nodes.py ``LatentUpscale``: to width/8 x height/8 (0 keeps the aspect; at least 64 px)."""

    RETURN_TYPES = ("LATENT",)
    CATEGORY = "latent"
    DISPLAY_NAME = "Upscale Latent"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Latent, method, size, crop."""
        size = {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}
        return {"required": {"samples": ("LATENT",), "upscale_method": (LATENT_UPSCALE_METHODS,),
                             "width": ("INT", size), "height": ("INT", dict(size)),
                             "crop": (["disabled", "center"],)}}

    def run(self, ctx: RunContext, samples: dict[str, Any], upscale_method: str, width: int, height: int,
            crop: str) -> NodeOutput:
        """The resized latent."""
        if width == 0 and height == 0:
            return NodeOutput((samples,))
        s = samples["samples"]
        if width == 0:
            height = max(64, height)
            width = max(64, round(s.shape[3] * height / s.shape[2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(s.shape[2] * width / s.shape[3]))
        else:
            width, height = max(64, width), max(64, height)
        return NodeOutput(({**samples, "samples": common_upscale(s, width // 8, height // 8, upscale_method,
                                                                 crop)},))


class LatentUpscaleBy(Node):
    """nodes.py ``LatentUpscaleBy``: both sides times ``scale_by``, rounded."""

    RETURN_TYPES = ("LATENT",)
    CATEGORY = "latent"
    DISPLAY_NAME = "Upscale Latent By"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Latent, method, factor."""
        return {"required": {"samples": ("LATENT",), "upscale_method": (LATENT_UPSCALE_METHODS,),
                             "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01})}}

    def run(self, ctx: RunContext, samples: dict[str, Any], upscale_method: str, scale_by: float) -> NodeOutput:
        """The resized latent."""
        s = samples["samples"]
        w, h = round(s.shape[3] * scale_by), round(s.shape[2] * scale_by)
        return NodeOutput(({**samples, "samples": common_upscale(s, w, h, upscale_method, "disabled")},))


def _batch_masks(masks: Tensor, n: int) -> Tensor:
    if masks.shape[0] < n:
        masks = masks.repeat(math.ceil(n / masks.shape[0]), 1, 1, 1)[:n]
    return masks


class LatentFromBatch(Node):
    """nodes.py ``LatentFromBatch``: ``length`` latents from ``batch_index`` on, remembering their indices."""

    RETURN_TYPES = ("LATENT",)
    CATEGORY = "latent/batch"
    DISPLAY_NAME = "Latent From Batch"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Latent, first index, count."""
        return {"required": {"samples": ("LATENT",), "batch_index": ("INT", {"default": 0, "min": 0, "max": 63}),
                             "length": ("INT", {"default": 1, "min": 1, "max": 64})}}

    def run(self, ctx: RunContext, samples: dict[str, Any], batch_index: int, length: int) -> NodeOutput:
        """The slice (its noise masks and ``batch_index`` list follow)."""
        s_in = samples["samples"]
        start = min(s_in.shape[0] - 1, batch_index)
        length = min(s_in.shape[0] - start, length)
        out = {**samples, "samples": s_in[start:start + length].clone()}
        if "noise_mask" in samples:
            masks = samples["noise_mask"]
            out["noise_mask"] = masks.clone() if masks.shape[0] == 1 else \
                _batch_masks(masks, s_in.shape[0])[start:start + length].clone()
        if "batch_index" in samples:
            out["batch_index"] = samples["batch_index"][start:start + length]
        else:
            out["batch_index"] = list(range(start, start + length))
        return NodeOutput((out,))


class RepeatLatentBatch(Node):
    """nodes.py ``RepeatLatentBatch``: the batch ``amount`` times (indices continue past the originals)."""

    RETURN_TYPES = ("LATENT",)
    CATEGORY = "latent/batch"
    DISPLAY_NAME = "Repeat Latent Batch"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Latent and count."""
        return {"required": {"samples": ("LATENT",), "amount": ("INT", {"default": 1, "min": 1, "max": 64})}}

    def run(self, ctx: RunContext, samples: dict[str, Any], amount: int) -> NodeOutput:
        """The repeated batch."""
        s_in = samples["samples"]
        out = {**samples, "samples": s_in.repeat((amount, 1, 1, 1))}
        if "noise_mask" in samples and samples["noise_mask"].shape[0] > 1:
            out["noise_mask"] = samples["noise_mask"].repeat((amount, 1, 1, 1))
        if "batch_index" in out:
            idx = out["batch_index"]
            offset = max(idx) - min(idx) + 1
            out["batch_index"] = idx + [x + i * offset for i in range(1, amount) for x in idx]
        return NodeOutput((out,))


class SetLatentNoiseMask(Node):
    """nodes.py ``SetLatentNoiseMask``: the mask (1 = denoise) the sampler inpaints with."""

    RETURN_TYPES = ("LATENT",)
    CATEGORY = "latent/inpaint"
    DISPLAY_NAME = "Set Latent Noise Mask"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Latent and mask."""
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    def run(self, ctx: RunContext, samples: dict[str, Any], mask: Tensor) -> NodeOutput:
        """The latent with ``noise_mask`` [B, 1, H, W]."""
        return NodeOutput(({**samples, "noise_mask": mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))},))


class VAEDecode(Node):
    """nodes.py ``VAEDecode``."""

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    CATEGORY = "latent"
    DESCRIPTION = "Decodes latent images back into pixel space images."
    DISPLAY_NAME = "VAE Decode"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Latent and VAE."""
        return {"required": {"samples": ("LATENT", {"tooltip": "The latent to be decoded."}),
                             "vae": ("VAE", {"tooltip": "The VAE model used for decoding the latent."})}}

    def run(self, ctx: RunContext, samples: dict[str, Any], vae: AutoencoderKL) -> NodeOutput:
        """The images."""
        return NodeOutput((vae_decode(vae, samples["samples"]),))


class VAEEncode(Node):
    """nodes.py ``VAEEncode`` (pixels cut to a multiple of the VAE's downscale, centred)."""

    RETURN_TYPES = ("LATENT",)
    CATEGORY = "latent"
    DISPLAY_NAME = "VAE Encode"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Pixels and VAE."""
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    def run(self, ctx: RunContext, pixels: Tensor, vae: AutoencoderKL) -> NodeOutput:
        """The latent."""
        return NodeOutput(({"samples": vae_encode(vae, crop_pixels(pixels, vae.downscale))},))


class VAEEncodeForInpaint(Node):
    """nodes.py ``VAEEncodeForInpaint``: masked pixels set to grey, the mask grown by ``grow_mask_by`` as
    the noise mask."""

    RETURN_TYPES = ("LATENT",)
    CATEGORY = "latent/inpaint"
    DISPLAY_NAME = "VAE Encode (for Inpainting)"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Pixels, VAE, mask, growth."""
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",), "mask": ("MASK",),
                             "grow_mask_by": ("INT", {"default": 6, "min": 0, "max": 64, "step": 1})}}

    def run(self, ctx: RunContext, pixels: Tensor, vae: AutoencoderKL, mask: Tensor,
            grow_mask_by: int = 6) -> NodeOutput:
        """Latent of the grey-filled image with the grown, rounded mask."""
        f = vae.downscale
        h, w = (pixels.shape[1] // f) * f, (pixels.shape[2] // f) * f
        mask = torch.nn.functional.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).float(),
                                               size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
        pixels = pixels.clone()
        if pixels.shape[1] != h or pixels.shape[2] != w:
            y0, x0 = (pixels.shape[1] % f) // 2, (pixels.shape[2] % f) // 2
            pixels = pixels[:, y0:y0 + h, x0:x0 + w, :]
            mask = mask[:, :, y0:y0 + h, x0:x0 + w]
        if grow_mask_by == 0:
            grown = mask
        else:
            kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by))
            pad = math.ceil((grow_mask_by - 1) / 2)
            grown = torch.clamp(torch.nn.functional.conv2d(mask.round(), kernel, padding=pad), 0, 1)
        keep = (1.0 - mask.round()).squeeze(1)
        pixels[..., :3] = (pixels[..., :3] - 0.5) * keep[..., None] + 0.5
        latent = vae_encode(vae, pixels)
        return NodeOutput(({"samples": latent, "noise_mask": grown[:, :, :h, :w].round()},))


class InpaintModelConditioning(Node):
    """nodes.py ``InpaintModelConditioning``: for inpainting UNets, the grey-filled image's latent and the mask
    in both conditionings, the original image's latent with the mask as the LATENT."""

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    CATEGORY = "conditioning/inpaint"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Conditionings, VAE, pixels, mask."""
        return {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "vae": ("VAE",),
                             "pixels": ("IMAGE",), "mask": ("MASK",)}}

    def run(self, ctx: RunContext, positive: list[Any], negative: list[Any], vae: AutoencoderKL, pixels: Tensor,
            mask: Tensor) -> NodeOutput:
        """(positive, negative) with ``concat_latent_image`` / ``concat_mask``, and the LATENT."""
        h, w = (pixels.shape[1] // 8) * 8, (pixels.shape[2] // 8) * 8
        mask = torch.nn.functional.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).float(),
                                               size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")
        orig = pixels
        pixels = pixels.clone()
        if pixels.shape[1] != h or pixels.shape[2] != w:
            y0, x0 = (pixels.shape[1] % 8) // 2, (pixels.shape[2] % 8) // 2
            pixels = pixels[:, y0:y0 + h, x0:x0 + w, :]
            mask = mask[:, :, y0:y0 + h, x0:x0 + w]
        keep = (1.0 - mask.round()).squeeze(1)
        pixels[..., :3] = (pixels[..., :3] - 0.5) * keep[..., None] + 0.5
        concat = vae_encode(vae, pixels)
        latent = {"samples": vae_encode(vae, orig), "noise_mask": mask}
        conds = [[[c[0], {**c[1], "concat_latent_image": concat, "concat_mask": mask}] for c in side]
                 for side in (positive, negative)]
        return NodeOutput((conds[0], conds[1], latent))


NODES: dict[str, type[Node]] = {
    "EmptyLatentImage": EmptyLatentImage,
    "LatentUpscale": LatentUpscale,
    "LatentUpscaleBy": LatentUpscaleBy,
    "LatentFromBatch": LatentFromBatch,
    "RepeatLatentBatch": RepeatLatentBatch,
    "SetLatentNoiseMask": SetLatentNoiseMask,
    "VAEDecode": VAEDecode,
    "VAEEncode": VAEEncode,
    "VAEEncodeForInpaint": VAEEncodeForInpaint,
    "InpaintModelConditioning": InpaintModelConditioning,
}
