"""Loader nodes (nodes.py: CheckpointLoaderSimple, VAELoader, LoraLoader, LoraLoaderModelOnly).

Models come from the environment's :class:`~sumie.checkpoints.manager.ModelManager` by their names in its folders
(ComfyUI's ``folder_paths`` lists), loaded once and shared; LoRA nodes add patches to a new MODEL / CLIP value
that :func:`sumie.comfy.values.applied` puts into the weights only while that value is used (ComfyUI's cloned
``ModelPatcher``).
"""

from __future__ import annotations

from typing import Any

from sumie.adapters.lora.file import read_lora
from sumie.adapters.patcher import ModelPatcher
from sumie.checkpoints.embedded import DEFAULT_MODEL
from sumie.comfy.env import ComfyEnvironment
from sumie.comfy.nodes.base import InputTypes, Node, RunContext
from sumie.comfy.values import ComfyClip, ComfyModel, NodeOutput

PATCHER_KEY = "sumie.comfy.patcher"


def checkpoint_names(env: ComfyEnvironment) -> list[str]:
    """The checkpoint folder's files; the embedded sumie-tiny when there is no checkpoint folder."""
    names = env.model_names("checkpoint")
    if not env.has_model_folder("checkpoint"):
        names.append(DEFAULT_MODEL)
    return names


def load_checkpoint(env: ComfyEnvironment, name: str) -> tuple[ComfyModel, ComfyClip, Any]:
    """(MODEL, CLIP, VAE) of a checkpoint name (loaded through the manager, one patcher per loaded model)."""
    models = env.manager.get("checkpoint", name)
    patcher = env.manager.derived("checkpoint", name, PATCHER_KEY, ModelPatcher.for_models)
    return ComfyModel(models, patcher), ComfyClip(models, patcher), models.vae


class CheckpointLoaderSimple(Node):
    """nodes.py ``CheckpointLoaderSimple``."""

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The model used for denoising latents.",
                       "The CLIP model used for encoding text prompts.",
                       "The VAE model used for encoding and decoding images to and from latent space.")
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."
    DISPLAY_NAME = "Load Checkpoint"

    @classmethod
    def input_types(cls, env: ComfyEnvironment) -> InputTypes:
        """The checkpoint names."""
        return {"required": {"ckpt_name": (checkpoint_names(env),
                                           {"tooltip": "The name of the checkpoint (model) to load."})}}

    def run(self, ctx: RunContext, ckpt_name: str) -> NodeOutput:
        """Load (or reuse) the checkpoint."""
        return NodeOutput(load_checkpoint(ctx.env, ckpt_name))


class VAELoader(Node):
    """nodes.py ``VAELoader`` (the VAE folder's files; ComfyUI's TAESD entries are not offered)."""

    RETURN_TYPES = ("VAE",)
    CATEGORY = "loaders"
    DISPLAY_NAME = "Load VAE"

    @classmethod
    def input_types(cls, env: ComfyEnvironment) -> InputTypes:
        """The VAE names."""
        return {"required": {"vae_name": (env.model_names("vae"),)}}

    def run(self, ctx: RunContext, vae_name: str) -> NodeOutput:
        """Load (or reuse) the VAE."""
        return NodeOutput((ctx.env.manager.get("vae", vae_name),))


def _lora_patches(env: ComfyEnvironment, model: ComfyModel | ComfyClip, lora_name: str) -> Any:
    path = env.manager.resolve("lora", lora_name)
    return read_lora(path).patches(model.models)


class LoraLoader(Node):
    """nodes.py ``LoraLoader``: UNet patches at ``strength_model``, text-encoder patches at ``strength_clip``."""

    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The modified diffusion model.", "The modified CLIP model.")
    CATEGORY = "loaders"
    DESCRIPTION = ("LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are "
                   "denoised such as applying styles. Multiple LoRA nodes can be linked together.")
    DISPLAY_NAME = "Load LoRA"

    @classmethod
    def input_types(cls, env: ComfyEnvironment) -> InputTypes:
        """Model, CLIP, the LoRA name and two strengths."""
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}),
            "clip": ("CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}),
            "lora_name": (env.model_names("lora"), {"tooltip": "The name of the LoRA."}),
            "strength_model": ("FLOAT", {**strength, "tooltip": "How strongly to modify the diffusion model. "
                                                                "This value can be negative."}),
            "strength_clip": ("FLOAT", {**strength, "tooltip": "How strongly to modify the CLIP model. "
                                                               "This value can be negative."}),
        }}

    def run(self, ctx: RunContext, model: ComfyModel, clip: ComfyClip, lora_name: str, strength_model: float,
            strength_clip: float) -> NodeOutput:
        """New MODEL and CLIP values with the LoRA's patches (unchanged ones when both strengths are 0)."""
        if strength_model == 0 and strength_clip == 0:
            return NodeOutput((model, clip))
        p = _lora_patches(ctx.env, model, lora_name)
        new_model = model.with_patches(p.unet, float(strength_model)) if p.unet and strength_model else model
        new_clip = clip.with_patches(p.text, float(strength_clip)) if p.text and strength_clip else clip
        return NodeOutput((new_model, new_clip))


class LoraLoaderModelOnly(Node):
    """nodes.py ``LoraLoaderModelOnly``: the UNet patches only."""

    RETURN_TYPES = ("MODEL",)
    CATEGORY = "loaders"

    @classmethod
    def input_types(cls, env: ComfyEnvironment) -> InputTypes:
        """Model, LoRA name, strength."""
        return {"required": {"model": ("MODEL",), "lora_name": (env.model_names("lora"),),
                             "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0,
                                                          "step": 0.01})}}

    def run(self, ctx: RunContext, model: ComfyModel, lora_name: str, strength_model: float) -> NodeOutput:
        """A new MODEL with the LoRA's UNet patches."""
        if strength_model == 0:
            return NodeOutput((model,))
        p = _lora_patches(ctx.env, model, lora_name)
        return NodeOutput((model.with_patches(p.unet, float(strength_model)) if p.unet else model,))


NODES: dict[str, type[Node]] = {
    "CheckpointLoaderSimple": CheckpointLoaderSimple,
    "VAELoader": VAELoader,
    "LoraLoader": LoraLoader,
    "LoraLoaderModelOnly": LoraLoaderModelOnly,
}
