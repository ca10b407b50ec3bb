"""The core nodes by ComfyUI class name, and ``/object_info`` for them."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from sumie.comfy.env import ComfyEnvironment
from sumie.comfy.nodes import conditioning, control, image, latent, loaders, sampling, upscale, vision
from sumie.comfy.nodes.base import Node, node_info
from sumie.errors import ConfigError

NODE_CLASSES: MappingProxyType[str, type[Node]] = MappingProxyType({
    **sampling.NODES, **loaders.NODES, **conditioning.NODES, **latent.NODES, **image.NODES, **control.NODES,
    **upscale.NODES, **vision.NODES,
})


def node_class(name: str) -> type[Node]:
    """The node class of a ComfyUI class name (ConfigError naming the known ones)."""
    try:
        return NODE_CLASSES[name]
    except KeyError:
        raise ConfigError(f"unknown node class {name!r}; known: {', '.join(NODE_CLASSES)}") from None


def object_info(env: ComfyEnvironment, name: str | None = None) -> dict[str, Any]:
    """ComfyUI's ``GET /object_info`` (every node) or ``/object_info/{name}`` (``{}`` for an unknown name)."""
    if name is not None:
        return {name: node_info(name, NODE_CLASSES[name], env)} if name in NODE_CLASSES else {}
    return {n: node_info(n, cls, env) for n, cls in NODE_CLASSES.items()}
