"""Read a LoRA-family file (kohya/A1111, LyCORIS, diffusers, PEFT) and turn it into ModelPatcher weight patches.

A module's change is ``alpha / rank · ΔW`` (alpha missing: scale 1), ΔW from the module's own tensors in fp32
(:mod:`.lowrank`, :mod:`.lycoris`); rank and alpha are per module, never from the ``ss_*`` metadata. DoRA
(``dora_scale``, Liu et al. 2024) renormalises ``W + alpha/rank · ΔW`` to the stored magnitude along the axis the
magnitude's shape names (per output row, LyCORIS's default, or per input column, kohya's); at strength s the
weight is ``W + s · (W_dora - W)``, as ComfyUI applies it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sumie.adapters.lora import lowrank, lycoris
from sumie.adapters.lora.names import targets_for_modules
from sumie.adapters.patcher import WeightPatch
from sumie.checkpoints.io import SAFETENSORS_EXT, file_metadata, load_state_dict
from sumie.errors import ConfigError

if TYPE_CHECKING:
    from sumie.checkpoints.loader import StableDiffusionModels

FAMILY_NAMES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner"}
_SUFFIXES = sorted({**lowrank.SUFFIXES, **lycoris.SUFFIXES, ".alpha": ("alpha", ""), ".dora_scale": ("dora", "")}
                   .items(), key=lambda kv: -len(kv[0]))
# diffusers UNet roots a file may store without the ``unet.`` prefix (attention-processor files, raw PEFT)
_BARE_UNET = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.")
_PEFT_METADATA = "lora_adapter_metadata"
_PEFT_PREFIXES = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class LoraModule:
    """One module's adapter as stored: its name in the file, kind and tensors (parts), alpha if any."""

    name: str
    kind: str  # "lora", "loha", "lokr" or "full"
    parts: dict[str, Tensor]
    alpha: float | None = None

    @property
    def rank(self) -> int | None:
        """The rank alpha divides by (None: the format has none, scale 1)."""
        return lowrank.rank(self.parts) if self.kind == "lora" else lycoris.rank(self.kind, self.parts)

    @property
    def scale(self) -> float:
        """alpha / rank; 1 without an alpha or a rank."""
        r = self.rank
        return 1.0 if self.alpha is None or r is None else self.alpha / r

    def delta(self, device: torch.device | None = None) -> Tensor | None:
        """The unscaled weight change ΔW in fp32, computed on ``device`` (None for a bias-only module)."""
        parts = self.parts if device is None else {k: v.to(device) for k, v in self.parts.items()}
        return lowrank.delta(parts) if self.kind == "lora" else lycoris.delta(self.kind, parts)

    def bias_delta(self) -> Tensor | None:
        """The unscaled bias change in fp32, or None."""
        return lowrank.bias_delta(self.parts) if self.kind == "lora" else lycoris.bias_delta(self.kind, self.parts)

    def weight_numel(self) -> tuple[int, int] | None:
        """(rows, elements) of ΔW from the part shapes alone (nothing computed), or None for bias-only."""
        p = {k: tuple(v.shape) for k, v in self.parts.items()}
        n = math.prod
        if self.kind == "lora":
            k = p["mid"][2:] if "mid" in p else ()
            return p["up"][0], p["up"][0] * n(p["down"][1:]) * n(k)
        if self.kind == "loha":
            if "hada_t1" in p:
                return p["hada_w1_a"][1], p["hada_w1_a"][1] * p["hada_w1_b"][1] * n(p["hada_t1"][2:])
            return p["hada_w1_a"][0], p["hada_w1_a"][0] * n(p["hada_w1_b"][1:])
        if self.kind == "lokr":
            w1 = p["lokr_w1"] if "lokr_w1" in p else (p["lokr_w1_a"][0], p["lokr_w1_b"][1])
            if "lokr_w2" in p:
                w2: tuple[int, ...] = p["lokr_w2"]
            elif "lokr_t2" in p:
                w2 = (p["lokr_w2_a"][1], p["lokr_w2_b"][1], *p["lokr_t2"][2:])
            else:
                w2 = (p["lokr_w2_a"][0], *p["lokr_w2_b"][1:])
            return w1[0] * w2[0], n(w1) * n(w2)
        return (p["diff"][0], n(p["diff"])) if "diff" in p else None


@dataclass
class LoraPatches:
    """Patcher keys -> patches, split by where the strength comes from; ``skipped``: names Sumie cannot map."""

    text: dict[str, WeightPatch]
    unet: dict[str, WeightPatch]
    skipped: list[str]
    family: str | None


@dataclass
class LoraFile:
    """A parsed LoRA-family file. ``format``: kohya, peft, diffusers, lycoris-locon, loha, lokr, full, dora, mixed."""

    path: str
    metadata: dict[str, str]
    format: str
    family: str | None
    modules: dict[str, LoraModule]
    unknown_keys: list[str] = field(default_factory=list)

    def patches(self, models: StableDiffusionModels) -> LoraPatches:
        """Weight patches for ``models`` (ConfigError when the file is for another family or shapes disagree)."""
        return build_patches(self, models.config.family, targets_for_modules(models.config, models.modules()),
                             _weight_shapes(models))


def _weight_shapes(models: StableDiffusionModels) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for comp, module in models.modules().items():
        if comp == "vae":
            continue
        for name, t in module.named_parameters():
            out[f"{comp}.{name}"] = tuple(t.shape)
    return out


# ------------------------------------------------------------------------------------------------- parsing

def _split_key(key: str) -> tuple[str, str, str] | None:
    """(module name, part, style) of one file key, or None when no format knows it."""
    old = lowrank.split_processor_key(key)
    if old is not None:
        return old[0], old[1], "diffusers"
    for suffix, (part, style) in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], part, style
    return None


def _normalize(name: str) -> str:
    """The name as :func:`lora_targets` spells it: ``unet.`` added to bare diffusers UNet paths."""
    name = name.removeprefix("base_model.model.")
    return "unet." + name if name.startswith(_BARE_UNET) else name


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata`` (PEFT LoraConfig per component), keyed by component prefix."""
    raw = metadata.get(_PEFT_METADATA)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, dict] = {}
    for key, value in data.items() if isinstance(data, dict) else ():
        prefix, _, field_name = key.rpartition(".")
        if prefix in _PEFT_PREFIXES:
            out.setdefault(prefix, {})[field_name] = value
    return out


def _peft_alpha(config: dict, component: str, name: str, rank: int) -> float | None:
    """PEFT's lora_alpha for one module (alpha_pattern first), as an alpha over the true rank (rsLoRA folded)."""
    alpha = config.get("lora_alpha")
    rel = name.removeprefix(component + ".")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", rel):
            alpha = value
            break
    if alpha is None:
        return None
    return float(alpha) * math.sqrt(rank) if config.get("use_rslora") else float(alpha)


def parse_lora(sd: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, path: str = "<memory>") -> (
        LoraFile):
    """Parse a LoRA state dict (keys as stored) into modules; ConfigError when nothing in it is a LoRA module."""
    metadata = dict(metadata or {})
    grouped: dict[str, dict[str, Tensor]] = {}
    styles: dict[str, set[str]] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        split = _split_key(key) if isinstance(value, Tensor) else None
        if split is None:
            unknown.append(key)
            continue
        name, part, style = split
        name = _normalize(name)
        grouped.setdefault(name, {})[part] = value
        if style:
            styles.setdefault(name, set()).add(style)
    peft = _peft_alphas(metadata)
    modules: dict[str, LoraModule] = {}
    for name, parts in grouped.items():
        alpha_t, dora = parts.pop("alpha", None), parts.get("dora")
        kind = "lora" if lowrank.PARTS & parts.keys() else lycoris.kind_of(parts)
        if kind is None:  # only an alpha or a dora_scale: nothing to apply
            unknown.extend(f"{name}.{p}" for p, t in (("alpha", alpha_t), ("dora_scale", dora)) if t is not None)
            continue
        lack = lowrank.missing(parts) if kind == "lora" else lycoris.missing(kind, parts)
        if lack:
            raise ConfigError(f"{path}: LoRA module {name!r} lacks {', '.join(lack)}; the file is incomplete or "
                              "damaged")
        module = LoraModule(name, kind, parts, None if alpha_t is None else float(alpha_t.float().item()))
        if module.alpha is None and kind == "lora" and styles.get(name) == {"peft"}:
            comp = name.split(".", 1)[0]
            if comp in peft:
                module.alpha = _peft_alpha(peft[comp], comp, name, lowrank.rank(parts))
        modules[name] = module
    if not modules:
        shown = ", ".join(repr(k) for k in list(sd)[:3])
        raise ConfigError(f"{path}: not a LoRA file: none of its {len(sd)} keys is a LoRA/LyCORIS module "
                          f"(e.g. {shown}); pass a LoRA, not a checkpoint or an embedding")
    return LoraFile(path=path, metadata=metadata, format=_format(modules, styles, metadata),
                    family=guess_family(modules), modules=modules, unknown_keys=unknown)


def read_lora(path: str | os.PathLike[str]) -> LoraFile:
    """Read a LoRA-family file (.safetensors, or a pickle through the safe loader)."""
    p = Path(path)
    sd = load_state_dict(p)
    meta = file_metadata(p) if p.suffix.lower() in SAFETENSORS_EXT else {}
    return parse_lora(sd, meta, str(p))


def _format(modules: Mapping[str, LoraModule], styles: Mapping[str, set[str]], metadata: Mapping[str, str]) -> str:
    """One word for the file's format (see :class:`LoraFile`)."""
    found: set[str] = set()
    lycoris_meta = "lycoris" in metadata.get("ss_network_module", "")
    for name, m in modules.items():
        if "dora" in m.parts:
            found.add("dora")
        elif m.kind != "lora":
            found.add(m.kind)
        elif "mid" in m.parts or lycoris_meta:
            found.add("lycoris-locon")
        else:
            found |= styles.get(name, {"kohya"})
    return found.pop() if len(found) == 1 else "mixed"


# ------------------------------------------------------------------------------------------------- family

_CTX = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}
_TEXT_WIDTH = {768: "sd1", 1024: "sd2"}
_XL_TEXT = ("lora_te1_", "lora_te2_", "text_encoder_2.")
_SINGLE_TEXT = ("lora_te_", "text_encoder.")
_DEEP = re.compile(r"transformer_blocks[._][1-9]")  # SDXL's 2- and 10-deep transformers; SD1/SD2 have one block
_LEVEL0 = re.compile(r"(down_blocks[._]0[._]attentions|input_blocks[._]1[._]1)[._]")  # attention at full size


def _in_features(m: LoraModule) -> int | None:
    p = m.parts
    if m.kind == "lora":
        return int(p["down"].shape[1])
    if m.kind == "loha":
        return int(p["hada_w1_b"].shape[1])
    if m.kind == "lokr":
        c = p["lokr_w1"].shape[1] if "lokr_w1" in p else p["lokr_w1_b"].shape[1]
        d = p["lokr_w2"].shape[1] if "lokr_w2" in p else p["lokr_w2_b"].shape[1]
        return int(c * d)
    return int(p["diff"].shape[1]) if "diff" in p and p["diff"].ndim >= 2 else None


def _ends(name: str, *tails: str) -> bool:
    return any(name.endswith(sep + t.replace(".", sep)) for t in tails for sep in "._")


def guess_family(modules: Mapping[str, LoraModule]) -> str | None:
    """SD1, SD2, SDXL or the SDXL refiner from the file's names and shapes; None when they do not tell."""
    ctx = text_width = None
    xl_names = deep = level0 = False
    proj_in_ndims: set[int] = set()
    for name, m in modules.items():
        xl_names |= name.startswith(_XL_TEXT)
        deep |= bool(_DEEP.search(name))
        level0 |= bool(_LEVEL0.search(name))
        if _ends(name, "attn2.to_k", "attn2.to_v") and ctx is None:
            ctx = _in_features(m)
        if name.startswith(_SINGLE_TEXT) and _ends(name, "q_proj", "k_proj", "v_proj", "mlp.fc1"):
            text_width = _in_features(m)
        if _ends(name, "proj_in") and m.kind == "lora":
            proj_in_ndims.add(m.parts["down"].ndim)
    if ctx == 1280:
        return "sdxl_refiner"
    if xl_names or deep or ctx == 2048:
        return "sdxl"
    if ctx in _CTX:
        return _CTX[ctx]
    if text_width in _TEXT_WIDTH:
        return _TEXT_WIDTH[text_width]
    if level0 and proj_in_ndims:  # SD1's proj_in is a 1x1 conv, SD2's a Linear
        return "sd1" if 4 in proj_in_ndims else "sd2"
    return None


# ------------------------------------------------------------------------------------------------- patches

def _shape_error(path: str, module: LoraModule, key: str, shape: tuple[int, ...], got: object) -> ConfigError:
    return ConfigError(f"{path}: LoRA module {module.name!r} changes {got} but the model's {key!r} has shape "
                       f"{shape}; the LoRA was made for another model")


def _dora_fn(module: LoraModule, dora: Tensor, key: str, path: str) -> Callable[[Tensor], Tensor]:
    """W -> (W + scale·ΔW) · m / ‖W + scale·ΔW‖, the norm per output row or input column as ``m``'s shape says."""
    scale = module.scale

    def fn(w: Tensor) -> Tensor:
        wc = w + scale * module.delta(w.device).reshape(w.shape)  # type: ignore[union-attr]
        m = dora.to(device=w.device, dtype=torch.float32)
        if m.shape[0] == w.shape[0] and m.numel() == w.shape[0]:
            norm = wc.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.ndim - 1))
        elif m.numel() == w.shape[1]:
            norm = wc.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
            norm = norm.reshape(w.shape[1], *[1] * (w.ndim - 1)).transpose(0, 1)
        else:
            raise _shape_error(path, module, key, tuple(w.shape), f"a magnitude of shape {tuple(m.shape)}")
        return wc * (m.reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps))

    return fn


def _delta_fn(module: LoraModule) -> Callable[[Tensor], Tensor]:
    """W -> W + scale·ΔW, ΔW computed when the patcher applies it, on the weight's device."""
    scale = module.scale

    def fn(w: Tensor) -> Tensor:
        return w + scale * module.delta(w.device).reshape(w.shape)  # type: ignore[union-attr]

    return fn


def module_patches(module: LoraModule, key: str, shapes: Mapping[str, tuple[int, ...]], path: str = "<memory>") -> (
        dict[str, WeightPatch]):
    """The patches of one module whose weight is ``key`` (its bias is ``key`` with ``.bias``)."""
    out: dict[str, WeightPatch] = {}
    shape = shapes[key]
    rows_numel = module.weight_numel()
    if rows_numel is not None:
        rows, numel = rows_numel
        if rows != shape[0] or numel != math.prod(shape):
            raise _shape_error(path, module, key, shape, f"{numel} weights in {rows} rows")
        dora = module.parts.get("dora")
        if dora is not None:
            out[key] = WeightPatch(fn=_dora_fn(module, dora, key, path))
        elif module.kind == "full":
            out[key] = WeightPatch(delta=module.parts["diff"])  # the stored difference itself, no scale
        else:
            out[key] = WeightPatch(fn=_delta_fn(module))
    b = module.bias_delta()
    if b is not None:
        bias_key = key.removesuffix(".weight") + ".bias"
        if bias_key not in shapes or b.numel() != math.prod(shapes[bias_key]):
            raise _shape_error(path, module, bias_key, shapes.get(bias_key, ()), f"a bias of shape {tuple(b.shape)}")
        out[bias_key] = WeightPatch(delta=b * module.scale if module.kind == "lora" else b)
    return out


def build_patches(lora: LoraFile, family: str, targets: Mapping[str, str],
                  shapes: Mapping[str, tuple[int, ...]]) -> LoraPatches:
    """:meth:`LoraFile.patches` for a model given by its family, LoRA name table and weight shapes."""
    if lora.family is not None and lora.family != family:
        raise ConfigError(f"{lora.path}: this LoRA is for {FAMILY_NAMES.get(lora.family, lora.family)}, the loaded "
                          f"model is {FAMILY_NAMES.get(family, family)}; use a LoRA made for that model")
    text: dict[str, WeightPatch] = {}
    unet: dict[str, WeightPatch] = {}
    skipped = list(lora.unknown_keys)
    for name, module in lora.modules.items():
        key = targets.get(name)
        if key is None:
            skipped.append(name)
            continue
        for k, patch in module_patches(module, key, shapes, lora.path).items():
            (unet if k.startswith("unet.") else text)[k] = patch
    return LoraPatches(text=text, unet=unet, skipped=skipped, family=lora.family)


# ------------------------------------------------------------------------------------------------- info

def _component(name: str) -> str:
    return "unet" if name.startswith(("lora_unet_", "unet.")) else "text" if name.startswith(
        ("lora_te", "text_encoder")) else "unknown"


def lora_info(path: str | os.PathLike[str]) -> dict[str, object]:
    """What ``sumie lora info`` shows: format, family, per-module kind/rank/alpha, module counts, ss_* metadata."""
    lora = read_lora(path)
    per_module = {
        name: {"kind": m.kind, "rank": m.rank, "alpha": m.alpha, "scale": m.scale, "component": _component(name),
               "dora": "dora" in m.parts, "bias": m.bias_delta() is not None}
        for name, m in lora.modules.items()
    }
    counts: dict[str, int] = {}
    for info in per_module.values():
        counts[str(info["component"])] = counts.get(str(info["component"]), 0) + 1
    return {
        "path": lora.path,
        "format": lora.format,
        "family": lora.family,
        "family_name": FAMILY_NAMES.get(lora.family or "", None),
        "modules": per_module,
        "module_counts": counts,
        "ranks": sorted({m.rank for m in lora.modules.values() if m.rank is not None}),
        "unknown_keys": lora.unknown_keys,
        "metadata": {k: v for k, v in lora.metadata.items() if k.startswith(("ss_", "modelspec."))},
    }
