"""IP-Adapter units of a request: files found by name, checked against the model, images encoded, hooks built.

Everything that can fail (a missing file, an encoder of the wrong width, an adapter for another family, an
unreadable image) fails here, before any sampling step.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sumie.adapters.ip_adapter.files import IPAdapterModel, load_image_encoder, load_ip_adapter
from sumie.adapters.ip_adapter.hook import IPAdapterHook, check_fits, image_tokens, sigma_range
from sumie.checkpoints.io import read_safetensors_header
from sumie.checkpoints.manager import LoadRequest, ModelManager
from sumie.errors import CheckpointError, ConfigError, SumieError
from sumie.models.clip_vision import CLIPVisionModel
from sumie.pipelines.params import IPAdapterUnit

if TYPE_CHECKING:
    from sumie.pipelines.engine import Engine
    from sumie.pipelines.job import Job

__all__ = ["attach_ip_adapters", "find_encoder", "prepare_unit", "register_loaders"]

_ENCODER_FOLDERS = ("image_encoder", "clip_vision")  # IP-Adapter's repo layout: models/image_encoder next to files


def _load_adapter(req: LoadRequest) -> IPAdapterModel:
    return load_ip_adapter(req.path, device=req.device, dtype=req.dtype.unet)


def _load_encoder(req: LoadRequest) -> CLIPVisionModel:
    return load_image_encoder(req.path, device=req.device, dtype=req.dtype.unet)


def register_loaders(manager: ModelManager) -> None:
    """Give the manager loaders for IP-Adapters and CLIP image encoders (once)."""
    if not manager.has_loader("ip_adapter"):
        manager.register_loader("ip_adapter", _load_adapter)
    if not manager.has_loader("clip_vision"):
        manager.register_loader("clip_vision", _load_encoder)


def _encoder_width(path: Path) -> tuple[int, int] | None:
    """(width, projection_dim) of a CLIP vision safetensors file or image_encoder folder from its header, or None."""
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix.lower() not in (".safetensors", ".sft") or not path.is_file():
        return None
    try:
        header, _ = read_safetensors_header(path)
    except SumieError:
        return None
    for prefix in ("", "clip_vision_model.", "image_encoder."):
        cls = header.get(prefix + "vision_model.embeddings.class_embedding")
        proj = header.get(prefix + "visual_projection.weight")
        if cls is not None and proj is not None:
            return int(cls["shape"][0]), int(proj["shape"][0])
    return None


def find_encoder(adapter: IPAdapterModel, adapter_path: Path, manager: ModelManager) -> Path:
    """The CLIP vision encoder an adapter needs when none is named: an ``image_encoder`` folder next to the file (the
    IP-Adapter repository's layout) or a file of the clip_vision folders whose width fits."""
    spec = adapter.spec
    candidates: list[Path] = []
    for up in (adapter_path.parent, adapter_path.parent.parent):
        candidates += [up / f for f in _ENCODER_FOLDERS if (up / f).is_dir()]
    if manager.folders is not None:
        candidates += [f.path for f in manager.folders.list("clip_vision")]
    for c in candidates:
        shape = _encoder_width(c)
        if shape is not None and (shape[1] if spec.kind == "plain" else shape[0]) == spec.embed_dim:
            return c
    what = "projection" if spec.kind == "plain" else "width"
    raise ConfigError(f"IP-Adapter {adapter_path.name} needs a CLIP image encoder ({what} {spec.embed_dim}: "
                      f"{'ViT-bigG/14' if spec.embed_dim in (1280, 1664) and spec.kind == 'plain' else 'ViT-H/14'} "
                      "for the usual files) and none was found; pass encoder= (--clip-vision FILE)")


def _check_unit(unit: IPAdapterUnit, index: int) -> None:
    label = f"IP-Adapter unit {index}"
    if not unit.images:
        raise ConfigError(f"{label}: no reference image; give at least one (--ip-image IMG)")
    if not math.isfinite(unit.weight):
        raise ConfigError(f"{label}: weight must be a finite number, got {unit.weight}")
    if not 0.0 <= unit.start <= unit.end <= 1.0:
        raise ConfigError(f"{label}: start {unit.start} and end {unit.end} must satisfy 0 <= start <= end <= 1")


@torch.no_grad()
def prepare_unit(engine: Engine, unit: IPAdapterUnit, index: int = 0) -> tuple[IPAdapterHook, str]:
    """One unit -> (its hook for the base UNet, its infotext value). Raises before any step on bad input."""
    _check_unit(unit, index)
    manager = engine.manager
    register_loaders(manager)
    unet = engine.models.unet
    path = manager.resolve("ip_adapter", unit.model)
    adapter: IPAdapterModel = manager.get("ip_adapter", path)
    check_fits(adapter, None, unet, path.name)
    enc_path = manager.resolve("clip_vision", unit.encoder) if unit.encoder is not None else find_encoder(
        adapter, path, manager)
    encoder: CLIPVisionModel = manager.get("clip_vision", enc_path)
    check_fits(adapter, encoder, unet, path.name, enc_path.name)
    cond, uncond = image_tokens(adapter, encoder, unit.images)
    hi, lo = sigma_range(engine.discretization, unit.start, unit.end)
    hook = IPAdapterHook.for_unet(adapter, unet, cond, uncond, unit.weight, hi, lo)
    short = manager.hashes.model_hash(path)[:8] if path.is_file() else ""
    name = f"{path.stem} [{short}]" if short else path.stem
    text = (f"Model: {name}, Weight: {unit.weight:g}, Start: {unit.start:g}, End: {unit.end:g}, "
            f"Encoder: {Path(enc_path).stem}, Images: {len(unit.images)}")
    return hook, text


def attach_ip_adapters(engine: Engine, job: Job, units: Sequence[IPAdapterUnit]) -> None:
    """Add the units' hooks to ``job.hooks.unet.extra_kv`` (a copy: the caller's hooks are left alone) and their
    infotext entries (``IP-Adapter N``)."""
    if not units:
        return
    if job.params.refiner is not None:
        raise ConfigError("IP-Adapter with an SDXL refiner is not supported: the adapter fits the base UNet only; "
                          "drop the refiner or the IP-Adapter")
    hooks: list[IPAdapterHook] = []
    for i, unit in enumerate(units):
        try:
            hook, text = prepare_unit(engine, unit, i)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"IP-Adapter unit {i} ({os.fspath(unit.model)}): {e}") from None
        hooks.append(hook)
        job.extra[f"IP-Adapter {i}"] = text
    unet = dataclasses.replace(job.hooks.unet, extra_kv=[*job.hooks.unet.extra_kv, *hooks])
    job.hooks = dataclasses.replace(job.hooks, unet=unet)
