"""Checking an API-format prompt before it runs, as ComfyUI's ``execution.validate_prompt`` does.

A prompt is ``{node_id: {"class_type": name, "inputs": {name: constant or [node_id, output_index]}}}``. The
outcome is ComfyUI's 4-tuple ``(ok, error, good_outputs, node_errors)``: a node without ``class_type`` or of an
unknown class -> ``invalid_prompt``; no output node -> ``prompt_no_outputs``; every output node is checked through
its inputs (recursively through links) and when none passes -> ``prompt_outputs_failed_validation``, with
``node_errors[id] = {"errors": [...], "dependent_outputs": [...], "class_type": ...}`` holding per input
``required_input_missing``, ``bad_linked_input``, ``return_type_mismatch``, ``invalid_input_type``,
``value_smaller_than_min``, ``value_bigger_than_max``, ``value_not_in_list`` or ``custom_validation_failed``
(messages and details worded as ComfyUI words them). Constants are converted in place (``"5"`` for an INT becomes
5), as ComfyUI does. :func:`check_request` adds the ``/prompt`` body's ``no_prompt`` case and builds the HTTP 400
body ``{"error": ..., "node_errors": ...}``. ``partial_execution_targets`` (newer ComfyUI's ``/prompt`` field: run
only these output nodes) keeps the output nodes whose ids it lists; ids of other nodes are ignored as ComfyUI
ignores them, and when no output node is left the prompt has no outputs; a value that is not a list of node-id
strings is an ``invalid_prompt`` error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sumie.comfy.env import ComfyEnvironment
from sumie.comfy.nodes import NODE_CLASSES
from sumie.comfy.nodes.base import jsonable

Error = dict[str, Any]
_PRIMITIVES = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


def _error(type_: str, message: str, details: str, **extra: Any) -> Error:
    return {"type": type_, "message": message, "details": details, "extra_info": jsonable(extra)}


def is_link(value: Any) -> bool:
    """Whether an input value is a link ``[node_id, output_index]`` (any list, as ComfyUI treats it)."""
    return isinstance(value, list)


def types_match(received: str, expected: Any) -> bool:
    """ComfyUI's ``validate_node_input``: equal, ``*`` on either side, or comma-separated unions that overlap."""
    if not isinstance(expected, str):
        return False
    if received == expected or "*" in (received, expected):
        return True
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


class _Validator:
    def __init__(self, prompt: dict[str, Any], env: ComfyEnvironment) -> None:
        self.prompt = prompt
        self.env = env
        self.validated: dict[str, tuple[bool, list[Error]]] = {}

    def node(self, node_id: str) -> tuple[bool, list[Error]]:
        if node_id in self.validated:
            return self.validated[node_id]
        self.validated[node_id] = (True, [])  # a cycle back here is caught at run time
        result = self._check(node_id)
        self.validated[node_id] = result
        return result

    def _check(self, node_id: str) -> tuple[bool, list[Error]]:
        node = self.prompt[node_id]
        cls = NODE_CLASSES[node["class_type"]]
        inputs = node.setdefault("inputs", {})
        types = cls.input_types(self.env)
        declared = {**types.get("required", {}), **types.get("optional", {})}
        errors: list[Error] = []
        valid = True
        for name, info in declared.items():
            if name not in inputs:
                if name in types.get("required", {}):
                    errors.append(_error("required_input_missing", "Required input is missing", name,
                                         input_name=name))
                continue
            val, expected = inputs[name], info[0]
            options = info[1] if len(info) > 1 else {}
            if is_link(val):
                bad = self._link(name, info, val)
                if bad is not None:
                    errors.append(bad)
                    continue
                if not self.node(str(val[0]))[0]:
                    valid = False
                continue
            convert = _PRIMITIVES.get(expected) if isinstance(expected, str) else None
            if convert is not None:
                try:
                    val = convert(val)
                except (TypeError, ValueError, OverflowError) as ex:
                    errors.append(_error("invalid_input_type", f"Failed to convert an input value to a {expected} "
                                         "value", f"{name}, {val}, {ex}", input_name=name, input_config=info,
                                         received_value=val, exception_message=str(ex)))
                    continue
                inputs[name] = val
            if "min" in options and val < options["min"]:
                errors.append(_error("value_smaller_than_min", f"Value {val} smaller than min of {options['min']}",
                                     name, input_name=name, input_config=info, received_value=val))
                continue
            if "max" in options and val > options["max"]:
                errors.append(_error("value_bigger_than_max", f"Value {val} bigger than max of {options['max']}",
                                     name, input_name=name, input_config=info, received_value=val))
                continue
            if isinstance(expected, list) and name not in cls.VALIDATES and val not in expected:
                config: Any = info
                listed = str(expected)
                if len(expected) > 20:  # ComfyUI does not send back long lists of model files
                    listed, config = f"(list of length {len(expected)})", None
                errors.append(_error("value_not_in_list", "Value not in list", f"{name}: '{val}' not in {listed}",
                                     input_name=name, input_config=config, received_value=val))
        if cls.VALIDATES and all(n in inputs and not is_link(inputs[n]) for n in cls.VALIDATES):
            r = cls.validate(self.env, inputs)
            if r is not True:
                for name in cls.VALIDATES:
                    details = name if r is False else f"{name} - {r}"
                    errors.append(_error("custom_validation_failed", "Custom validation failed for node", details,
                                         input_name=name))
        return (not errors and valid), errors

    def _link(self, name: str, info: Any, val: list[Any]) -> Error | None:
        if len(val) != 2:
            return _error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                          name, input_name=name, input_config=info, received_value=val)
        src, slot = str(val[0]), val[1]
        src_node = self.prompt.get(src)
        returns = NODE_CLASSES[src_node["class_type"]].RETURN_TYPES if src_node is not None else ()
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < len(returns):
            what = "no such node" if src_node is None else f"node {src} has {len(returns)} outputs"
            return _error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                          f"{name} ({what})", input_name=name, input_config=info, received_value=val)
        received = returns[slot]
        if not types_match(received, info[0]):
            return _error("return_type_mismatch", "Return type mismatch between linked nodes",
                          f"{name}, received_type({received}) mismatch input_type({info[0]})", input_name=name,
                          input_config=info, received_type=received, linked_node=val)
        return None


def validate_prompt(prompt: Any, env: ComfyEnvironment, partial_execution_targets: list[str] | None = None
                    ) -> tuple[bool, Error | None, list[str], dict[str, Any]]:
    """ComfyUI's ``validate_prompt``: (ok, error, output node ids that passed, node_errors); only the output nodes
    in ``partial_execution_targets`` count when it is given."""
    if not isinstance(prompt, Mapping):
        return False, _error("invalid_prompt", "Prompt must be an object of nodes", type(prompt).__name__), [], {}
    outputs = []
    for node_id, node in prompt.items():
        if not isinstance(node, Mapping) or "class_type" not in node:
            return False, _error("invalid_prompt", "Cannot execute because a node is missing the class_type "
                                 "property.", f"Node ID '#{node_id}'"), [], {}
        cls = NODE_CLASSES.get(node["class_type"])
        if cls is None:
            return False, _error("invalid_prompt", f"Cannot execute because node {node['class_type']} does not "
                                 "exist.", f"Node ID '#{node_id}'"), [], {}
        if cls.OUTPUT_NODE and (partial_execution_targets is None or str(node_id) in partial_execution_targets):
            outputs.append(str(node_id))
    if not outputs:
        return False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}
    validator = _Validator(prompt, env)  # type: ignore[arg-type]
    good: list[str] = []
    failed: list[tuple[str, list[Error]]] = []
    node_errors: dict[str, Any] = {}
    for out in outputs:
        ok, reasons = validator.node(out)
        if ok:
            good.append(out)
            continue
        failed.append((out, reasons))
        for node_id, (valid, errs) in validator.validated.items():
            if not valid and errs:
                entry = node_errors.setdefault(node_id, {"errors": errs, "dependent_outputs": [],
                                                         "class_type": prompt[node_id]["class_type"]})
                entry["dependent_outputs"].append(out)
    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, errs in failed for e in errs)
        return False, _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details), \
            [], node_errors
    return True, None, good, node_errors


@dataclass
class PromptCheck:
    """A ``/prompt`` body checked: ``ok`` with the outputs to run, or the HTTP 400 ``body``."""

    ok: bool
    prompt: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    node_errors: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] | None = None


def check_request(body: Any, env: ComfyEnvironment) -> PromptCheck:
    """Check a ``POST /prompt`` JSON body (``{"prompt": ..., ...}``): ComfyUI's 400 bodies, ``no_prompt`` included."""
    if not isinstance(body, Mapping) or "prompt" not in body:
        err = _error("no_prompt", "No prompt provided", "No prompt provided")
        return PromptCheck(False, body={"error": err, "node_errors": {}})
    prompt = body["prompt"]
    targets = body.get("partial_execution_targets")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        err = _error("invalid_prompt", "partial_execution_targets must be a list of node id strings",
                     f"got {type(targets).__name__}: {str(targets)[:100]}")
        return PromptCheck(False, body={"error": err, "node_errors": {}})
    ok, error, outputs, node_errors = validate_prompt(prompt, env, targets)
    if not ok:
        return PromptCheck(False, body={"error": error, "node_errors": node_errors})
    return PromptCheck(True, prompt, outputs, node_errors)
