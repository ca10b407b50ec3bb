"""Upscaler files: detect the architecture and its sizes from the state dict, rename old layouts, build and load.

Covered (as spandrel recognises them):

* ESRGAN / RRDBNet: the old ESRGAN layout (``model.0``, ``model.1.sub.N.RDB1.conv1.0``, ``model.1.sub.{nb}``,
  ``model.3`` / ``model.6`` upsampling convs, then HR conv and last conv), BSRGAN / RealSR's (``RRDB_trunk``,
  ``trunk_conv``, ``upconv1``, ``HRconv``) and BasicSR / Real-ESRGAN's (``conv_first``, ``body.N.rdb1.conv1``,
  ``conv_body``, ``conv_up1/2``, ``conv_hr``, ``conv_last``); a first conv with 4x / 16x the output channels means a
  pixel-unshuffle input (Real-ESRGAN x2plus / x1);
* Real-ESRGAN's SRVGGNetCompact (``body.N`` convs and PReLUs only);
* SwinIR (``layers.N.residual_group.blocks.M.attn.relative_position_bias_table``): classical (pixelshuffle),
  lightweight (pixelshuffledirect), real-world (nearest+conv) and scale-1 restoration heads, ``1conv`` / ``3conv``.

Real-ESRGAN / BasicSR ``.pth`` files wrap the weights in ``params_ema`` (preferred) or ``params``; a ``module.``
prefix (DataParallel) is dropped.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sumie.errors import CheckpointError

__all__ = ["ARCHITECTURES", "Upscaler", "UpscalerSpec", "build_upscaler", "detect_upscaler", "load_upscaler",
           "upscaler_state_dict"]

ARCHITECTURES = ("ESRGAN", "SRVGGNetCompact", "SwinIR")


@dataclass(frozen=True)
class UpscalerSpec:
    """What the keys say: architecture, output scale, channels and the constructor's arguments."""

    arch: str
    scale: int
    in_ch: int
    out_ch: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    layout: str = ""  # which key layout the file used

    def describe(self) -> str:
        """One line, e.g. ``ESRGAN x4 (old layout, feat=64, blocks=23, grow=32)``."""
        shown = ", ".join(f"{k}={v}" for k, v in self.kwargs.items() if k not in ("in_ch", "out_ch"))
        return f"{self.arch} x{self.scale} ({self.layout} layout, {shown})"


@dataclass
class Upscaler:
    """A loaded upscaler: the module (eval mode) and its spec; ``scale`` is the output / input size ratio."""

    module: nn.Module
    spec: UpscalerSpec
    name: str = ""

    @property
    def scale(self) -> int:
        """Output size / input size."""
        return self.spec.scale


def _indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) over the keys."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.fullmatch(k))})


def upscaler_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Unwrap ``params_ema.`` / ``params.`` groups (EMA preferred) and a ``module.`` prefix."""
    out = dict(sd)
    for group in ("params_ema.", "params."):
        inner = {k[len(group):]: v for k, v in out.items() if k.startswith(group)}
        if inner:
            out = inner
            break
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


# ------------------------------------------------------------------------------------------------ ESRGAN


def _esrgan_old_to_new(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The old ``model.N`` layout -> BasicSR names (upsampling convs at 3, 6, ...; HR conv and last after them)."""
    out: dict[str, Tensor] = {}
    rdb = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)")
    blocks = _indices(sd, r"model\.1\.sub\.(\d+)\.RDB1\.conv1\.0\.weight")
    trunk = len(blocks)
    convs = _indices(sd, r"model\.(\d+)\.weight")
    tail = [i for i in convs if i >= 2]
    if len(tail) < 2:
        raise CheckpointError("old ESRGAN layout without the final convs (model.N.weight for N >= 2)")
    ups, hr, last = tail[:-2], tail[-2], tail[-1]
    n = len(ups)
    if ups != [3 * (k + 1) for k in range(n)] or hr != 3 * n + 2 or last != 3 * n + 4:
        raise CheckpointError(f"old ESRGAN layout with unexpected layer indices {tail}; expected upsampling convs "
                              "at model.3, model.6, ... then the HR conv and the last conv two apart")
    for k, v in sd.items():
        if m := rdb.fullmatch(k):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = v
            continue
        m = re.fullmatch(r"model\.(\d+)\.(weight|bias)", k)
        sub = re.fullmatch(rf"model\.1\.sub\.{trunk}\.(weight|bias)", k)
        if sub:
            out[f"conv_body.{sub[1]}"] = v
        elif m and int(m[1]) == 0:
            out[f"conv_first.{m[2]}"] = v
        elif m and int(m[1]) in ups:
            out[f"conv_up{ups.index(int(m[1])) + 1}.{m[2]}"] = v
        elif m and int(m[1]) == hr:
            out[f"conv_hr.{m[2]}"] = v
        elif m and int(m[1]) == last:
            out[f"conv_last.{m[2]}"] = v
        else:
            out[k] = v  # left for load_state_dict to report as unexpected
    return out


_BSRGAN = [(r"RRDB_trunk\.(\d+)\.RDB(\d)\.conv(\d)\.", r"body.\1.rdb\2.conv\3."), (r"trunk_conv\.", "conv_body."),
           (r"upconv(\d)\.", r"conv_up\1."), (r"HRconv\.", "conv_hr.")]


def _detect_esrgan(sd: dict[str, Tensor]) -> tuple[UpscalerSpec, dict[str, Tensor]]:
    if "model.0.weight" in sd:
        if any(".conv1x1." in k for k in sd):
            raise CheckpointError("ESRGAN+ (RDBs with conv1x1) is not supported; use an ESRGAN / Real-ESRGAN model")
        sd, layout = _esrgan_old_to_new(sd), "old ESRGAN"
    elif "RRDB_trunk.0.RDB1.conv1.weight" in sd:
        renamed = {}
        for k, v in sd.items():
            for pat, rep in _BSRGAN:
                k = re.sub("^" + pat, rep, k)
            renamed[k] = v
        sd, layout = renamed, "BSRGAN"
    else:
        layout = "BasicSR"
    first, last = sd["conv_first.weight"], sd["conv_last.weight"]
    in_total, feat, out_ch = first.shape[1], first.shape[0], last.shape[0]
    unshuffle = 1
    for f in (2, 4):
        if in_total == out_ch * f * f:
            unshuffle = f
    in_ch = in_total // unshuffle**2
    blocks = len(_indices(sd, r"body\.(\d+)\.rdb1\.conv1\.weight"))
    grow = sd["body.0.rdb1.conv1.weight"].shape[0] if blocks else 32
    num_up = len(_indices(sd, r"conv_up(\d+)\.weight"))
    if 2**num_up % unshuffle:
        raise CheckpointError(f"ESRGAN with {num_up} upsampling convs and a pixel-unshuffle by {unshuffle}: "
                              "not a whole scale")
    kwargs = {"in_ch": in_ch, "out_ch": out_ch, "feat": feat, "blocks": blocks, "grow": grow, "num_up": num_up,
              "unshuffle": unshuffle}
    return UpscalerSpec("ESRGAN", 2**num_up // unshuffle, in_ch, out_ch, kwargs, layout), sd


# ------------------------------------------------------------------------------------------------ SRVGG


def _detect_srvgg(sd: dict[str, Tensor]) -> tuple[UpscalerSpec, dict[str, Tensor]]:
    idx = _indices(sd, r"body\.(\d+)\.weight")
    convs = [i for i in idx if sd[f"body.{i}.weight"].ndim == 4]
    if len(convs) < 2 or any(sd[f"body.{i}.weight"].ndim != 1 for i in idx if i not in convs):
        raise CheckpointError("SRVGGNetCompact layout with unexpected body layers")
    prelus = [i for i in idx if i not in convs]
    if convs != list(range(0, 2 * len(convs) - 1, 2)) or prelus != [i + 1 for i in convs[:-1]]:
        raise CheckpointError("SRVGGNetCompact without PReLU layers between its convs is not supported (the "
                              "activation cannot be told from the weights)")
    first, last = sd["body.0.weight"], sd[f"body.{convs[-1]}.weight"]
    in_ch, feat = first.shape[1], first.shape[0]
    scale = math.isqrt(last.shape[0] // in_ch)
    if scale * scale * in_ch != last.shape[0]:
        raise CheckpointError(f"SRVGGNetCompact whose last conv has {last.shape[0]} channels: not in_ch * scale^2")
    kwargs = {"in_ch": in_ch, "out_ch": in_ch, "feat": feat, "num_conv": len(convs) - 2, "scale": scale}
    return UpscalerSpec("SRVGGNetCompact", scale, in_ch, in_ch, kwargs, "Real-ESRGAN"), sd


# ------------------------------------------------------------------------------------------------ SwinIR


def _detect_swinir(sd: dict[str, Tensor]) -> tuple[UpscalerSpec, dict[str, Tensor]]:
    for marker, arch in ((".cpb_mlp.", "Swin2SR"), (".overlap_attn.", "HAT"), (".conv_block.", "HAT")):
        if any(marker in k for k in sd):
            raise CheckpointError(f"{arch} upscalers are not supported; supported: {', '.join(ARCHITECTURES)}")
    if "absolute_pos_embed" in sd:
        raise CheckpointError("SwinIR with an absolute position embedding (ape=True) is not supported")
    sd = {k: v for k, v in sd.items() if not k.endswith(("attn.relative_position_index", "attn_mask"))}
    first = sd["conv_first.weight"]
    embed, in_ch = first.shape[0], first.shape[1]
    layers = _indices(sd, r"layers\.(\d+)\.residual_group\.blocks\.0\.norm1\.weight")
    depths = [len(_indices(sd, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.norm1\.weight")) for i in layers]
    tables = [sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"] for i in layers]
    heads = [t.shape[1] for t in tables]
    window = (math.isqrt(tables[0].shape[0]) + 1) // 2
    mlp_ratio = sd["layers.0.residual_group.blocks.0.mlp.fc1.weight"].shape[0] / embed
    resi = "3conv" if "conv_after_body.4.weight" in sd else "1conv"
    num_feat = 64
    if "conv_up1.weight" in sd:
        upsampler, scale = "nearest+conv", 4 if "conv_up2.weight" in sd else 2
        num_feat, out_ch = sd["conv_up1.weight"].shape[0], sd["conv_last.weight"].shape[0]
    elif "conv_before_upsample.0.weight" in sd:
        upsampler = "pixelshuffle"
        num_feat, out_ch = sd["conv_before_upsample.0.weight"].shape[0], sd["conv_last.weight"].shape[0]
        ups = [sd[f"upsample.{i}.weight"].shape[0] // num_feat for i in _indices(sd, r"upsample\.(\d+)\.weight")]
        scale = 3 if ups == [9] else 2 ** len(ups)
    elif "upsample.0.weight" in sd:
        upsampler, out_ch = "pixelshuffledirect", in_ch
        scale = math.isqrt(sd["upsample.0.weight"].shape[0] // out_ch)
    else:
        upsampler, scale, out_ch = "", 1, sd["conv_last.weight"].shape[0]
    kwargs = {"in_ch": in_ch, "out_ch": out_ch, "embed_dim": embed, "depths": tuple(depths), "num_heads": tuple(heads),
              "window_size": window, "mlp_ratio": mlp_ratio, "scale": scale, "upsampler": upsampler,
              "resi_connection": resi, "patch_norm": "patch_embed.norm.weight" in sd,
              "qkv_bias": "layers.0.residual_group.blocks.0.attn.qkv.bias" in sd, "num_feat": num_feat}
    return UpscalerSpec("SwinIR", scale, in_ch, out_ch, kwargs, "SwinIR"), sd


# ------------------------------------------------------------------------------------------------ entry points


def detect_upscaler(sd: Mapping[str, Tensor]) -> tuple[UpscalerSpec, dict[str, Tensor]]:
    """(spec, the state dict renamed to Sumie's module) for an upscaler's state dict; CheckpointError if unknown."""
    sd = upscaler_state_dict(sd)
    try:
        if "layers.0.residual_group.blocks.0.attn.relative_position_bias_table" in sd:
            return _detect_swinir(sd)
        if ("model.0.weight" in sd and "model.1.sub.0.RDB1.conv1.0.weight" in sd) or (
                "conv_first.weight" in sd and "conv_last.weight" in sd
                and ("body.0.rdb1.conv1.weight" in sd or "RRDB_trunk.0.RDB1.conv1.weight" in sd)):
            return _detect_esrgan(sd)
        if "body.0.weight" in sd and all(k.startswith("body.") for k in sd):
            return _detect_srvgg(sd)
    except (KeyError, IndexError, ZeroDivisionError) as e:
        raise CheckpointError(f"upscaler state dict is incomplete ({type(e).__name__}: {e}); the file is damaged "
                              "or of an unsupported variant") from None
    shown = ", ".join(list(sd)[:4]) + (", ..." if len(sd) > 4 else "")
    raise CheckpointError(f"unknown upscaler layout (keys: {shown}); supported: {', '.join(ARCHITECTURES)} "
                          "(ESRGAN / Real-ESRGAN RRDBNet, Real-ESRGAN compact, SwinIR)")


def _module(spec: UpscalerSpec) -> nn.Module:
    if spec.arch == "ESRGAN":
        from sumie.models.upscalers.rrdbnet import RRDBNet

        return RRDBNet(**spec.kwargs)
    if spec.arch == "SRVGGNetCompact":
        from sumie.models.upscalers.srvgg import SRVGGNetCompact

        return SRVGGNetCompact(**spec.kwargs)
    from sumie.models.upscalers.swinir import SwinIR

    return SwinIR(**spec.kwargs)


def build_upscaler(sd: Mapping[str, Tensor], name: str = "") -> Upscaler:
    """Detect, build and load (tensors assigned, not copied: meta tensors give a meta module); eval mode."""
    spec, renamed = detect_upscaler(sd)
    module = _module(spec)
    try:
        result = module.load_state_dict(renamed, strict=False, assign=True)
    except RuntimeError as e:  # shapes that do not fit the detected sizes
        first = str(e).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{name or 'upscaler'}: detected {spec.describe()} but a tensor does not fit: "
                              f"{first}") from None
    if result.missing_keys or result.unexpected_keys:
        def short(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")

        raise CheckpointError(f"{name or 'upscaler'}: detected {spec.describe()} but the keys do not fit: missing "
                              f"[{short(result.missing_keys)}], unexpected [{short(result.unexpected_keys)}]")
    for k, v in renamed.items():
        if not v.is_floating_point():
            raise CheckpointError(f"{name or 'upscaler'}: tensor {k} is {v.dtype}, not floating point")
    return Upscaler(module.eval().requires_grad_(False), spec, name)


def load_upscaler(path: str | os.PathLike[str], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> Upscaler:
    """An upscaler file (.pth through the safe pickle reader, or .safetensors) on ``device`` in ``dtype``."""
    from sumie.checkpoints.io import load_state_dict

    p = Path(path)
    up = build_upscaler(load_state_dict(p), p.stem)
    up.module.to(device=device, dtype=dtype)
    return up
