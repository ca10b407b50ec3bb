"""Sumie: Stable Diffusion end to end in plain PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from sumie.pipelines.engine import Engine


def load(model: Any = None, **kwargs: Any) -> Engine:
    """Load a checkpoint into a generation engine: ``sumie.load("model.safetensors").generate(params)``.

    Same arguments as :func:`sumie.pipelines.engine.load` (``dtype``, ``device``, ``vae``, ``prediction``,
    ``embeddings_dir``, ``taesd``); imported lazily so ``import sumie`` stays light.
    """
    from sumie.pipelines.engine import load as _load

    return _load(model, **kwargs)


__all__ = ["__version__", "load"]
