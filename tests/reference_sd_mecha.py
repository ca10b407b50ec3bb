"""sd-mecha's key and shape lists of real checkpoints (its ``model_configs/*.yaml``) as test oracles.

sd-mecha is a dev extra installed with ``--no-deps`` for these data files only: its package ``__init__`` imports
packages that are not installed, so the folder is found with ``importlib.util.find_spec`` (which locates the package
without running it), whatever the install path of PyYAML. Nothing in ``sumie/`` imports this.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml


@functools.cache
def model_config(name: str) -> dict[str, Any]:
    """The parsed ``sd_mecha/extensions/builtin/model_configs/<name>.yaml`` (e.g. "sd1-ldm", "sdxl-sgm")."""
    spec = importlib.util.find_spec("sd_mecha")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("sd-mecha (dev extra, its data files only) is not installed: run scripts/setup.sh --dev")
    path = Path(list(spec.submodule_search_locations)[0]) / "extensions" / "builtin" / "model_configs" / f"{name}.yaml"
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
