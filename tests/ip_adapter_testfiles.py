"""Random-weight IP-Adapter files and CLIP image encoders for tests, at reduced or real shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file

from sumie.adapters.ip_adapter.files import IPAdapterSpec

# a tiny CLIP image tower at the real patch / image size (257 tokens), so CLIPImageProcessor's 224 crop fits
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14,
                   image_size=224, projection_dim=24, hidden_act="gelu")


def vision_model(seed: int = 0, **overrides: Any) -> transformers.CLIPVisionModelWithProjection:
    """transformers' CLIPVisionModelWithProjection with random weights (LayerNorms randomised too)."""
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**{**TINY_VISION, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def write_encoder(folder: Path, seed: int = 0, **overrides: Any) -> transformers.CLIPVisionModelWithProjection:
    """An ``image_encoder`` folder (config.json + model.safetensors) as transformers saves it."""
    model = vision_model(seed, **overrides)
    model.save_pretrained(folder)
    return model


def adapter_state_dict(spec: IPAdapterSpec, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Random weights under the released files' key names (:func:`real_keys`): LayerNorms and latents randomised,
    Linear weights ~ 1/sqrt(fan_in), the ``to_k_ip`` / ``to_v_ip`` ones times ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in real_keys(spec).items():
        t = torch.randn(shape, generator=gen)
        if len(shape) == 1:
            t = 1.0 + 0.1 * t if name.endswith("weight") else 0.1 * t
        elif len(shape) == 2:
            t = t / shape[1] ** 0.5 * (scale if name.startswith("ip_adapter.") else 1.0)
        else:
            t = t / shape[-1] ** 0.5
        out[name] = t.contiguous()
    return out


def split(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``image_proj.x`` / ``ip_adapter.x`` -> the .bin's nested groups."""
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for k, v in sd.items():
        group, _, rest = k.partition(".")
        out[group][rest] = v
    return out


def write_adapter(path: Path, sd: dict[str, torch.Tensor]) -> Path:
    """``.bin`` (nested groups, torch.save) or ``.safetensors`` (prefixed keys), as the released files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(split(sd), str(path))
    return path


# --------------------------------------------------------------------------- the released files' key shapes
# (h94/IP-Adapter): SD1.5 has 16 cross-attention layers (inner 320 x 5, 640 x 5 ... in processor order), SDXL 70.
SD15_INNER = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280)
SDXL_INNER = (640,) * 4 + (1280,) * 20 + (1280,) * 30 + (640,) * 6 + (1280,) * 10

def real_keys(spec: IPAdapterSpec) -> dict[str, tuple[int, ...]]:
    """Key names and shapes as the released files hold them (h94/IP-Adapter ``ImageProjModel`` / ``Resampler`` and
    the attention processors' ``to_k_ip`` / ``to_v_ip``), written out independently of Sumie's modules."""
    c = spec.cross_dim
    out: dict[str, tuple[int, ...]] = {}
    if spec.kind == "plain":
        out.update({"image_proj.proj.weight": (spec.tokens * c, spec.embed_dim),
                    "image_proj.proj.bias": (spec.tokens * c,), "image_proj.norm.weight": (c,),
                    "image_proj.norm.bias": (c,)})
    else:
        dim, depth, heads, mult = spec.resampler  # type: ignore[misc]
        inner = heads * 64
        out.update({"image_proj.latents": (1, spec.tokens, dim), "image_proj.proj_in.weight": (dim, spec.embed_dim),
                    "image_proj.proj_in.bias": (dim,), "image_proj.proj_out.weight": (c, dim),
                    "image_proj.proj_out.bias": (c,), "image_proj.norm_out.weight": (c,),
                    "image_proj.norm_out.bias": (c,)})
        for i in range(depth):
            a, f = f"image_proj.layers.{i}.0.", f"image_proj.layers.{i}.1."
            out.update({a + "norm1.weight": (dim,), a + "norm1.bias": (dim,), a + "norm2.weight": (dim,),
                        a + "norm2.bias": (dim,), a + "to_q.weight": (inner, dim), a + "to_kv.weight": (2 * inner, dim),
                        a + "to_out.weight": (dim, inner), f + "0.weight": (dim,), f + "0.bias": (dim,),
                        f + "1.weight": (dim * mult, dim), f + "3.weight": (dim, dim * mult)})
    for k, width in enumerate(spec.inner):
        out[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = (width, c)
        out[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = (width, c)
    return out


REAL = {
    "ip-adapter_sd15": IPAdapterSpec("plain", 1024, 768, 4, SD15_INNER),
    "ip-adapter-plus_sd15": IPAdapterSpec("plus", 1280, 768, 16, SD15_INNER, (768, 4, 12, 4)),
    "ip-adapter-plus-face_sd15": IPAdapterSpec("plus", 1280, 768, 16, SD15_INNER, (768, 4, 12, 4)),
    "ip-adapter_sdxl_vit-h": IPAdapterSpec("plain", 1024, 2048, 4, SDXL_INNER),
    "ip-adapter-plus_sdxl_vit-h": IPAdapterSpec("plus", 1280, 2048, 16, SDXL_INNER, (1280, 4, 20, 4)),
    "ip-adapter_sdxl": IPAdapterSpec("plain", 1280, 2048, 4, SDXL_INNER),
}
