"""kohya-format LoRA files for tests: random down/up matrices at a model's real shapes, written as kohya's sd-scripts
writes them (``{name}.lora_down.weight``, ``.lora_up.weight``, ``.alpha``; names from the model's own modules)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sumie.adapters.lora.names import default_targets, kohya_name
from sumie.checkpoints.loader import StableDiffusionModels


def _module(root: nn.Module, path: str) -> nn.Module:
    m = root
    for part in path.split("."):
        m = getattr(m, part)
    return m


def kohya_tensors(models: StableDiffusionModels, *, rank: int = 4, alpha: float = 2.0, seed: int = 0,
                  scale: float = 0.2, text: bool = True, unet: bool = True, every: int = 1) -> dict[str, torch.Tensor]:
    """A kohya LoRA over the default targets of ``models`` (every ``every``-th module), deltas of a visible size."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    components = [c for c, on in (("unet", unet), *((t.name, text) for t in models.config.text_encoders)) if on]
    for comp in components:
        root = models.modules()[comp]
        for path in default_targets(models.config, comp, "lora")[::every]:
            w = _module(root, path).weight
            name = kohya_name(models.config, comp, path)
            out_ch, in_ch = w.shape[0], w.shape[1]
            tail = tuple(w.shape[2:]) and (1, 1)  # 1x1 convs (SD1 proj_in/out) keep their 4-d shapes
            out[f"{name}.lora_down.weight"] = (torch.randn((rank, in_ch, *tail), generator=g) * scale).half()
            out[f"{name}.lora_up.weight"] = (torch.randn((out_ch, rank, *tail), generator=g) * scale).half()
            out[f"{name}.alpha"] = torch.tensor(alpha).half()
    return out


def write_kohya(path: Path, models: StableDiffusionModels, metadata: Mapping[str, str] | None = None,
                extra: Mapping[str, torch.Tensor] | None = None, **kw: object) -> Path:
    """Write :func:`kohya_tensors` (plus ``extra`` tensors) as a .safetensors file with ``metadata``."""
    tensors = {**kohya_tensors(models, **kw), **(extra or {})}  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))
    return path


def bogus_module(name: str = "lora_unet_no_such_block_proj", rank: int = 4) -> dict[str, torch.Tensor]:
    """One LoRA module whose name matches nothing in any model."""
    return {f"{name}.lora_down.weight": torch.zeros(rank, 8).half(),
            f"{name}.lora_up.weight": torch.zeros(8, rank).half(), f"{name}.alpha": torch.tensor(float(rank)).half()}


def addnet_shorthash(path: Path) -> str:
    """A1111's LoRA hash written independently of Sumie: SHA-256 of the bytes after the safetensors header, 12 hex."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n :]).hexdigest()[:12]


def expected_delta(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """alpha / rank * up @ down of one module, in fp32 (reshaped like 1x1 conv weights when the factors are 4-d)."""
    down = tensors[f"{name}.lora_down.weight"].float()
    up = tensors[f"{name}.lora_up.weight"].float()
    alpha = float(tensors[f"{name}.alpha"])
    d = up.flatten(1) @ down.flatten(1) * (alpha / down.shape[0])
    return d.reshape(up.shape[0], down.shape[1], *down.shape[2:]) if down.dim() == 4 else d
