"""CLIP image tower (Radford et al. 2021; ViT, Dosovitskiy et al. 2021) as IP-Adapter uses it.

The transformer layers are :mod:`sumie.models.clip`'s, bidirectional here. Keys follow the transformers
``CLIPVisionModelWithProjection`` layout (``vision_model.embeddings.patch_embedding`` / ``class_embedding`` /
``position_embedding``, ``vision_model.pre_layrnorm``, ``vision_model.encoder.layers.N.*``,
``vision_model.post_layernorm``, ``visual_projection``), which diffusers' ``image_encoder`` folders and ComfyUI's
``clip_vision`` files store; OpenCLIP's ``visual.*`` layout is mapped onto it (:func:`to_transformers_layout`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from sumie.checkpoints.keymaps.clip import _block_openclip_to_hf
from sumie.errors import CheckpointError, ConfigError
from sumie.models.clip import LAYER_NORM_EPS, CLIPEncoder

__all__ = ["CLIP_VISION_BIGG", "CLIP_VISION_H", "CLIP_VISION_L", "CLIPVisionConfig", "CLIPVisionModel",
           "VisionOutput", "config_from_state_dict", "to_transformers_layout"]


@dataclass(frozen=True)
class CLIPVisionConfig:
    """A CLIP image tower: ViT width / depth / heads, patch and image size, projection width, activation."""

    name: str = "clip_vision_h"
    width: int = 1280
    layers: int = 32
    heads: int = 16
    intermediate: int = 5120
    activation: str = "gelu"
    patch: int = 14
    image_size: int = 224
    projection_dim: int = 1024

    @property
    def tokens(self) -> int:
        """Sequence length: one class token plus (image_size / patch)^2 patches (257 for the /14 towers)."""
        return (self.image_size // self.patch) ** 2 + 1


# OpenCLIP ViT-H/14 (laion2B): IP-Adapter's models/image_encoder (SD1.5 adapters and the *_vit-h SDXL ones)
CLIP_VISION_H = CLIPVisionConfig()
# OpenCLIP ViT-bigG/14 (laion2B): IP-Adapter's sdxl_models/image_encoder (ip-adapter_sdxl)
CLIP_VISION_BIGG = CLIPVisionConfig("clip_vision_g", 1664, 48, 16, 8192, "gelu", 14, 224, 1280)
# OpenAI ViT-L/14 (quick_gelu): ComfyUI's clip_vision_l
CLIP_VISION_L = CLIPVisionConfig("clip_vision_l", 1024, 24, 16, 4096, "quick_gelu", 14, 224, 768)
_KNOWN = {c.width: c for c in (CLIP_VISION_H, CLIP_VISION_BIGG, CLIP_VISION_L)}


@dataclass(frozen=True)
class VisionOutput:
    """``image_embeds`` [B, projection_dim] (projected, post-normed class token) and ``penultimate`` [B, T, width]
    (the output of the second-to-last layer, transformers' ``hidden_states[-2]``)."""

    image_embeds: Tensor
    penultimate: Tensor


class CLIPVisionEmbeddings(nn.Module):
    """Patchify (conv, no bias), prepend the class token, add learned positions: [B, 3, S, S] -> [B, T, C]."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch, bias=False)
        self.position_embedding = nn.Embedding(cfg.tokens, cfg.width)
        nn.init.normal_(self.class_embedding)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, S, S] (S = image_size, normalised) -> [B, T, C]."""
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ConfigError(f"the image encoder takes {self.image_size}x{self.image_size} pixels, got "
                              f"{tuple(pixels.shape[-2:])}; preprocess the image first")
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixels.to(w.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(w.dtype).expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    """Embeddings, ``pre_layrnorm`` (transformers' spelling), bidirectional layers, ``post_layernorm``."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.encoder = CLIPEncoder(cfg, causal=False)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)


class CLIPVisionModel(nn.Module):
    """CLIP image encoder: pixels [B, 3, 224, 224] -> :class:`VisionOutput` (transformers
    ``CLIPVisionModelWithProjection``)."""

    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        if cfg.layers < 2:
            raise ConfigError(f"a CLIP image tower needs at least 2 layers (penultimate states), got {cfg.layers}")
        self.cfg = cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters."""
        return self.visual_projection.weight.dtype

    def forward(self, pixels: Tensor, need_embeds: bool = True) -> VisionOutput:
        """pixels [B, 3, S, S] -> image_embeds [B, proj] and the penultimate hidden states [B, T, width].

        With ``need_embeds=False`` the last layer is skipped and ``image_embeds`` is empty ([B, 0]).
        """
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixels))
        layers = vm.encoder.layers
        for block in layers[:-1]:
            x = block(x)
        penultimate = x
        if not need_embeds:
            return VisionOutput(x.new_zeros(x.shape[0], 0), penultimate)
        x = layers[-1](x)
        embeds = self.visual_projection(vm.post_layernorm(x[:, 0]))
        return VisionOutput(embeds, penultimate)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], *, cfg: CLIPVisionConfig | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        name: str = "image encoder") -> CLIPVisionModel:
        """Build from a transformers-, ComfyUI- or OpenCLIP-layout state dict (config from the shapes)."""
        hf = to_transformers_layout(sd, name)
        cfg = cfg or config_from_state_dict(hf, name)
        with torch.device("meta"):
            model = cls(cfg)
        missing, unexpected = model.load_state_dict(hf, strict=False, assign=True)
        if missing or unexpected:
            raise CheckpointError(f"{name}: not a CLIP image encoder of the detected shape ({cfg.name}): "
                                  f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


_PREFIXES = ("vision_model.", "visual_projection.")
_STRIP = ("clip_vision_model.", "image_encoder.", "conditioner.embedders.0.transformer.", "model.")
_OPENCLIP = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.(.+)")
_OPENCLIP_RENAMES = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
                     "visual.class_embedding": "vision_model.embeddings.class_embedding",
                     "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
                     "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
                     "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
                     "visual.ln_post.weight": "vision_model.post_layernorm.weight",
                     "visual.ln_post.bias": "vision_model.post_layernorm.bias"}


def to_transformers_layout(sd: Mapping[str, Tensor], name: str = "image encoder") -> dict[str, Tensor]:
    """A CLIP image tower state dict in the transformers / ComfyUI layout (returned as is, derived buffers dropped),
    under a known prefix, or OpenCLIP's ``visual.*`` layout (text keys ignored) -> the transformers layout."""
    keys = list(sd)
    for prefix in ("", *_STRIP):
        if any(k.startswith(prefix + "vision_model.embeddings.") for k in keys):
            return {k[len(prefix):]: v for k, v in sd.items()
                    if k.startswith(prefix) and k[len(prefix):].startswith(_PREFIXES)
                    and not k.endswith("position_ids")}
    if "visual.conv1.weight" in sd:
        out: dict[str, Tensor] = {}
        for key, value in sd.items():
            if key in _OPENCLIP_RENAMES:
                out[_OPENCLIP_RENAMES[key]] = value
            elif key == "visual.proj":  # [width, proj] applied as x @ P
                out["visual_projection.weight"] = value.t().contiguous()
            elif (m := _OPENCLIP.fullmatch(key)) is not None:
                out.update(_block_openclip_to_hf(key, f"vision_model.encoder.layers.{m.group(1)}.", m.group(2), value))
            elif key.startswith("visual."):
                raise CheckpointError(f"{name}: unknown OpenCLIP image tower key {key!r}")
        return out
    raise CheckpointError(f"{name}: not a CLIP image encoder (no vision_model.embeddings.* or visual.conv1 keys); "
                          "use a CLIP vision file (ViT-H/14 or bigG/14 image encoder, e.g. IP-Adapter's "
                          "models/image_encoder or ComfyUI's clip_vision files)")


def config_from_state_dict(sd: Mapping[str, Tensor], name: str = "image encoder") -> CLIPVisionConfig:
    """The tower's config from the shapes of a transformers-layout state dict (heads: from the known towers)."""
    try:
        patch_w = sd["vision_model.embeddings.patch_embedding.weight"]
        positions = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
        fc1 = sd["vision_model.encoder.layers.0.mlp.fc1.weight"]
        proj = sd["visual_projection.weight"]
    except KeyError as e:
        raise CheckpointError(f"{name}: CLIP image encoder key {e.args[0]!r} is missing") from None
    width, patch = patch_w.shape[0], patch_w.shape[-1]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k)))
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise CheckpointError(f"{name}: {positions} position embeddings is not a square grid plus a class token")
    known = _KNOWN.get(width)
    if known is None:
        raise CheckpointError(f"{name}: a CLIP image tower of width {width} is not one of the known towers "
                              f"(ViT-L/14 1024, ViT-H/14 1280, bigG/14 1664); its head count cannot be told")
    return replace(known, layers=layers, intermediate=fc1.shape[0], patch=patch, image_size=grid * patch,
                   projection_dim=proj.shape[0])
