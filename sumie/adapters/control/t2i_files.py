"""T2I-Adapter files: detection, layouts and loading into :class:`~sumie.models.t2i_adapter.T2IAdapterModel`.

Layouts read (original keys are canonical, the diffusers layout is renamed onto them):

* TencentARC's original ``Adapter`` (``t2iadapter_{canny,sketch,depth,openpose,seg,keypose}_sd14v1.pth``,
  ``*_sd15v2``; ``conv_in``, ``body.k.{in_conv,block1,block2,down_opt.op}``) - SD1 when ``conv_in`` takes 64 or 192
  channels (pixel unshuffle 8), SDXL when it takes 256 or 768 (unshuffle 16; TencentARC's own XL files);
* the original ``Adapter_light`` (``t2iadapter_color_sd14v1.pth``; ``body.i.{in_conv,body.j.block1/2,out_conv}``);
* diffusers' ``T2IAdapter`` (``adapter.conv_in``, ``adapter.body.l.{in_conv,resnets.r.block1/2}``): ``full_adapter``
  (SD1), ``full_adapter_xl`` (``t2i-adapter-*-sdxl-1.0``) and ``light_adapter``.

The StyleAdapter (``style_embedding``, ``transformer_layes``) is recognised and refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from sumie.adapters.control.files import ControlFile
from sumie.checkpoints.loader import build_module
from sumie.configs import SD1, SDXL
from sumie.errors import CheckpointError, ConfigError
from sumie.models.t2i_adapter import T2IAdapterConfig, T2IAdapterModel, unet_sites
from sumie.models.unet import UNetModel

__all__ = ["ControlFile", "adapter_config", "diffusers_to_original", "fit_to_unet", "is_t2i_adapter",
           "load_t2i_adapter"]

LEVELS = 4  # every released adapter has four feature levels (SD1: four UNet levels; SDXL: three and the middle)
# cin -> (hint channels, pixel unshuffle, family)
_CIN = {64: (1, 8, "sd1"), 192: (3, 8, "sd1"), 256: (1, 16, "sdxl"), 768: (3, 16, "sdxl")}
_DOWNS = {"sd1": (False, True, True, True), "sdxl": (False, False, True, False)}
_UNETS = {"sd1": SD1.unet, "sdxl": SDXL.unet}


def _layout(keys: Iterable[str]) -> str | None:
    ks = set(keys)
    if "adapter.body.0.resnets.0.block1.weight" in ks:
        return "diffusers_light" if "adapter.body.0.out_conv.weight" in ks else "diffusers_full"
    if "conv_in.weight" in ks and "body.0.block1.weight" in ks:
        return "full"
    if "body.0.in_conv.weight" in ks and "body.0.body.0.block1.weight" in ks and "body.0.out_conv.weight" in ks:
        return "light"
    if "style_embedding" in ks and any(k.startswith("transformer_layes.") for k in ks):
        return "style"
    return None


def is_t2i_adapter(keys: Iterable[str]) -> bool:
    """Whether a state dict's keys are a T2I-Adapter's (original or diffusers layout; the style adapter too)."""
    return _layout(keys) is not None


_DIFF_FULL = re.compile(r"adapter\.body\.(\d+)\.resnets\.(\d+)\.(.+)")
_DIFF_IN = re.compile(r"adapter\.body\.(\d+)\.in_conv\.(.+)")
_DIFF_LIGHT = re.compile(r"adapter\.body\.(\d+)\.(in_conv|out_conv)\.(.+)")


def diffusers_to_original(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``T2IAdapter`` keys -> TencentARC's: ``adapter.body.l.resnets.r`` -> ``body.{l * nums_rb + r}``
    (full), ``adapter.body.i.resnets.j`` -> ``body.i.body.j`` (light). Unknown keys raise KeyError."""
    light = "adapter.body.0.out_conv.weight" in sd
    nums_rb = 1 + max((int(m.group(2)) for k in sd if (m := _DIFF_FULL.fullmatch(k))), default=-1)
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("adapter.conv_in.") and not light:
            out[k.removeprefix("adapter.")] = v
        elif m := _DIFF_FULL.fullmatch(k):
            lvl, r, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            out[f"body.{lvl}.body.{r}.{rest}" if light else f"body.{lvl * nums_rb + r}.{rest}"] = v
        elif light and (m := _DIFF_LIGHT.fullmatch(k)):
            out[f"body.{m.group(1)}.{m.group(2)}.{m.group(3)}"] = v
        elif not light and (m := _DIFF_IN.fullmatch(k)):
            out[f"body.{int(m.group(1)) * nums_rb}.in_conv.{m.group(2)}"] = v
        else:
            raise KeyError(k)
    return out


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def adapter_config(sd: Mapping[str, Tensor]) -> tuple[T2IAdapterConfig, str]:
    """(config, family) of an original-layout state dict, from its shapes; ValueError names what does not fit."""
    keys = list(sd)
    layout = _layout(keys)
    if layout == "full":
        cin = sd["conv_in.weight"].shape[1]
        blocks = _indices(keys, r"body\.(\d+)\.")
        if blocks != list(range(len(blocks))) or len(blocks) % LEVELS:
            raise ValueError(f"{len(blocks)} body blocks; expected {LEVELS} levels of equally many")
        nums_rb = len(blocks) // LEVELS
        channels = tuple(sd[f"body.{lvl * nums_rb}.block1.weight"].shape[0] for lvl in range(LEVELS))
        ksize = sd["body.0.block2.weight"].shape[-1]
        conv_down = any(k.endswith("down_opt.op.weight") for k in keys)
        kind: Literal["full", "light"] = "full"
    elif layout == "light":
        cin = sd["body.0.in_conv.weight"].shape[1]
        levels = _indices(keys, r"body\.(\d+)\.")
        if len(levels) != LEVELS:
            raise ValueError(f"{len(levels)} light-adapter levels; expected {LEVELS}")
        nums_rb = len(_indices(keys, r"body\.0\.body\.(\d+)\."))
        channels = tuple(sd[f"body.{lvl}.out_conv.weight"].shape[0] for lvl in range(LEVELS))
        ksize, conv_down, kind = 1, False, "light"
    elif layout == "style":
        raise ValueError("this is a T2I style adapter (CLIP-vision tokens added to the prompt), which Sumie does "
                         "not support: use an IP-Adapter for image prompts")
    else:
        raise ValueError("not a T2I-Adapter layout (no conv_in / body.0.block1 or body.0.in_conv / out_conv keys)")
    if cin not in _CIN:
        raise ValueError(f"conv_in takes {cin} channels; known adapters take 64 or 192 (SD1: 1 or 3 channels "
                         "unshuffled by 8) or 256 or 768 (SDXL: unshuffled by 16)")
    _, unshuffle, family = _CIN[cin]
    if kind == "light" and family != "sd1":
        raise ValueError(f"a light adapter taking {cin} channels; only SD1 light adapters (64 or 192) exist")
    cfg = T2IAdapterConfig(kind=kind, cin=cin, unshuffle=unshuffle, channels=channels, nums_rb=nums_rb,
                           ksize=ksize, conv_down=conv_down, downs=_DOWNS[family],
                           sites=unet_sites(_UNETS[family], LEVELS))
    return cfg, family


def load_t2i_adapter(path: Path, sd: Mapping[str, Tensor], *, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None) -> ControlFile:
    """A T2I-Adapter from its state dict ``sd`` (read from ``path``, which names it): original or diffusers keys.

    Raises CheckpointError naming the file when the layout is unknown or a tensor is missing or has the wrong shape.
    """
    path = Path(path)
    try:
        if _layout(sd) in ("diffusers_full", "diffusers_light"):
            sd = diffusers_to_original(sd)
        cfg, family = adapter_config(sd)
    except KeyError as e:
        raise CheckpointError(f"T2I-Adapter {path.name}: unexpected tensor {e.args[0]!r} in a diffusers "
                              "T2IAdapter file; the file is damaged or of another kind") from None
    except ValueError as e:
        raise CheckpointError(f"T2I-Adapter {path.name}: {e}") from None
    model = build_module(T2IAdapterModel, cfg, sd, f"T2I-Adapter {path.name}", "T2I-Adapter", device, dtype)
    return ControlFile(path=path, name=path.stem, kind="t2i_adapter", family=family, model=model, hint_channels=3,
                       layout="t2i_adapter")



def fit_to_unet(control: ControlFile, unet: UNetModel, family: str) -> None:
    """Place a T2I-Adapter's features where this UNet's levels end (diffusers' rule); ConfigError when their widths
    do not fit the UNet's (of model ``family``). Sets ``control.model.config.sites``; a ControlNet is left as it is."""
    if control.kind != "t2i_adapter":
        return
    adapter = control.model
    sites = unet_sites(unet.config, len(adapter.config.sites))  # type: ignore[union-attr, arg-type]
    widths = unet.skip_channels
    wanted = [widths[-1] if s == "middle" else widths[s] for s in sites]
    have = list(adapter.config.channels)  # type: ignore[union-attr]
    if have != wanted:
        raise ConfigError(f"T2I-Adapter {control.name} makes features of widths {have}; this UNet needs {wanted}: "
                          f"pick an adapter made for {family}")
    adapter.config = dataclasses.replace(adapter.config, sites=sites)  # type: ignore[union-attr]
