"""ComfyUI's node-graph API as a library (no HTTP): validate an API-format prompt, run it, describe the nodes.

A server mounts it with one :class:`~sumie.comfy.env.ComfyEnvironment` (output / input / temp folders and a
:class:`~sumie.checkpoints.manager.ModelManager`) and one :class:`~sumie.comfy.execution.PromptExecutor` per
engine worker (it runs one prompt at a time and keeps node outputs between prompts):

* ``POST /prompt``: :func:`~sumie.comfy.validation.check_request` -> HTTP 400 with ``check.body``, or queue
  ``(check.prompt, check.outputs)`` (the prompt with its constants converted; only the output nodes listed in the
  body's ``partial_execution_targets`` when it has one) and answer ``{prompt_id, number, node_errors:
  check.node_errors}``;
* the worker: ``executor.execute(prompt, prompt_id, outputs, extra_data=..., send=..., control=JobControl(),
  preview=...)`` sends ComfyUI's WebSocket events through ``send(event, data)`` (``progress_state`` included; the
  last is ``executing`` with ``node: None``), ``preview(node_id, x0, vae)`` gets every sampler step's prediction
  for binary preview frames; :func:`~sumie.comfy.execution.history_entry` builds the ``/history`` entry;
  ``control.interrupt()`` is ``POST /interrupt``; ``executor.clear_cache()`` (+ ``manager.unload_all()``) is
  ``POST /free``;
* ``GET /object_info[/{class}]``: :func:`~sumie.comfy.nodes.object_info`;
* ``GET /view`` and the uploads: ``env.folders.resolve(type, filename, subfolder)`` (refuses paths outside the
  output / input / temp folders); ``GET /models/{folder}``: ``env.model_names(kind)``.
"""

from sumie.comfy.env import ComfyEnvironment, ComfyFolders
from sumie.comfy.execution import ExecutionResult, PromptExecutor, history_entry
from sumie.comfy.nodes import NODE_CLASSES, object_info
from sumie.comfy.validation import PromptCheck, check_request, validate_prompt

__all__ = [
    "NODE_CLASSES",
    "ComfyEnvironment",
    "ComfyFolders",
    "ExecutionResult",
    "PromptCheck",
    "PromptExecutor",
    "check_request",
    "history_entry",
    "object_info",
    "validate_prompt",
]
