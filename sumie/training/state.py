"""Training checkpoints: one ``state.pt`` per ``checkpoints/step_NNNNNNNN`` folder, written atomically, last K kept.

A checkpoint holds everything a run needs to continue bit for bit: the trained weights, EMA, optimizer and LR
scheduler states, the trainer's generator and the global torch / numpy / python RNG states, and the data stream's
(epoch, position). Frozen networks are not stored; they are reloaded from ``init_from`` / ``vae_from``, whose
file sizes are recorded and checked on resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sumie.errors import SumieError

__all__ = ["CHECKPOINT_DIR", "CheckpointStateError", "capture_rng", "find_checkpoint", "list_checkpoints",
           "load_state", "restore_rng", "save_state"]

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
FORMAT = "sumie-train-1"


class CheckpointStateError(SumieError):
    """A training checkpoint is missing, damaged or does not fit the config it is resumed with."""


def capture_rng() -> dict[str, Any]:
    """Global RNG states (torch CPU, numpy, python) in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global RNGs to a :func:`capture_rng` snapshot."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = output_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def find_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint folder, else the newest checkpoint of the run folder ``path``."""
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointStateError(f"{path}: no training checkpoint found (expected {CHECKPOINT_DIR}/step_*/"
                                   f"{STATE_FILE}); pass the run's output folder or one checkpoint folder")
    return found[-1]


def save_state(output_dir: Path, step: int, state: dict[str, Any], keep: int, info: dict[str, Any]) -> Path:
    """Write ``checkpoints/step_{step:08d}`` through a temporary folder and a rename; keep the newest ``keep``."""
    root = output_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        torch.save({"format": FORMAT, **state}, tmp / STATE_FILE)
        (tmp / "info.json").write_text(json.dumps(info, indent=1) + "\n")
        old = None
        if final.exists():
            old = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for stale in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_state(checkpoint: Path) -> dict[str, Any]:
    """Read a checkpoint's ``state.pt`` (tensors and plain data only: ``weights_only``)."""
    f = checkpoint / STATE_FILE
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointStateError(f"{checkpoint}: not a training checkpoint (no {STATE_FILE})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise CheckpointStateError(f"{f}: cannot be read ({type(e).__name__}: {e}); resume from an older "
                                   "checkpoint folder") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointStateError(f"{f}: not a Sumie training checkpoint (format {FORMAT})")
    return state
