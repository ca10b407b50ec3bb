"""Upscale-model nodes (comfy_extras/nodes_upscale_model.py: UpscaleModelLoader, ImageUpscaleWithModel) on Sumie's
upscalers (:mod:`sumie.models.upscalers`: ESRGAN / Real-ESRGAN RRDBNet, SRVGGNetCompact, SwinIR).

As ComfyUI's node: one pass of the model over the whole IMAGE batch in tiles of 512 input pixels overlapping by 32
(halved on out-of-memory down to 128), output exactly ``scale`` times the input size, clamped to [0, 1] and kept in
float (no uint8 rounding, no resize to another size). The tiles are blended by Sumie's
:func:`~sumie.pipelines.upscale.run_tiled` (ComfyUI's ``tiled_scale`` feathers linearly over the whole overlap); an
image of at most 512 x 512 is one tile, where both are the model applied to the image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sumie.comfy.env import ComfyEnvironment
from sumie.comfy.nodes.base import InputTypes, Node, RunContext
from sumie.comfy.values import NodeOutput
from sumie.errors import ConfigError
from sumie.models.upscalers.detect import Upscaler
from sumie.pipelines.upscale import model_grid, run_tiled

MODULE = "comfy_extras.nodes_upscale_model"
TILE, OVERLAP, MIN_TILE = 512, 32, 128


class UpscaleModelLoader(Node):
    """nodes_upscale_model.py ``UpscaleModelLoader``."""

    RETURN_TYPES = ("UPSCALE_MODEL",)
    CATEGORY = "loaders"
    DISPLAY_NAME = "Load Upscale Model"
    PYTHON_MODULE = MODULE

    @classmethod
    def input_types(cls, env: ComfyEnvironment) -> InputTypes:
        """The upscale_models folder's files."""
        return {"required": {"model_name": (env.model_names("upscaler"),)}}

    def run(self, ctx: RunContext, model_name: str) -> NodeOutput:
        """Load (or reuse) the upscaler."""
        return NodeOutput((ctx.env.manager.get("upscaler", model_name),))


def upscale_image(model: Upscaler, image: Tensor, tile: int = TILE, overlap: int = OVERLAP) -> Tensor:
    """IMAGE [B, H, W, C] -> [B, H * scale, W * scale, C] in [0, 1] (see the module docstring)."""
    module = model.module
    param = next(module.parameters())
    channels = int(getattr(module, "in_ch", 3))
    if image.ndim != 4 or image.shape[-1] != channels:
        raise ConfigError(f"the upscaler takes IMAGE [B, H, W, {channels}], got shape {tuple(image.shape)}")
    x = image.movedim(-1, -3).to(device=param.device, dtype=param.dtype)
    while True:
        try:
            with torch.inference_mode():
                out = run_tiled(module, x, model.scale, tile, overlap, model_grid(module))
            break
        except torch.cuda.OutOfMemoryError:
            tile //= 2
            if tile < MIN_TILE:
                raise
    return torch.clamp(out.float().cpu().movedim(-3, -1), 0.0, 1.0)


class ImageUpscaleWithModel(Node):
    """nodes_upscale_model.py ``ImageUpscaleWithModel``."""

    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "image/upscaling"
    DISPLAY_NAME = "Upscale Image (using Model)"
    PYTHON_MODULE = MODULE

    @classmethod
    def input_types(cls, env: ComfyEnvironment) -> InputTypes:
        """The model and the image."""
        return {"required": {"upscale_model": ("UPSCALE_MODEL",), "image": ("IMAGE",)}}

    def run(self, ctx: RunContext, upscale_model: Upscaler, image: Tensor) -> NodeOutput:
        """The upscaled IMAGE."""
        ctx.check()
        return NodeOutput((upscale_image(upscale_model, image),))


NODES: dict[str, type[Node]] = {
    "UpscaleModelLoader": UpscaleModelLoader,
    "ImageUpscaleWithModel": ImageUpscaleWithModel,
}
