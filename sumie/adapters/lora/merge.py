"""Merge LoRAs into a checkpoint for good: the runtime patch (the same code path), saved as a new single file."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sumie.adapters.lora.handler import AppliedLora, LoraSet, build_lora_patcher
from sumie.adapters.lora.library import LoraLibrary
from sumie.adapters.patcher import ModelPatcher
from sumie.checkpoints.loader import StableDiffusionModels
from sumie.errors import ConfigError
from sumie.pipelines.params import LoraSpec

__all__ = ["MergeResult", "merge_loras", "save_merged"]

MERGE_METADATA_KEY = "sumie.lora_merge"
_KEPT_METADATA = ("sumie.resolution", "sumie.cfg_scale")  # model facts the merged file keeps from its source


def merge_loras(models: StableDiffusionModels, specs: Sequence[LoraSpec], library: LoraLibrary | None = None, *,
                strict: bool = False) -> LoraSet:
    """Patch ``models`` with ``specs`` exactly as a request would (``set.patcher.unpatch()`` undoes it)."""
    if not specs:
        raise ConfigError("no LoRA to merge; give at least one LORA[:WEIGHT]")
    lora_set = build_lora_patcher(ModelPatcher.for_models(models), models, specs, library or LoraLibrary(),
                                  strict=strict)
    if not any(a.applied for a in lora_set.loras):
        raise ConfigError("none of the LoRAs matches this model; nothing to merge")
    lora_set.patcher.patch()
    return lora_set


@dataclass(frozen=True)
class MergeResult:
    """What :func:`save_merged` wrote: the file, the LoRAs in it, notes (skipped modules, shared names)."""

    path: Path
    loras: list[AppliedLora]
    notes: list[str]


def save_merged(models: StableDiffusionModels, specs: Sequence[LoraSpec], out: str | os.PathLike[str], *,
                library: LoraLibrary | None = None, dtype: torch.dtype | None = None, strict: bool = False,
                source_metadata: dict[str, str] | None = None) -> MergeResult:
    """Merge ``specs`` into ``models`` and write them as a single-file checkpoint (atomic; A1111/ComfyUI layout).

    ``dtype``: the stored dtype of floating tensors (None: the modules' own). The models are unpatched again
    afterwards. The file's metadata lists the LoRAs with their hashes and weights (``sumie.lora_merge``).
    """
    from sumie.checkpoints.save import save_single_file

    lib = library or LoraLibrary()
    lora_set = merge_loras(models, specs, lib, strict=strict)
    try:
        record = [{"name": a.name, "file": a.path.name, "hash": lib.shorthash(a.path), "te": a.te, "unet": a.unet}
                  for a in lora_set.loras if a.applied]
        metadata = {k: v for k, v in (source_metadata or {}).items() if k in _KEPT_METADATA}
        metadata[MERGE_METADATA_KEY] = json.dumps(record)
        save_single_file(out, models.config, models.unet, models.vae, models.text_encoders, extra_metadata=metadata,
                         dtype=dtype, zero_terminal_snr=models.zero_terminal_snr)
    finally:
        lora_set.patcher.unpatch()
    return MergeResult(Path(out), lora_set.loras, lora_set.notes)
