"""LoRA module names: kohya (``lora_unet_*``, ``lora_te*_*``) and diffusers/PEFT paths -> Sumie's weight keys.

Every name is computed from a module Sumie has (A1111's approach): a kohya name cannot be turned back into a path
by replacing ``_`` with ``.`` (``to_out_0``, ``ff_net_0_proj``, ``self_attn_q_proj``). UNet modules get two kohya
names, one in diffusers' block layout (``down_blocks_0_attentions_0``, what kohya writes for SD1/SD2) and one in the
original layout (``input_blocks_1_1``, what it writes for SDXL); both are accepted for every family. diffusers/PEFT
names are dotted diffusers paths under ``unet.``, ``text_encoder.`` and ``text_encoder_2.``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import nn

from sumie.checkpoints.keymaps.unet import ldm_to_diffusers_unet
from sumie.configs import ModelConfig, UNetConfig
from sumie.errors import ConfigError

if TYPE_CHECKING:
    from sumie.checkpoints.loader import StableDiffusionModels

# Module types whose weights a LoRA-family file can change (norms and embeddings only by full-diff files).
_PATCHABLE = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.Embedding)
_UNET = "unet"
_DIFFUSERS_UNET_LAYOUT = ("sd1", "sd2")  # kohya names these families' UNet modules in diffusers' layout
# Module-name endings a plain kohya LoRA targets: inside SpatialTransformers, and in CLIP's attention and MLP.
_LORA_UNET = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
_LORA_TEXT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
# What LoCon adds in the UNet: ResBlock convs, timestep projection and skip, down/upsampler convs.
_CONV_UNET = ("in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection", ".op", ".conv")


def text_prefixes(config: ModelConfig, component: str) -> tuple[str, str]:
    """(kohya prefix, diffusers prefix) of one text encoder: ``lora_te_`` / ``text_encoder.`` for a single encoder,
    ``lora_te1_`` / ``text_encoder.`` and ``lora_te2_`` / ``text_encoder_2.`` for SDXL (the refiner's bigG is
    diffusers' ``text_encoder_2``)."""
    names = [t.name for t in config.text_encoders]
    if component not in names:
        raise ConfigError(f"the {config.family} model has no text encoder {component!r}; it has {names}")
    if config.family == "sdxl_refiner":
        return "lora_te2_", "text_encoder_2."
    if len(names) == 1:
        return "lora_te_", "text_encoder."
    i = names.index(component)
    return f"lora_te{i + 1}_", ("text_encoder." if i == 0 else f"text_encoder_{i + 1}.")


def _kohya(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


def _diffusers_unet_paths(cfg: UNetConfig, paths: Iterable[str]) -> dict[str, str]:
    """Sumie (original-layout) UNet module path -> diffusers module path, through the checkpoint key map."""
    renamed = ldm_to_diffusers_unet({f"{p}.weight": p for p in paths}, cfg)  # type: ignore[misc]
    return {ldm: key.removesuffix(".weight") for key, ldm in renamed.items()}  # type: ignore[misc]


def _patchable(module: nn.Module) -> list[str]:
    """Paths of the modules with a weight a LoRA file can change."""
    return [n for n, m in module.named_modules()
            if isinstance(m, _PATCHABLE) and getattr(m, "weight", None) is not None]


def kohya_name(models_config: ModelConfig, component: str, module_path: str) -> str:
    """The kohya name of one Sumie module (``component`` "unet", "clip_l", "clip_g" or "clip_h"; ``module_path`` in
    Sumie's layout, e.g. ``input_blocks.1.1.transformer_blocks.0.attn1.to_q``), as kohya's sd-scripts writes it."""
    if component == _UNET:
        if models_config.family not in _DIFFUSERS_UNET_LAYOUT:
            return _kohya("lora_unet_", module_path)
        mapped = _diffusers_unet_paths(models_config.unet, [module_path])
        return _kohya("lora_unet_", mapped[module_path])
    return _kohya(text_prefixes(models_config, component)[0], module_path)


def _add(out: dict[str, str], name: str, key: str) -> None:
    other = out.setdefault(name, key)
    if other != key:  # two modules behind one name would make the file ambiguous
        raise ConfigError(f"LoRA name {name!r} matches both {other!r} and {key!r}")


def targets_for_modules(config: ModelConfig, modules: Mapping[str, nn.Module]) -> dict[str, str]:
    """:func:`lora_targets` for explicit component modules (``{"unet": ..., "clip_l": ...}``)."""
    out: dict[str, str] = {}
    unet = modules.get(_UNET)
    if unet is not None:
        paths = _patchable(unet)
        diffusers = _diffusers_unet_paths(config.unet, paths)
        for p in paths:
            key = f"{_UNET}.{p}.weight"
            _add(out, _kohya("lora_unet_", p), key)
            if p in diffusers:
                _add(out, _kohya("lora_unet_", diffusers[p]), key)
                _add(out, f"unet.{diffusers[p]}", key)
    for t in config.text_encoders:
        te = modules.get(t.name)
        if te is None:
            continue
        kohya, dotted = text_prefixes(config, t.name)
        for p in _patchable(te):
            key = f"{t.name}.{p}.weight"
            _add(out, _kohya(kohya, p), key)
            _add(out, dotted + p, key)
            if p.startswith("text_model."):  # transformers >= 5 names CLIPTextModel's modules without it
                _add(out, dotted + p.removeprefix("text_model."), key)
    return out


def lora_targets(models: StableDiffusionModels) -> dict[str, str]:
    """Every accepted LoRA module name -> the ModelPatcher key of the weight it changes.

    E.g. ``lora_unet_down_blocks_0_attentions_0_proj_in`` and ``unet.down_blocks.0.attentions.0.proj_in`` ->
    ``unet.input_blocks.1.1.proj_in.weight``; ``lora_te2_text_model_encoder_layers_0_self_attn_q_proj`` ->
    ``clip_g.text_model.encoder.layers.0.self_attn.q_proj.weight``. Bias keys are the same with ``.bias``.
    """
    return targets_for_modules(models.config, models.modules())


@lru_cache(maxsize=8)
def _meta_component(config: ModelConfig, component: str) -> nn.Module:
    """The component's module tree on the meta device (no weights), for names and types only."""
    from sumie.checkpoints.loader import _SkipInit
    from sumie.models.clip import CLIPTextModel
    from sumie.models.unet import UNetModel

    with torch.device("meta"), _SkipInit():
        if component == _UNET:
            return UNetModel(config.unet)
        for t in config.text_encoders:
            if t.name == component:
                return CLIPTextModel(t)
    raise ConfigError(f"the {config.family} model has no component {component!r}; it has "
                      f"{[_UNET] + [t.name for t in config.text_encoders]}")


def default_targets(config: ModelConfig, component: str, kind: str) -> list[str]:
    """The module paths (Sumie layout) a kohya LoRA targets: kind "lora" the transformer Linear / 1x1 layers and
    CLIP attention + MLP (192 UNet + 72 CLIP modules on SD1.5); kind "conv" what LoCon adds to those (ResBlock
    convs, ``emb_layers``, skips, down/upsampler convs: 86 more on SD1.5; none in a text encoder)."""
    if kind not in ("lora", "conv"):
        raise ConfigError(f"unknown LoRA target kind {kind!r}; use 'lora' or 'conv'")
    module = _meta_component(config, component)
    types = (nn.Linear, nn.Conv2d)
    if component == _UNET:
        ends = _LORA_UNET if kind == "lora" else _CONV_UNET
    else:
        ends = _LORA_TEXT if kind == "lora" else ()
    out = []
    for name, m in module.named_modules():
        if not isinstance(m, types) or not any(name.endswith(e if e.startswith(".") else "." + e) for e in ends):
            continue
        out.append(name)
    return out
