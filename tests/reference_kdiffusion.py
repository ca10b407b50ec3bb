"""Load k-diffusion's sampling.py and external.py as test oracles without its package __init__.

k-diffusion's __init__ imports torchvision and scikit-image (not installable here / not needed); the two
files we compare against only use ``utils.append_dims`` from the rest of the package, so a stand-in
``k_diffusion.utils`` with that one function is enough. Nothing in ``sumie/`` imports this.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest


def _append_dims(x, target_dims):  # noqa: ANN001, ANN202 - same contract as k_diffusion.utils.append_dims
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """(k_diffusion.sampling, k_diffusion.external) from the installed distribution."""
    if "sumie_kdiff.sampling" in sys.modules:
        return sys.modules["sumie_kdiff.sampling"], sys.modules["sumie_kdiff.external"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("k-diffusion (dev extra, installed with --no-deps) is missing: run scripts/setup.sh --dev")
    root = Path(list(spec.submodule_search_locations)[0])
    pkg = types.ModuleType("sumie_kdiff")
    pkg.__path__ = [str(root)]
    utils = types.ModuleType("sumie_kdiff.utils")
    utils.append_dims = _append_dims
    sys.modules["sumie_kdiff"] = pkg
    sys.modules["sumie_kdiff.utils"] = utils
    pkg.utils = utils
    mods = []
    for name in ("sampling", "external"):
        s = importlib.util.spec_from_file_location(f"sumie_kdiff.{name}", root / f"{name}.py")
        m = importlib.util.module_from_spec(s)
        sys.modules[f"sumie_kdiff.{name}"] = m
        s.loader.exec_module(m)
        setattr(pkg, name, m)
        mods.append(m)
    return mods[0], mods[1]
