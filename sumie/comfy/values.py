"""The values that flow along a graph's links, as ComfyUI shapes them, holding Sumie's engine objects.

* ``MODEL`` -> :class:`ComfyModel` (a checkpoint's networks + the UNet patches LoRA nodes added),
* ``CLIP`` -> :class:`ComfyClip` (the text encoders + their patches + the last layer),
* ``VAE`` -> :class:`~sumie.models.vae.AutoencoderKL`,
* ``CONDITIONING`` -> ``list[[context [1, L, D], options dict]]`` (ComfyUI's list of [cond, dict] pairs),
* ``LATENT`` -> ``{"samples": [B, C, h, w] unscaled VAE latents, "noise_mask"?, "batch_index"?}``,
* ``IMAGE`` -> [B, H, W, 3] float in [0, 1]; ``MASK`` -> [B, H, W] (or [H, W]) float in [0, 1],
* ``SAMPLER`` / ``SIGMAS`` / ``GUIDER`` / ``NOISE`` -> :class:`ComfySampler`, a 1-D tensor, :class:`ComfyGuider`,
  :class:`ComfyNoise`;
* ``CONTROL_NET`` -> :class:`~sumie.comfy.control.ComfyControlNet` (a conditioning entry's ``control`` option holds
  a :class:`~sumie.comfy.control.ControlHint` chain); ``CLIP_VISION`` -> :class:`~sumie.models.clip_vision.
  CLIPVisionModel`; ``CLIP_VISION_OUTPUT`` -> :class:`~sumie.comfy.vision.VisionOutput`; ``IPADAPTER`` ->
  :class:`~sumie.adapters.ip_adapter.files.IPAdapterModel`; ``UPSCALE_MODEL`` -> :class:`~sumie.models.upscalers.
  detect.Upscaler`.

Values are never changed in place: a node that alters one returns a new value (graph outputs are cached).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from sumie.adapters.patcher import ModelPatcher, WeightPatch
from sumie.checkpoints.loader import StableDiffusionModels

Patches = tuple[tuple[Mapping[str, WeightPatch], float], ...]  # (patches by weight key, strength), in order
Conditioning = list[list[Any]]  # [[context [1, L, D], {"pooled_output": ..., ...}], ...]


@dataclass(frozen=True, eq=False)
class ComfyModel:
    """A checkpoint's diffusion model as ComfyUI's ``MODEL``: networks, a base patcher, added UNet patches and
    attention hooks (IP-Adapters' extra keys / values, :data:`~sumie.models.hooks.ExtraKV`)."""

    models: StableDiffusionModels
    patcher: ModelPatcher
    patches: Patches = ()
    extra_kv: tuple[Any, ...] = ()

    def with_patches(self, patches: Mapping[str, WeightPatch], strength: float) -> ComfyModel:
        """A new MODEL with ``patches`` added at ``strength`` (ComfyUI clones the patcher)."""
        return dataclasses.replace(self, patches=(*self.patches, (patches, strength)))

    def with_extra_kv(self, hook: Any) -> ComfyModel:
        """A new MODEL whose cross-attention layers also get ``hook``'s tokens (an IP-Adapter's)."""
        return dataclasses.replace(self, extra_kv=(*self.extra_kv, hook))


@dataclass(frozen=True, eq=False)
class ComfyClip:
    """The text encoders as ComfyUI's ``CLIP``: ``layer`` -1 is the last layer, -2 the penultimate (clip skip 2);
    None is the model's own (SD1: last, SD2 / SDXL: penultimate)."""

    models: StableDiffusionModels
    patcher: ModelPatcher
    patches: Patches = ()
    layer: int | None = None

    def with_patches(self, patches: Mapping[str, WeightPatch], strength: float) -> ComfyClip:
        """A new CLIP with ``patches`` added at ``strength``."""
        return ComfyClip(self.models, self.patcher, (*self.patches, (patches, strength)), self.layer)

    def with_layer(self, layer: int) -> ComfyClip:
        """A new CLIP stopping at ``layer`` (ComfyUI ``clip_layer``)."""
        return ComfyClip(self.models, self.patcher, self.patches, layer)


@contextmanager
def applied(patcher: ModelPatcher, patches: Patches) -> Iterator[None]:
    """Run a block with exactly ``patches`` in the model (none: the plain weights), unpatched afterwards."""
    p = patcher.clone()
    p.clear_patches()
    for weights, strength in patches:
        p.add_patches(weights, strength=strength)
    with p.patched():
        yield


@dataclass(frozen=True)
class ComfySampler:
    """A ``SAMPLER``: a ComfyUI sampler name (KSamplerSelect)."""

    name: str


@dataclass(frozen=True, eq=False)
class ComfyGuider:
    """A ``GUIDER``: the model, both conditionings and the CFG scale (CFGGuider)."""

    model: ComfyModel
    positive: Conditioning
    negative: Conditioning
    cfg: float


@dataclass(frozen=True)
class ComfyNoise:
    """A ``NOISE``: ``seed`` None is no noise (DisableNoise), else ComfyUI's batch noise for the seed."""

    seed: int | None


@dataclass
class NodeOutput:
    """What a node returns: its outputs (one per RETURN_TYPE) and the UI part sent with ``executed``."""

    outputs: tuple[Any, ...] = ()
    ui: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def latent_tensor(latent: Mapping[str, Any]) -> Tensor:
    """The ``samples`` of a LATENT."""
    return latent["samples"]
