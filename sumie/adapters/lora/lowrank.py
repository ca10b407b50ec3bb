"""Low-rank LoRA (Hu et al. 2021) as kohya/A1111, LyCORIS LoCon, diffusers and PEFT store it: ΔW = up @ down.

Key suffixes per module: kohya/LoCon ``.lora_down.weight`` / ``.lora_up.weight`` (``.lora_mid.weight``: a Tucker
core of a 3x3 LoCon), PEFT ``.lora_A.weight`` / ``.lora_B.weight`` (``.lora_B.bias``), diffusers ``.lora.down/up``
and ``.lora_linear_layer.down/up``, and the old attention-processor names ``...attn1.processor.to_q_lora.down``.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

# suffix -> (part, style); the style names the file format the suffix belongs to
SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_down.weight": ("down", "kohya"),
    ".lora_up.weight": ("up", "kohya"),
    ".lora_mid.weight": ("mid", "kohya"),
    ".lora_A.weight": ("down", "peft"),
    ".lora_B.weight": ("up", "peft"),
    ".lora_B.bias": ("up_bias", "peft"),
    ".lora.down.weight": ("down", "diffusers"),
    ".lora.up.weight": ("up", "diffusers"),
    ".lora_linear_layer.down.weight": ("down", "diffusers"),
    ".lora_linear_layer.up.weight": ("up", "diffusers"),
}
PARTS = frozenset(p for p, _ in SUFFIXES.values())

# diffusers' attention-processor LoRA (<= 0.20): ``<attn>.processor.to_q_lora.down.weight``; the text encoder's
# ``<layer>.self_attn.to_q_lora.down.weight`` means q_proj
_PROCESSOR = re.compile(
    r"(?P<base>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight")
_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def split_processor_key(key: str) -> tuple[str, str] | None:
    """(module name, part) of an old attention-processor key, or None."""
    m = _PROCESSOR.fullmatch(key)
    if m is None:
        return None
    base, proj = m.group("base"), m.group("proj")
    table = _TEXT_PROJ if base.endswith("self_attn") else _UNET_PROJ
    return f"{base}.{table[proj]}", m.group("part")


def rank(parts: dict[str, Tensor]) -> int:
    """The module's rank: rows of its down matrix."""
    return int(parts["down"].shape[0])


def missing(parts: dict[str, Tensor]) -> list[str]:
    """Parts a complete low-rank module lacks."""
    names = {"down": "down (lora_down / lora_A)", "up": "up (lora_up / lora_B)"}
    return [names[p] for p in ("down", "up") if p not in parts]


def delta(parts: dict[str, Tensor]) -> Tensor:
    """ΔW = up @ down in fp32, unscaled: [out, in] for Linear, [out, in, kh, kw] for a conv (a 3x3 down, or a
    1x1 down with a Tucker core ``mid`` [r, r, kh, kw]); a 1x1 conv's [out, in, 1, 1]."""
    down = parts["down"].to(torch.float32)
    up = parts["up"].to(torch.float32)
    up2 = up.reshape(up.shape[0], -1)
    down2 = down.reshape(down.shape[0], -1)
    mid = parts.get("mid")
    if mid is not None:
        core = mid.to(torch.float32)  # [r_up, r_down, kh, kw]
        return torch.einsum("m n ..., i m, n j -> i j ...", core, up2, down2)
    out = up2 @ down2
    return out.reshape(up.shape[0], *down.shape[1:]) if down.ndim == 4 else out


def bias_delta(parts: dict[str, Tensor]) -> Tensor | None:
    """Δb (PEFT ``lora_B.bias``), unscaled, or None."""
    b = parts.get("up_bias")
    return None if b is None else b.to(torch.float32)
