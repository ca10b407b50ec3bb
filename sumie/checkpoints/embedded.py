"""The embedded default model ``sumie-tiny``: trained by Sumie itself (recipes/sumie-tiny), shipped as package data."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from sumie.errors import ConfigError

DEFAULT_MODEL = "sumie-tiny"
_FILES = {DEFAULT_MODEL: "sumie-tiny.safetensors"}


def embedded_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model file by name; a clear error if this install lacks it."""
    if name not in _FILES:
        raise ConfigError(f"no embedded model named {name!r}; embedded models: {', '.join(_FILES)}")
    path = Path(str(resources.files("sumie") / "data" / _FILES[name]))
    if not path.is_file():
        raise ConfigError(f"the embedded model {name!r} is missing from this install ({path}); reinstall Sumie, "
                          "re-train it with scripts/train-sumie-tiny.sh, or pass the path of a checkpoint")
    return path


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """A model argument -> a path: None or an embedded name gives the embedded file, anything else is a path."""
    if model is None:
        return embedded_path()
    if not str(model).strip():
        raise ConfigError("the model path is empty; pass a checkpoint file or diffusers folder, or leave the model "
                          f"out for the embedded {DEFAULT_MODEL}")
    if isinstance(model, str) and model in _FILES and not Path(model).exists():
        return embedded_path(model)
    return Path(model)
