"""CLIP vision and IP-Adapter nodes: nodes.py ``CLIPVisionLoader`` / ``CLIPVisionEncode`` and, as the popular
ComfyUI_IPAdapter_plus custom nodes (cubiq) name them, ``IPAdapterModelLoader`` / ``IPAdapterAdvanced``, on Sumie's
:mod:`sumie.models.clip_vision` and :mod:`sumie.adapters.ip_adapter`.

* images reach the encoder through ComfyUI's ``clip_preprocess``: the IMAGE resized with bicubic antialiased
  interpolation so its short side is the encoder's size and centre-cropped (``crop="none"``: squashed to the square),
  rounded to 8-bit levels, normalised with OpenAI's mean and std;
* ``IPAdapterAdvanced`` (``ipadapter_execute`` with one image): plain adapters project the image embedding and, for
  the uncond rows, a zero embedding; plus adapters resample the penultimate hidden states of the image and, for the
  uncond rows, of a black 224 x 224 image; every cross-attention layer adds ``weight * attn(q, k_ip, v_ip)``
  ("V only") while the sigma lies between ``percent_to_sigma(start_at)`` and ``percent_to_sigma(end_at)``.

The subset Sumie runs: one reference image per node (chain nodes for more), ``weight_type`` "linear",
``embeds_scaling`` "V only" (other values fail validation), ``combine_embeds`` any (it only acts on several
images), no ``image_negative`` or ``attn_mask`` (an execution error names them), plain and plus adapters (FaceID
files are refused by the loader).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sumie.adapters.ip_adapter.files import IPAdapterModel
from sumie.adapters.ip_adapter.hook import IPAdapterHook, check_fits, sigma_range
from sumie.adapters.ip_adapter.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from sumie.adapters.ip_adapter.units import register_loaders
from sumie.comfy.env import ComfyEnvironment
from sumie.comfy.nodes.base import InputTypes, Node, RunContext
from sumie.comfy.sampler import discretization
from sumie.comfy.values import ComfyModel, NodeOutput
from sumie.errors import ConfigError
from sumie.models.clip_vision import CLIPVisionModel, VisionOutput

IPADAPTER_MODULE = "custom_nodes.ComfyUI_IPAdapter_plus"
# IPAdapterPlus.py WEIGHT_TYPES, in its order
WEIGHT_TYPES = ["linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "style transfer precise", "composition precise"]
COMBINE = ["concat", "add", "subtract", "average", "norm average"]
EMBEDS_SCALING = ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]


def clip_preprocess(image: Tensor, size: int = 224, crop: bool = True) -> Tensor:
    """IMAGE [B, H, W, C] in [0, 1] -> normalised pixels [B, 3, size, size] (ComfyUI ``clip_preprocess``)."""
    x = image[..., :3].movedim(-1, 1).float()
    if tuple(x.shape[-2:]) != (size, size):
        if crop:
            k = size / min(x.shape[-2], x.shape[-1])
            to = (round(k * x.shape[-2]), round(k * x.shape[-1]))
        else:
            to = (size, size)
        x = torch.nn.functional.interpolate(x, size=to, mode="bicubic", antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    x = torch.clip(255.0 * x, 0, 255).round() / 255.0
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def encode_image(encoder: CLIPVisionModel, image: Tensor, crop: bool = True,
                 need_embeds: bool = True) -> VisionOutput:
    """The encoder's outputs for an IMAGE batch (``ClipVisionModel.encode_image``)."""
    pixels = clip_preprocess(image, encoder.cfg.image_size, crop)
    return encoder(pixels.to(device=encoder.visual_projection.weight.device, dtype=encoder.dtype), need_embeds)


class CLIPVisionLoader(Node):
    """nodes.py ``CLIPVisionLoader``."""

    RETURN_TYPES = ("CLIP_VISION",)
    CATEGORY = "loaders"
    DISPLAY_NAME = "Load CLIP Vision"

    @classmethod
    def input_types(cls, env: ComfyEnvironment) -> InputTypes:
        """The clip_vision folder's files."""
        return {"required": {"clip_name": (env.model_names("clip_vision"),)}}

    def run(self, ctx: RunContext, clip_name: str) -> NodeOutput:
        """Load (or reuse) the image encoder."""
        register_loaders(ctx.env.manager)
        return NodeOutput((ctx.env.manager.get("clip_vision", clip_name),))


class CLIPVisionEncode(Node):
    """nodes.py ``CLIPVisionEncode``: image embedding and penultimate hidden states of an IMAGE batch."""

    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    CATEGORY = "conditioning"
    DISPLAY_NAME = "CLIP Vision Encode"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """The encoder, the image and the crop."""
        return {"required": {"clip_vision": ("CLIP_VISION",), "image": ("IMAGE",), "crop": (["center", "none"],)}}

    def run(self, ctx: RunContext, clip_vision: CLIPVisionModel, image: Tensor, crop: str) -> NodeOutput:
        """The CLIP_VISION_OUTPUT."""
        return NodeOutput((encode_image(clip_vision, image, crop == "center"),))


class IPAdapterModelLoader(Node):
    """ComfyUI_IPAdapter_plus ``IPAdapterModelLoader``: a file of the ipadapter folders."""

    RETURN_TYPES = ("IPADAPTER",)
    CATEGORY = "ipadapter/loaders"
    DISPLAY_NAME = "IPAdapter Model Loader"
    PYTHON_MODULE = IPADAPTER_MODULE

    @classmethod
    def input_types(cls, env: ComfyEnvironment) -> InputTypes:
        """The ipadapter folder's files."""
        return {"required": {"ipadapter_file": (env.model_names("ip_adapter"),)}}

    def run(self, ctx: RunContext, ipadapter_file: str) -> NodeOutput:
        """Load (or reuse) the adapter."""
        register_loaders(ctx.env.manager)
        return NodeOutput((ctx.env.manager.get("ip_adapter", ipadapter_file),))


@torch.no_grad()
def adapter_tokens(adapter: IPAdapterModel, encoder: CLIPVisionModel, image: Tensor) -> tuple[Tensor, Tensor]:
    """(cond, uncond) image tokens [1, n, cross_dim] as ``ipadapter_execute`` makes them (module docstring)."""
    proj = adapter.image_proj
    if adapter.spec.kind == "plain":
        embeds = encode_image(encoder, image).image_embeds
        cond, uncond = proj(embeds), proj(torch.zeros_like(embeds))
    else:
        size = encoder.cfg.image_size
        cond = proj(encode_image(encoder, image, need_embeds=False).penultimate)
        uncond = proj(encode_image(encoder, torch.zeros(1, size, size, 3), need_embeds=False).penultimate)
    return cond.reshape(1, -1, cond.shape[-1]), uncond.reshape(1, -1, uncond.shape[-1])


class IPAdapterAdvanced(Node):
    """ComfyUI_IPAdapter_plus ``IPAdapterAdvanced`` (the subset in the module docstring): a MODEL whose cross-attention
    also attends to the reference image's tokens."""

    RETURN_TYPES = ("MODEL",)
    CATEGORY = "ipadapter"
    DISPLAY_NAME = "IPAdapter Advanced"
    PYTHON_MODULE = IPADAPTER_MODULE
    VALIDATES = ("weight_type", "combine_embeds", "embeds_scaling")

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Model, adapter, image, weight, weight type, combine, range, scaling; optional negative image, mask and
        CLIP vision."""
        pct = {"min": 0.0, "max": 1.0, "step": 0.001}
        return {"required": {
            "model": ("MODEL",), "ipadapter": ("IPADAPTER",), "image": ("IMAGE",),
            "weight": ("FLOAT", {"default": 1.0, "min": -1, "max": 5, "step": 0.05}),
            "weight_type": (WEIGHT_TYPES,), "combine_embeds": (COMBINE,),
            "start_at": ("FLOAT", {"default": 0.0, **pct}), "end_at": ("FLOAT", {"default": 1.0, **pct}),
            "embeds_scaling": (EMBEDS_SCALING,),
        }, "optional": {"image_negative": ("IMAGE",), "attn_mask": ("MASK",), "clip_vision": ("CLIP_VISION",)}}

    @classmethod
    def validate(cls, env: ComfyEnvironment, inputs: Any) -> bool | str:
        """The values Sumie runs (module docstring)."""
        if inputs["weight_type"] != "linear":
            return f"weight_type {inputs['weight_type']!r} is not supported by Sumie; use 'linear'"
        if inputs["combine_embeds"] not in COMBINE:
            return f"combine_embeds {inputs['combine_embeds']!r} is not one of {COMBINE}"
        if inputs["embeds_scaling"] != "V only":
            return f"embeds_scaling {inputs['embeds_scaling']!r} is not supported by Sumie; use 'V only'"
        return True

    def run(self, ctx: RunContext, model: ComfyModel, ipadapter: IPAdapterModel, image: Tensor, weight: float,
            weight_type: str, combine_embeds: str, start_at: float, end_at: float, embeds_scaling: str,
            image_negative: Tensor | None = None, attn_mask: Tensor | None = None,
            clip_vision: CLIPVisionModel | None = None) -> NodeOutput:
        """The MODEL with the adapter's attention hook."""
        for name, value in (("image_negative", image_negative), ("attn_mask", attn_mask)):
            if value is not None:
                raise ConfigError(f"IPAdapterAdvanced: {name} is not supported by Sumie; remove that link")
        if clip_vision is None:
            raise ConfigError("IPAdapterAdvanced: Missing CLIPVision model; link a CLIPVisionLoader to clip_vision")
        if image.ndim != 4 or image.shape[0] != 1:
            raise ConfigError(f"IPAdapterAdvanced: Sumie takes one reference image per node, got a batch of shape "
                              f"{tuple(image.shape)}; chain one node per image")
        unet = model.models.unet
        check_fits(ipadapter, clip_vision, unet, "the IPADAPTER", "the CLIP_VISION model")
        cond, uncond = adapter_tokens(ipadapter, clip_vision, image)
        hi, lo = sigma_range(discretization(model), float(start_at), float(end_at))
        hook = IPAdapterHook.for_unet(ipadapter, unet, cond, uncond, float(weight), hi, lo)
        return NodeOutput((model.with_extra_kv(hook),))


NODES: dict[str, type[Node]] = {
    "CLIPVisionLoader": CLIPVisionLoader,
    "CLIPVisionEncode": CLIPVisionEncode,
    "IPAdapterModelLoader": IPAdapterModelLoader,
    "IPAdapterAdvanced": IPAdapterAdvanced,
}
