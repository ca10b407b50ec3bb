"""LoRA-family adapter files (kohya/A1111, LyCORIS, diffusers, PEFT): module names, parsing, weight patches.

The names below are imported on first use (PEP 562), so the engine, which registers the LoRA handler on every load,
does not pay for the parsers at start-up.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {name: "file" for name in ("LoraFile", "LoraModule", "LoraPatches", "lora_info", "parse_lora", "read_lora")}
_WHERE.update({name: "names" for name in ("default_targets", "kohya_name", "lora_targets")})
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """``sumie.adapters.lora.read_lora`` etc., from their modules."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
