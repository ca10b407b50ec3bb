"""IP-Adapter files (Ye et al. 2023): ``image_proj.*`` (the projection) and ``ip_adapter.N.to_k_ip / to_v_ip`` (the
decoupled cross-attention's key / value layers), from the ``.bin`` pickles (``{"image_proj": ..., "ip_adapter":
...}``, read by the safe pickle reader) or ``.safetensors`` (the same names with the group as prefix), as diffusers'
``load_ip_adapter`` and ComfyUI read them.

``N`` counts the attention processors of diffusers' UNet in ``attn_processors`` order (down blocks, up blocks, then
the mid block; within a block every transformer block's ``attn1`` then ``attn2``), so the cross-attention layers are
N = 1, 3, 5, ...: the k-th cross-attention layer has N = 2k + 1 (diffusers ``_convert_ip_adapter_attn_to_diffusers``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from sumie.adapters.ip_adapter.projection import ImageProjection, Resampler
from sumie.checkpoints.io import load_state_dict
from sumie.errors import CheckpointError
from sumie.models.clip import ACTIVATIONS
from sumie.models.clip_vision import CLIPVisionConfig, CLIPVisionModel

__all__ = ["IPAdapterModel", "IPAdapterSpec", "load_image_encoder", "load_ip_adapter", "spec_from_state_dict"]

Kind = Literal["plain", "plus"]
_KV = re.compile(r"ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight")
DIM_HEAD = 64  # the Resampler's head width in every released file (diffusers assumes it too)


@dataclass(frozen=True)
class IPAdapterSpec:
    """What the keys say: ``kind`` (plain: image_embeds in; plus: penultimate hidden states in), the image feature
    width it takes, the UNet context width, tokens per image, the cross-attention layers' inner widths."""

    kind: Kind
    embed_dim: int
    cross_dim: int
    tokens: int
    inner: tuple[int, ...]  # to_k_ip output width of each cross-attention layer, in file order
    resampler: tuple[int, int, int, int] | None = None  # (dim, depth, heads, ff_mult) for plus


class KVPair(nn.Module):
    """The extra key / value projections of one cross-attention layer (``to_k_ip``, ``to_v_ip``, no bias)."""

    def __init__(self, cross_dim: int, inner: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, inner, bias=False)


class IPAdapterModel(nn.Module):
    """An IP-Adapter: ``image_proj`` (features -> [B, n, cross_dim]) and ``ip_adapter[str(2k + 1)]`` per layer k."""

    def __init__(self, spec: IPAdapterSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.kind == "plain":
            self.image_proj: nn.Module = ImageProjection(spec.embed_dim, spec.cross_dim, spec.tokens)
        else:
            dim, depth, heads, ff_mult = spec.resampler  # type: ignore[misc]
            self.image_proj = Resampler(spec.embed_dim, dim, spec.cross_dim, spec.tokens, depth, heads, DIM_HEAD,
                                        ff_mult)
        self.ip_adapter = nn.ModuleDict({str(2 * k + 1): KVPair(spec.cross_dim, w) for k, w in enumerate(spec.inner)})

    @property
    def layers(self) -> list[KVPair]:
        """The key / value pairs of the cross-attention layers in diffusers' processor order."""
        return [self.ip_adapter[str(2 * k + 1)] for k in range(len(self.spec.inner))]  # type: ignore[misc]


def flatten(sd: Mapping[str, object]) -> dict[str, Tensor]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` or prefixed keys -> flat ``image_proj.*`` / ``ip_adapter.*``."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        elif isinstance(value, Tensor):
            out[key] = value
    return out


def spec_from_state_dict(sd: Mapping[str, Tensor], name: str = "IP-Adapter") -> IPAdapterSpec:
    """The adapter's kind and sizes from its keys and shapes (plain ``proj`` / plus ``latents``); others refused."""
    pairs: dict[int, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if (m := _KV.fullmatch(key)) is not None:
            pairs.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not pairs or not any(k.startswith("image_proj.") for k in sd):
        raise CheckpointError(f"{name}: not an IP-Adapter file (no image_proj.* and ip_adapter.N.to_k_ip keys)")
    expected = [2 * k + 1 for k in range(len(pairs))]
    if sorted(pairs) != expected or any(len(p) != 2 for p in pairs.values()):
        raise CheckpointError(f"{name}: the ip_adapter.N keys are not the pairs N = 1, 3, 5, ...: got "
                              f"{sorted(pairs)[:6]}")
    inner = tuple(int(pairs[n]["to_k_ip"].shape[0]) for n in expected)
    cross_dim = int(pairs[1]["to_k_ip"].shape[1])
    if "image_proj.proj.weight" in sd and "image_proj.norm.weight" in sd:
        proj = sd["image_proj.proj.weight"]
        if int(sd["image_proj.norm.weight"].shape[0]) != cross_dim or proj.shape[0] % cross_dim:
            raise CheckpointError(f"{name}: image_proj.proj {tuple(proj.shape)} does not give tokens of width "
                                  f"{cross_dim}")
        return IPAdapterSpec("plain", int(proj.shape[1]), cross_dim, int(proj.shape[0]) // cross_dim, inner)
    if "image_proj.latents" in sd and "image_proj.proj_in.weight" in sd:
        if any(k.startswith("image_proj.perceiver_resampler.") for k in sd):
            raise CheckpointError(f"{name}: an IP-Adapter FaceID Plus file; FaceID adapters (InsightFace "
                                  "embeddings) are not supported")
        latents = sd["image_proj.latents"]
        dim = int(latents.shape[-1])
        depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"image_proj\.layers\.(\d+)\.", k)))
        heads = int(sd["image_proj.layers.0.0.to_q.weight"].shape[0]) // DIM_HEAD
        ff_mult = int(sd["image_proj.layers.0.1.1.weight"].shape[0]) // dim
        return IPAdapterSpec("plus", int(sd["image_proj.proj_in.weight"].shape[1]),
                             int(sd["image_proj.proj_out.weight"].shape[0]), int(latents.shape[-2]), inner,
                             (dim, depth, heads, ff_mult))
    kinds = "full-face / FaceID (MLP projection)" if "image_proj.proj.0.weight" in sd else "unknown"
    raise CheckpointError(f"{name}: {kinds} IP-Adapter projection; supported: ip-adapter[_sdxl][_vit-h] (proj + norm) "
                          "and ip-adapter-plus[-face] (Resampler)")


def load_ip_adapter(path: str | os.PathLike[str], *, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> IPAdapterModel:
    """Read an IP-Adapter ``.bin`` / ``.safetensors`` file into an :class:`IPAdapterModel` (every key used)."""
    p = Path(path)
    sd = flatten(load_state_dict(p))
    spec = spec_from_state_dict(sd, p.name)
    with torch.device("meta"):
        model = IPAdapterModel(spec)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{p.name}: IP-Adapter keys do not fit a {spec.kind} adapter: missing "
                              f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_image_encoder(path: str | os.PathLike[str], *, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> CLIPVisionModel:
    """A CLIP vision file (transformers / ComfyUI / OpenCLIP layout; config from the shapes) or a diffusers
    ``image_encoder`` folder (config from its ``config.json``)."""
    p = Path(path)
    cfg = None
    if p.is_dir():
        found = [p / f for f in ("model.safetensors", "pytorch_model.bin") if (p / f).is_file()]
        if not found:
            raise CheckpointError(f"{p}: a folder without model.safetensors or pytorch_model.bin; give the CLIP "
                                  "vision file or a diffusers image_encoder folder")
        if (p / "config.json").is_file():
            cfg = _folder_config(p / "config.json")
        p = found[0]
    return CLIPVisionModel.from_state_dict(load_state_dict(p), cfg=cfg, device=device, dtype=dtype, name=p.name)


def _folder_config(path: Path) -> CLIPVisionConfig:
    """transformers' ``CLIPVisionConfig`` JSON -> :class:`CLIPVisionConfig`."""
    try:
        c = json.loads(path.read_text())
        cfg = CLIPVisionConfig(path.parent.name, int(c["hidden_size"]), int(c["num_hidden_layers"]),
                               int(c["num_attention_heads"]), int(c["intermediate_size"]),
                               str(c.get("hidden_act", "quick_gelu")), int(c.get("patch_size", 32)),
                               int(c.get("image_size", 224)), int(c.get("projection_dim", 512)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable CLIP vision config ({type(e).__name__}: {e})") from None
    if cfg.activation not in ACTIVATIONS:
        raise CheckpointError(f"{path}: activation {cfg.activation!r} is not one of {ACTIVATIONS}")
    return cfg
