"""The node contract (ComfyUI's node classes, in Sumie's terms) and ``/object_info`` for it.

A node class states ComfyUI's facts as class attributes: ``RETURN_TYPES`` / ``RETURN_NAMES`` / ``OUTPUT_NODE`` /
``CATEGORY`` / ``DESCRIPTION`` / ``OUTPUT_TOOLTIPS`` / ``DISPLAY_NAME`` / ``PYTHON_MODULE`` and its inputs through
:meth:`Node.input_types` (option lists may depend on the folders, so it takes the environment). :meth:`Node.run`
does the work with Sumie's engine. :func:`node_info` turns a class into ComfyUI's ``/object_info`` entry
(``server.py`` ``node_info``: input, input_order, output, output_is_list, output_name, name, display_name,
description, python_module, category, output_node, and output_tooltips / deprecated where the node has them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sumie.comfy.env import ComfyEnvironment
from sumie.comfy.values import NodeOutput
from sumie.errors import SumieError
from sumie.pipelines.control import JobControl

MAX_RESOLUTION = 16384  # nodes.py
SEED_MAX = 0xFFFFFFFFFFFFFFFF

InputTypes = dict[str, dict[str, Any]]


class Interrupted(SumieError):
    """The prompt was interrupted (ComfyUI ``InterruptProcessingException``)."""


@dataclass
class RunContext:
    """What a running node sees besides its inputs: the environment, the prompt, progress and interruption."""

    env: ComfyEnvironment
    node_id: str
    prompt: Mapping[str, Any]
    extra_pnginfo: Mapping[str, Any] | None
    control: JobControl
    progress: Callable[[int, int], None] = field(default=lambda value, total: None)
    preview: Callable[[Any, Any], None] | None = None  # (denoised x0 [B, C, h, w] scaled latents, VAE) per step

    def check(self) -> None:
        """Raise :class:`Interrupted` when the prompt has been interrupted."""
        if self.control.interrupted:
            raise Interrupted("interrupted")


class Node:
    """A ComfyUI node: class attributes with ComfyUI's facts, :meth:`input_types` and :meth:`run`."""

    RETURN_TYPES: ClassVar[tuple[str, ...]] = ()
    RETURN_NAMES: ClassVar[tuple[str, ...] | None] = None
    OUTPUT_TOOLTIPS: ClassVar[tuple[str, ...] | None] = None
    OUTPUT_NODE: ClassVar[bool] = False
    CATEGORY: ClassVar[str] = "sd"
    DESCRIPTION: ClassVar[str] = ""
    DISPLAY_NAME: ClassVar[str | None] = None
    PYTHON_MODULE: ClassVar[str] = "nodes"
    VALIDATES: ClassVar[tuple[str, ...]] = ()  # inputs checked by validate() instead of the option list
    DEPRECATED: ClassVar[bool] = False

    @classmethod
    def input_types(cls, env: ComfyEnvironment) -> InputTypes:
        """ComfyUI's ``INPUT_TYPES()``: {"required": {name: (type, options?)}, "optional"?, "hidden"?}."""
        return {"required": {}}

    @classmethod
    def is_changed(cls, env: ComfyEnvironment, inputs: Mapping[str, Any]) -> Any:
        """ComfyUI's ``IS_CHANGED``: a value that changes when the node must run again for the same inputs."""
        return None

    @classmethod
    def validate(cls, env: ComfyEnvironment, inputs: Mapping[str, Any]) -> bool | str:
        """ComfyUI's ``VALIDATE_INPUTS`` for the inputs in :attr:`VALIDATES`: True, or the reason they fail."""
        return True

    def run(self, ctx: RunContext, **inputs: Any) -> NodeOutput:
        """Compute the outputs (and UI output) from the inputs."""
        raise NotImplementedError


def jsonable(value: Any) -> Any:
    """Tuples as lists, recursively (what ComfyUI's JSON answers hold)."""
    if isinstance(value, tuple | list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def node_info(name: str, cls: type[Node], env: ComfyEnvironment) -> dict[str, Any]:
    """One ``/object_info`` entry, keys in ComfyUI's order (tuples as JSON lists)."""
    inputs = cls.input_types(env)
    info: dict[str, Any] = {
        "input": jsonable(inputs),
        "input_order": {key: list(value) for key, value in inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_is_list": [False] * len(cls.RETURN_TYPES),
        "output_name": list(cls.RETURN_NAMES if cls.RETURN_NAMES is not None else cls.RETURN_TYPES),
        "name": name,
        "display_name": cls.DISPLAY_NAME or name,
        "description": cls.DESCRIPTION,
        "python_module": cls.PYTHON_MODULE,
        "category": cls.CATEGORY,
        "output_node": cls.OUTPUT_NODE,
    }
    if cls.OUTPUT_TOOLTIPS is not None:
        info["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
    if cls.DEPRECATED:
        info["deprecated"] = True
    return info
