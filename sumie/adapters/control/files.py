"""ControlNet files in every layout users download, read into :class:`~sumie.models.controlnet.ControlNetModel`.

Layouts, told apart by their keys (never by the file name):

* original single file, ``control_model.*`` (``control_v11p_sd15_canny.pth``), the same without the prefix (the fp16
  safetensors conversions), and old 1.0 files that carry a whole SD model beside it (only ``control_model.*`` is
  read);
* diffusers ``ControlNetModel``: one ``.safetensors`` / ``.bin`` file or a folder with
  ``diffusion_pytorch_model.safetensors`` (and ``config.json``), SD1.x, SD2.x and SDXL, including the SDXL "mid" /
  "small" variants with fewer (or zero-layer) transformers;
* Stability's SDXL Control-LoRA (``lora_controlnet`` marker): the base UNet's encoder weights plus low-rank
  ``up @ down`` deltas, with the file's full tensors (hint block, zero convs, middle-block out, norms, biases)
  replacing the base's (ComfyUI ``comfy/controlnet.py``: ``ControlLora``, ``ControlLoraOps``).

The family comes from the weights: the ADM input (``label_emb`` / ``add_embedding``: SDXL), the cross-attention
context width (768 SD1, 1024 SD2, 2048 SDXL) and the projection type (1x1 conv SD1, Linear SD2/SDXL).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from sumie.checkpoints.io import load_state_dict
from sumie.checkpoints.keymaps.controlnet import (
    controlnet_layout,
    diffusers_to_ldm_controlnet,
    original_keys,
)
from sumie.checkpoints.keymaps.unet import infer_encoder_config
from sumie.checkpoints.loader import _component_weights, build_module
from sumie.configs import FAMILIES, UNetConfig
from sumie.errors import CheckpointError, ConfigError
from sumie.models.controlnet import ControlNetModel
from sumie.models.unet import UNetModel

__all__ = ["ControlFile", "check_family", "controlnet_family", "controlnet_state_dict", "load_controlnet",
           "merge_control_lora", "read_control_weights"]

_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}
_ADM_FAMILY = {2816: "sdxl", 2560: "sdxl_refiner"}
_EXPECTED = ("expected a ControlNet: the original layout (control_model.* or input_hint_block.* / zero_convs.* "
             "keys), a diffusers ControlNetModel (controlnet_cond_embedding.*) or an SDXL Control-LoRA "
             "(lora_controlnet)")


@dataclass
class ControlFile:
    """A loaded control model: ``model`` is a ControlNetModel (``kind`` "controlnet") or a T2I-Adapter."""

    path: Path
    name: str
    kind: Literal["controlnet", "t2i_adapter"]
    family: str  # "sd1" | "sd2" | "sdxl"
    model: nn.Module
    hint_channels: int
    layout: str = ""  # "original", "diffusers", "control_lora" (T2I: its own)


def read_control_weights(path: str | Path) -> tuple[dict[str, Tensor], dict[str, object]]:
    """(tensors, diffusers config.json or {}) of a ControlNet file or diffusers folder (single, fp16-variant or
    sharded ``diffusion_pytorch_model`` weights)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder; check the path")
    if not p.is_dir():
        return load_state_dict(p), {}
    config: dict[str, object] = {}
    if (p / "config.json").is_file():
        try:
            config = json.loads((p / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{p / 'config.json'}: unreadable JSON ({e}); the folder is damaged") from None
    return _component_weights(p, ("diffusion_pytorch_model",), load=True), config


def controlnet_family(cfg: UNetConfig, where: str) -> str:
    """"sd1" | "sd2" | "sdxl" (| "sdxl_refiner") from a ControlNet's encoder config; a cross-attention width of a
    known family that contradicts the structure is a CheckpointError."""
    if cfg.adm_in_channels is not None:
        family = _ADM_FAMILY.get(cfg.adm_in_channels, "sdxl")
    else:
        family = "sd2" if cfg.use_linear_in_transformer else "sd1"
    by_context = _CONTEXT_FAMILY.get(cfg.context_dim)
    if by_context is not None and by_context != family:
        raise CheckpointError(
            f"{where}: inconsistent ControlNet: cross-attention width {cfg.context_dim} is {by_context}'s but the "
            f"{'ADM input' if cfg.adm_in_channels else 'projection type'} is {family}'s; the file is damaged or "
            "of an unsupported model"
        )
    return family


def _with_family_heads(cfg: UNetConfig, family: str) -> UNetConfig:
    """Heads (not visible in shapes) and, without cross-attention, the context width from the family."""
    base = FAMILIES[family].unet
    return replace(cfg, num_heads=base.num_heads, num_head_channels=base.num_head_channels,
                   context_dim=cfg.context_dim or base.context_dim)


def controlnet_state_dict(sd: dict[str, Tensor], where: str,
                          config: dict[str, object] | None = None) -> tuple[dict[str, Tensor], UNetConfig, str, int]:
    """(original-key state dict, encoder config, family, hint channels) of an original or diffusers layout
    ControlNet; the tensors may be meta tensors (shapes only). ``config``: a diffusers folder's config.json."""
    layout = controlnet_layout(set(sd))
    if layout == "original":
        ldm = original_keys(sd)
    elif layout == "diffusers":
        ldm = diffusers_to_ldm_controlnet(sd)
        if (config or {}).get("controlnet_conditioning_channel_order", "rgb") == "bgr":
            # diffusers flips the control image's channels; flipping the first conv's inputs is the same map
            ldm["input_hint_block.0.weight"] = ldm["input_hint_block.0.weight"].flip(1)
    elif layout == "control_lora":
        raise CheckpointError(f"{where}: is a Control-LoRA; it needs the base model's UNet (merge_control_lora)")
    else:
        raise CheckpointError(f"{where}: unknown layout (first keys: {', '.join(sorted(sd)[:3])}); {_EXPECTED}")
    hint = ldm.get("input_hint_block.0.weight")
    if hint is None or hint.ndim != 4:
        raise CheckpointError(f"{where}: ControlNet without a usable input_hint_block.0.weight; the file is damaged")
    try:
        cfg = infer_encoder_config(ldm)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: ControlNet encoder not understood: {e}") from None
    family = controlnet_family(cfg, where)
    return ldm, _with_family_heads(cfg, family), family, int(hint.shape[1])


def merge_control_lora(sd: dict[str, Tensor], base: UNetModel, where: str, device: torch.device | str,
                       dtype: torch.dtype) -> tuple[dict[str, Tensor], int]:
    """(ControlNet state dict, hint channels) of a Control-LoRA on ``base``: for every ControlNet tensor, the
    file's full tensor if it has one, else the base UNet's, plus ``up.flatten(1) @ down.flatten(1)`` reshaped when
    the file has a low-rank pair for it (unscaled, computed in fp32; ComfyUI ``ControlLora.pre_run``,
    ``ControlLoraOps``). Tensors not named ``.up`` / ``.down`` / ``.weight`` / ``.bias`` (the ``lora_controlnet``
    marker) are not weights and are skipped, as ComfyUI does."""
    hint = sd.get("input_hint_block.0.weight")
    if hint is None or hint.ndim != 4:
        raise CheckpointError(f"{where}: Control-LoRA without input_hint_block.0.weight; the file is damaged")
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in ControlNetModel(base.config, int(hint.shape[1])).state_dict().items()}
    # ComfyUI sets only .up / .down / .weight / .bias tensors without "__" in the name; the rest is not weights
    sd = {k: v for k, v in sd.items() if k.endswith((".up", ".down", ".weight", ".bias")) and "__" not in k}
    pairs = {k[: -len(".up")] for k in sd if k.endswith(".up")}
    if pairs != {k[: -len(".down")] for k in sd if k.endswith(".down")}:
        raise CheckpointError(f"{where}: Control-LoRA with unpaired up/down tensors; the file is damaged")
    full = {k: v for k, v in sd.items() if not k.endswith((".up", ".down"))}
    stray = sorted((set(full) - set(want)) | {p for p in pairs if f"{p}.weight" not in want})
    if stray:
        raise CheckpointError(
            f"{where}: Control-LoRA keys that fit no ControlNet of this model ({len(stray)}, e.g. {stray[0]!r}); "
            "it was made for another model: pick the Control-LoRA of this model's family"
        )
    base_sd = base.state_dict()
    out: dict[str, Tensor] = {}
    for key, shape in want.items():
        w = full.get(key, base_sd.get(key))
        if w is None:
            raise CheckpointError(f"{where}: Control-LoRA lacks {key!r} and the base UNet has none; file damaged")
        stem = key[: -len(".weight")] if key.endswith(".weight") else None
        if stem in pairs:
            up = sd[f"{stem}.up"].to(device, torch.float32).flatten(1)
            down = sd[f"{stem}.down"].to(device, torch.float32).flatten(1)
            if up.shape[1] != down.shape[0] or up.shape[0] * down.shape[1] != w.numel():
                raise CheckpointError(f"{where}: Control-LoRA pair {stem!r} does not fit the base weight {shape}")
            w = w.to(device, torch.float32) + (up @ down).reshape(shape)
        out[key] = w.to(device, dtype)
    return out, int(hint.shape[1])


def load_controlnet(path: str | Path, *, base: UNetModel | None = None, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> ControlFile:
    """Read a ControlNet file or diffusers folder of any layout into a ControlNetModel, or a T2I-Adapter file into a
    T2IAdapterModel (eval, no grad).

    ``base``: the model's UNet, needed only by Control-LoRA files; device / dtype default to the base's when given,
    else CPU float32.
    """
    p = Path(path)
    sd, config = read_control_weights(p)
    where = str(p)
    layout = controlnet_layout(set(sd))
    dev = device if device is not None else (base.time_embed[0].weight.device if base is not None else "cpu")
    dt = dtype if dtype is not None else (base.dtype if base is not None else torch.float32)
    if layout is None:
        from sumie.adapters.control.t2i_files import is_t2i_adapter, load_t2i_adapter

        if is_t2i_adapter(sd):
            return load_t2i_adapter(p, sd, device=dev, dtype=dt)
    if layout == "control_lora":
        if base is None:
            raise CheckpointError(
                f"{where}: is a Control-LoRA (low-rank deltas on the base model's UNet); it loads only together "
                "with the model it was made for (pass base=the model's UNet)"
            )
        ldm, hint = merge_control_lora(sd, base, where, dev, dt)
        cfg, family = base.config, controlnet_family(base.config, where)
    else:
        ldm, cfg, family, hint = controlnet_state_dict(sd, where, config)
    factory = functools.partial(ControlNetModel, hint_channels=hint)
    model = build_module(factory, cfg, ldm, where, "ControlNet", device=dev, dtype=dt)  # type: ignore[arg-type]
    name = p.name if p.is_dir() else p.stem
    return ControlFile(path=p, name=name, kind="controlnet", family=family, model=model, hint_channels=hint,
                       layout=str(layout))


def check_family(control: ControlFile, model_family: str) -> None:
    """ConfigError when a control model was made for another family than the model's."""
    if control.family != model_family:
        what = "ControlNet" if control.kind == "controlnet" else "T2I-Adapter"
        raise ConfigError(
            f"{what} {control.name} is for {control.family}; the model is {model_family}: "
            f"pick a {what} made for {model_family}"
        )
