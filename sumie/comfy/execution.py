"""Running a validated prompt as ComfyUI's ``PromptExecutor`` does: order, cache, events and history.

* Order (``comfy_execution/graph.py`` ``ExecutionList``): from each output node, the nodes it needs are staged
  depth first (the last-listed input first, nodes with cached outputs left out); among the nodes whose inputs
  are ready, an output node runs first, then one feeding an output node, then one two links away, else the
  earliest staged (``ux_friendly_pick_node``).
* Cache (``comfy_execution/caching.py``, the default "classic" cache): a node's key is its class, its constant
  inputs, its ``IS_CHANGED`` value and the keys of the nodes it links to, so a node runs again only when something
  it depends on changed; outputs of the previous prompt are kept and the rest dropped after each prompt. A
  re-queued graph with one changed input re-runs that node and the nodes after it; the others are reported in
  ``execution_cached``, and a cached output node sends its UI output again as ``executed``.
* Events, through ``send(event, data)``: ``execution_start``, ``execution_cached {nodes}``, per node
  ``executing {node, display_node}``, ``progress {value, max, node}`` per sampler step, ``executed {node,
  display_node, output}``, then ``execution_success`` or ``execution_error`` / ``execution_interrupted``, and
  finally ``executing {node: None}``; every payload carries ``prompt_id`` (start, cached, success, error and
  interrupted also ``timestamp`` in ms).
* ``progress_state {prompt_id, nodes}`` (newer ComfyUI's ``comfy_execution/progress.py``, ``WebUIProgressHandler``):
  sent when a node starts (``running``, value 0 of 1; before its ``executing``), at each of its progress steps
  (before the ``progress`` event) and when it finishes (``finished``, value = max; a cached output node too), with
  every node touched so far: ``{id: {value, max, state, node_id, prompt_id, display_node_id, parent_node_id,
  real_node_id}}`` (pending nodes are left out). ComfyUI sends it to every socket, not only the prompt's client.
* Interruption: the :class:`~sumie.pipelines.control.JobControl` given for the prompt, checked before every node
  and at every sampler step.
* History (``PromptQueue.task_done``): :func:`history_entry` -> ``{prompt: [number, id, prompt, extra_data,
  outputs], outputs: {node: ui}, status: {status_str, completed, messages}, meta: {node: {...}}}``.
"""

from __future__ import annotations

import json
import secrets
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sumie.comfy.env import ComfyEnvironment
from sumie.comfy.nodes import NODE_CLASSES
from sumie.comfy.nodes.base import Interrupted, RunContext
from sumie.comfy.validation import is_link
from sumie.pipelines.control import JobControl

Send = Callable[[str, dict[str, Any]], None]
# preview(node_id, denoised x0 [B, C, h, w] as scaled latents, the model's VAE): called before each "progress"
Preview = Callable[[str, Any, Any], None]
_STATUS_EVENTS = ("execution_start", "execution_cached", "execution_success", "execution_error",
                  "execution_interrupted")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _const_key(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


@dataclass
class ExecutionResult:
    """One prompt's outcome: success, the UI outputs per node, the status messages and each node's meta."""

    prompt_id: str
    success: bool
    outputs: dict[str, Any] = field(default_factory=dict)
    messages: list[list[Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    interrupted: bool = False
    error: dict[str, Any] | None = None


class PromptExecutor:
    """Runs prompts one at a time on an environment, keeping node outputs between prompts (see module doc)."""

    def __init__(self, env: ComfyEnvironment) -> None:
        self.env = env
        self._outputs: dict[str, tuple[Any, ...]] = {}  # cache key -> node outputs
        self._ui: dict[str, dict[str, Any] | None] = {}  # cache key -> UI output
        self._objects: dict[tuple[str, str], Any] = {}  # (node id, class) -> node instance (ComfyUI keeps them)

    def clear_cache(self) -> None:
        """Forget every cached output (ComfyUI ``/free`` with ``free_memory``)."""
        self._outputs.clear()
        self._ui.clear()
        self._objects.clear()

    # ---------------------------------------------------------------- keys and order
    def _keys(self, prompt: Mapping[str, Any]) -> dict[str, str]:
        keys: dict[str, str] = {}

        def key(node_id: str, stack: tuple[str, ...] = ()) -> str:
            if node_id in keys:
                return keys[node_id]
            if node_id in stack:
                raise ValueError(f"the graph has a cycle through node {node_id}")
            node = prompt[node_id]
            cls = NODE_CLASSES[node["class_type"]]
            parts = [node["class_type"]]
            inputs = node.get("inputs", {})
            for name in sorted(inputs):
                v = inputs[name]
                if is_link(v) and str(v[0]) not in prompt:  # a broken node outside the outputs that run
                    parts.append(f"{name}=<missing {v[0]}>")
                elif is_link(v):
                    parts.append(f"{name}=<{key(str(v[0]), (*stack, node_id))}>[{v[1]}]")
                else:
                    parts.append(f"{name}={_const_key(v)}")
            try:
                changed = cls.is_changed(self.env, {k: v for k, v in inputs.items() if not is_link(v)})
            except Exception:  # noqa: BLE001 - ComfyUI: a failing IS_CHANGED is NaN, i.e. never the same
                changed = f"nan-{secrets.token_hex(8)}"
            if changed is not None:
                parts.append(f"is_changed={_const_key(changed)}")
            keys[node_id] = "(" + ",".join(parts) + ")"
            return keys[node_id]

        for node_id in prompt:
            key(str(node_id))
        return keys

    def _stage(self, prompt: Mapping[str, Any], outputs: list[str], cached: set[str]) -> list[str]:
        """The run order of ComfyUI's ExecutionList for these output nodes."""
        pending: dict[str, None] = {}
        blocking: dict[str, set[str]] = {}
        count: dict[str, int] = {}
        links: list[tuple[str, str]] = []
        for out in outputs:
            stack = [out]
            while stack:
                nid = stack.pop()
                if nid in pending:
                    continue
                pending[nid] = None
                blocking.setdefault(nid, set())
                count.setdefault(nid, 0)
                for v in prompt[nid].get("inputs", {}).values():
                    if is_link(v):
                        src = str(v[0])
                        if src not in cached:
                            stack.append(src)
                            links.append((src, nid))
        for src, dst in links:
            if dst not in blocking.setdefault(src, set()):
                blocking[src].add(dst)
                count[dst] = count.get(dst, 0) + 1

        def is_output(nid: str) -> bool:
            return NODE_CLASSES[prompt[nid]["class_type"]].OUTPUT_NODE

        order: list[str] = []
        while pending:
            ready = [n for n in pending if count[n] == 0]
            pick = next((n for n in ready if is_output(n)), None)
            pick = pick or next((n for n in ready if any(is_output(b) for b in blocking[n])), None)
            pick = pick or next((n for n in ready if any(is_output(c) for b in blocking[n] for c in blocking[b])),
                                None)
            pick = pick or ready[0]
            order.append(pick)
            del pending[pick]
            for b in blocking[pick]:
                count[b] -= 1
        return order

    # ---------------------------------------------------------------- running
    def execute(self, prompt: dict[str, Any], prompt_id: str, outputs: list[str], *,
                extra_data: Mapping[str, Any] | None = None, send: Send | None = None,
                control: JobControl | None = None, preview: Preview | None = None) -> ExecutionResult:
        """Run the ``outputs`` of a validated prompt; events go to ``send``; returns the result for the history.

        ``preview`` gets each sampler step's prediction (for the binary preview frames, e.g. through
        :class:`sumie.pipelines.vae_io.Previewer`); ``control.interrupt()`` stops the prompt.
        """
        control = control or JobControl()
        result = ExecutionResult(prompt_id, False)

        def emit(event: str, data: dict[str, Any]) -> None:
            if event in _STATUS_EVENTS:
                result.messages.append([event, data])
            if send is not None:
                send(event, data)

        states: dict[str, dict[str, Any]] = {}

        def node_state(nid: str, state: str, value: float | None = None, total: float | None = None) -> None:
            entry = states.setdefault(nid, {"value": 0.0, "max": 1.0})
            if state == "running" and value is None:
                entry.update(value=0.0, max=1.0)
            elif state == "running":
                entry.update(value=value, max=total)
            else:
                entry["value"] = entry["max"]
            entry["state"] = state
            emit("progress_state", {"prompt_id": prompt_id, "nodes": {
                n: {"value": e["value"], "max": e["max"], "state": e["state"], "node_id": n, "prompt_id": prompt_id,
                    "display_node_id": n, "parent_node_id": None, "real_node_id": n} for n, e in states.items()}})

        emit("execution_start", {"prompt_id": prompt_id, "timestamp": _now_ms()})
        current: dict[str, tuple[Any, ...]] = {}
        node_id = ""
        inputs_seen: dict[str, Any] = {}
        keys: dict[str, str] = {}
        try:
            keys = self._keys(prompt)
            cached = {nid for nid, k in keys.items() if k in self._outputs}
            result.cached = [nid for nid in prompt if nid in cached]
            emit("execution_cached", {"nodes": result.cached, "prompt_id": prompt_id, "timestamp": _now_ms()})
            for nid in cached:
                current[nid] = self._outputs[keys[nid]]
            extra_pnginfo = (extra_data or {}).get("extra_pnginfo")
            for node_id in self._stage(prompt, outputs, cached):
                class_type = prompt[node_id]["class_type"]
                result.meta[node_id] = {"node_id": node_id, "display_node": node_id, "parent_node": None,
                                        "real_node_id": node_id}
                if node_id in cached:  # a cached output node: its UI output again, no "executing"
                    ui = self._ui.get(keys[node_id])
                    if ui is not None:
                        result.outputs[node_id] = ui
                        emit("executed", {"node": node_id, "display_node": node_id, "output": ui,
                                          "prompt_id": prompt_id})
                    node_state(node_id, "finished")
                    continue
                if control.interrupted:
                    raise Interrupted("interrupted")
                node_state(node_id, "running")
                emit("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})
                inputs_seen = {}
                for name, v in prompt[node_id].get("inputs", {}).items():
                    inputs_seen[name] = current[str(v[0])][v[1]] if is_link(v) else v
                cls = NODE_CLASSES[class_type]
                obj = self._objects.get((node_id, class_type)) or cls()
                self._objects[(node_id, class_type)] = obj

                def progress(value: int, total: int, nid: str = node_id) -> None:
                    node_state(nid, "running", value, total)
                    emit("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": nid})

                show = None if preview is None else (lambda x0, vae, nid=node_id: preview(nid, x0, vae))
                ctx = RunContext(self.env, node_id, prompt, extra_pnginfo, control, progress, show)
                out = obj.run(ctx, **inputs_seen)
                current[node_id] = tuple(out.outputs)
                self._outputs[keys[node_id]] = current[node_id]
                self._ui[keys[node_id]] = out.ui
                result.executed.append(node_id)
                if out.ui is not None:
                    result.outputs[node_id] = out.ui
                    emit("executed", {"node": node_id, "display_node": node_id, "output": out.ui,
                                      "prompt_id": prompt_id})
                node_state(node_id, "finished")
            result.success = True
            emit("execution_success", {"prompt_id": prompt_id, "timestamp": _now_ms()})
        except Interrupted:
            result.interrupted = True
            emit("execution_interrupted", {"prompt_id": prompt_id, "node_id": node_id,
                                           "node_type": prompt.get(node_id, {}).get("class_type", ""),
                                           "executed": list(result.executed), "timestamp": _now_ms()})
        except Exception as ex:  # noqa: BLE001 - any node failure is reported as ComfyUI's execution_error
            result.error = {
                "prompt_id": prompt_id, "node_id": node_id,
                "node_type": prompt.get(node_id, {}).get("class_type", ""), "executed": list(result.executed),
                "exception_message": str(ex), "exception_type": _type_name(type(ex)),
                "traceback": traceback.format_tb(ex.__traceback__),
                "current_inputs": {k: [_describe(v)] for k, v in inputs_seen.items()},
                "current_outputs": list(current), "timestamp": _now_ms(),
            }
            emit("execution_error", result.error)
        finally:
            if keys:
                live = set(keys.values())
                for cache in (self._outputs, self._ui):
                    for k in [k for k in cache if k not in live]:
                        del cache[k]
        if send is not None:
            send("executing", {"node": None, "prompt_id": prompt_id})
        return result


def _type_name(cls: type) -> str:
    """ComfyUI's ``full_type_name``: ``module.Qualname``, builtins by their bare name."""
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _describe(value: Any) -> str:
    """A short text for an input value in an error report."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__}{list(shape)}"
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def history_entry(number: int, prompt_id: str, prompt: Mapping[str, Any], extra_data: Mapping[str, Any],
                  outputs_to_execute: list[str], result: ExecutionResult) -> dict[str, Any]:
    """ComfyUI's history entry for a finished prompt (``GET /history/{id}`` -> ``{id: entry}``)."""
    return {
        "prompt": [number, prompt_id, dict(prompt), dict(extra_data), list(outputs_to_execute)],
        "outputs": dict(result.outputs),
        "status": {"status_str": "success" if result.success else "error", "completed": result.success,
                   "messages": [list(m) for m in result.messages]},
        "meta": dict(result.meta),
    }
