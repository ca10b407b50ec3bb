"""Prompt validation against ComfyUI's ``execution.validate_prompt`` / ``validate_inputs`` and ``server.py``
``post_prompt``: for each fault the same error type, message, details and extra_info, the same ``node_errors``
entry (errors, dependent_outputs, class_type) and the HTTP 400 body ``{"error": ..., "node_errors": ...}``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sumie.checkpoints.manager import ModelManager
from sumie.comfy import ComfyEnvironment, ComfyFolders, check_request, validate_prompt
from sumie.comfy import sampler as cs
from sumie.comfy.validation import types_match


@pytest.fixture
def env(tmp_path: Path) -> ComfyEnvironment:
    """No model folders: the embedded sumie-tiny is the one checkpoint name."""
    return ComfyEnvironment(ComfyFolders.under(tmp_path), ModelManager())


def graph() -> dict[str, Any]:
    """basic_api_example.py's prompt on sumie-tiny."""
    return {
        "3": {"class_type": "KSampler", "inputs": {
            "cfg": 8, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0], "negative": ["7", 0],
            "positive": ["6", 0], "sampler_name": "euler", "scheduler": "normal", "seed": 8566257, "steps": 20}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sumie-tiny"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 1, "height": 512, "width": 512}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "masterpiece best quality girl"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "bad hands"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def failed(env: ComfyEnvironment, prompt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(error, node_errors) of a prompt that must fail, via the /prompt body check."""
    check = check_request({"prompt": prompt}, env)
    assert not check.ok and check.body is not None
    assert set(check.body) == {"error", "node_errors"}
    return check.body["error"], check.body["node_errors"]


def one_input_error(env: ComfyEnvironment, prompt: dict[str, Any], node: str = "3") -> dict[str, Any]:
    """The single input error of ``node`` in a prompt_outputs_failed_validation answer."""
    error, node_errors = failed(env, prompt)
    assert error["type"] == "prompt_outputs_failed_validation"
    assert error["message"] == "Prompt outputs failed validation" and error["extra_info"] == {}
    assert list(node_errors) == [node]
    entry = node_errors[node]
    assert entry["dependent_outputs"] == ["9"] and entry["class_type"] == graph()[node]["class_type"]
    (err,) = entry["errors"]
    assert error["details"] == ""  # ComfyUI joins only the output nodes' own errors there
    return err


def test_valid_graph_passes_and_converts_constants(env: ComfyEnvironment) -> None:
    """The example graph is valid; constants are converted in place (a string seed becomes an INT)."""
    prompt = graph()
    prompt["3"]["inputs"]["seed"] = "42"
    ok, error, outputs, node_errors = validate_prompt(prompt, env)
    assert (ok, error, outputs, node_errors) == (True, None, ["9"], {})
    assert prompt["3"]["inputs"]["seed"] == 42 and prompt["3"]["inputs"]["cfg"] == 8.0


def test_no_prompt(env: ComfyEnvironment) -> None:
    """server.py: a body without ``prompt``."""
    check = check_request({"client_id": "x"}, env)
    assert check.body == {"error": {"type": "no_prompt", "message": "No prompt provided",
                                    "details": "No prompt provided", "extra_info": {}}, "node_errors": {}}


def test_unknown_class_and_missing_class_type(env: ComfyEnvironment) -> None:
    """invalid_prompt, node_errors empty."""
    prompt = graph()
    prompt["10"] = {"class_type": "FancyUpscaler", "inputs": {}}
    error, node_errors = failed(env, prompt)
    assert error == {"type": "invalid_prompt", "message": "Cannot execute because node FancyUpscaler does not exist.",
                     "details": "Node ID '#10'", "extra_info": {}}
    assert node_errors == {}
    prompt = graph()
    del prompt["5"]["class_type"]
    error, _ = failed(env, prompt)
    assert error["type"] == "invalid_prompt" and error["details"] == "Node ID '#5'"
    assert error["message"] == "Cannot execute because a node is missing the class_type property."


def test_no_outputs(env: ComfyEnvironment) -> None:
    """prompt_no_outputs when no node is an output node."""
    prompt = graph()
    del prompt["9"]
    error, node_errors = failed(env, prompt)
    assert error == {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}
    assert node_errors == {}


def test_required_input_missing(env: ComfyEnvironment) -> None:
    """required_input_missing names the input."""
    prompt = graph()
    del prompt["3"]["inputs"]["seed"]
    assert one_input_error(env, prompt) == {"type": "required_input_missing", "message": "Required input is missing",
                                            "details": "seed", "extra_info": {"input_name": "seed"}}


def test_output_node_errors_fill_the_details(env: ComfyEnvironment) -> None:
    """An error of the output node itself appears in error.details as "message: details"."""
    prompt = graph()
    del prompt["9"]["inputs"]["filename_prefix"]
    error, node_errors = failed(env, prompt)
    assert error["details"] == "Required input is missing: filename_prefix"
    assert node_errors["9"]["dependent_outputs"] == ["9"] and node_errors["9"]["class_type"] == "SaveImage"


def test_value_not_in_list(env: ComfyEnvironment) -> None:
    """value_not_in_list: the list shown up to 20 entries, else its length and no input_config."""
    prompt = graph()
    prompt["3"]["inputs"]["scheduler"] = "fancy"
    err = one_input_error(env, prompt)
    names = cs.supported_schedulers()
    assert len(names) <= 20
    assert err == {"type": "value_not_in_list", "message": "Value not in list",
                   "details": f"scheduler: 'fancy' not in {names}",
                   "extra_info": {"input_name": "scheduler", "received_value": "fancy",
                                  "input_config": [names, {"tooltip": "The scheduler controls how noise is gradually "
                                                                      "removed to form the image."}]}}
    prompt = graph()
    prompt["3"]["inputs"]["sampler_name"] = "euler_cfg_pp"  # ComfyUI has it, Sumie does not run it
    err = one_input_error(env, prompt)
    n = len(cs.supported_samplers())
    assert n > 20 and err["details"] == f"sampler_name: 'euler_cfg_pp' not in (list of length {n})"
    assert err["extra_info"]["input_config"] is None
    prompt = graph()
    prompt["4"]["inputs"]["ckpt_name"] = "missing.safetensors"
    err = one_input_error(env, prompt, node="4")
    assert err["details"] == "ckpt_name: 'missing.safetensors' not in ['sumie-tiny']"


def test_value_out_of_range(env: ComfyEnvironment) -> None:
    """value_smaller_than_min / value_bigger_than_max with ComfyUI's messages."""
    prompt = graph()
    prompt["3"]["inputs"]["steps"] = 0
    err = one_input_error(env, prompt)
    assert (err["type"], err["message"], err["details"]) == ("value_smaller_than_min", "Value 0 smaller than min of 1",
                                                             "steps")
    assert err["extra_info"]["received_value"] == 0 and err["extra_info"]["input_name"] == "steps"
    prompt = graph()
    prompt["3"]["inputs"]["denoise"] = 1.5
    err = one_input_error(env, prompt)
    assert (err["type"], err["message"]) == ("value_bigger_than_max", "Value 1.5 bigger than max of 1.0")


def test_invalid_input_type(env: ComfyEnvironment) -> None:
    """invalid_input_type when a constant does not convert."""
    prompt = graph()
    prompt["3"]["inputs"]["seed"] = "abc"
    err = one_input_error(env, prompt)
    assert err["type"] == "invalid_input_type"
    assert err["message"] == "Failed to convert an input value to a INT value"
    assert err["details"] == "seed, abc, invalid literal for int() with base 10: 'abc'"
    assert err["extra_info"]["exception_message"] == "invalid literal for int() with base 10: 'abc'"


def test_link_faults(env: ComfyEnvironment) -> None:
    """return_type_mismatch for a CLIP given as MODEL; bad_linked_input for a link that is not [id, slot]."""
    prompt = graph()
    prompt["3"]["inputs"]["model"] = ["4", 1]
    err = one_input_error(env, prompt)
    assert err["type"] == "return_type_mismatch" and err["message"] == "Return type mismatch between linked nodes"
    assert err["details"] == "model, received_type(CLIP) mismatch input_type(MODEL)"
    assert err["extra_info"]["received_type"] == "CLIP" and err["extra_info"]["linked_node"] == ["4", 1]
    prompt = graph()
    prompt["3"]["inputs"]["model"] = ["4"]
    err = one_input_error(env, prompt)
    assert err["type"] == "bad_linked_input" and err["details"] == "model"
    assert err["message"] == "Bad linked input, must be a length-2 list of [node_id, slot_index]"
    prompt = graph()
    prompt["3"]["inputs"]["model"] = ["44", 0]
    assert one_input_error(env, prompt)["type"] == "bad_linked_input"
    assert types_match("IMAGE,MASK", "MASK") and types_match("*", "LATENT") and not types_match("CLIP", "MODEL")


def test_errors_upstream_are_reported_once_with_their_outputs(env: ComfyEnvironment) -> None:
    """An error in a node two outputs depend on lists both; nodes downstream of it carry no errors; one good
    output lets the prompt run with node_errors for the other."""
    prompt = graph()
    prompt["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    prompt["5"]["inputs"]["width"] = 4
    error, node_errors = failed(env, prompt)
    assert list(node_errors) == ["5"]
    assert sorted(node_errors["5"]["dependent_outputs"]) == ["10", "9"]
    assert error["details"] == ""
    prompt = graph()
    prompt["11"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 4, "height": 64, "batch_size": 1}}
    prompt["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["4", 2]}}
    prompt["13"] = {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}}
    check = check_request({"prompt": copy.deepcopy(prompt)}, env)
    assert check.ok and check.outputs == ["9"] and list(check.node_errors) == ["11"]
    assert check.node_errors["11"]["dependent_outputs"] == ["13"]


def test_custom_validation_for_load_image(env: ComfyEnvironment) -> None:
    """LoadImage.VALIDATE_INPUTS: a missing file is custom_validation_failed (not value_not_in_list); an existing
    one (also ``name [output]``) passes."""
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}
    _, node_errors = failed(env, copy.deepcopy(prompt))
    (err,) = node_errors["1"]["errors"]
    assert err == {"type": "custom_validation_failed", "message": "Custom validation failed for node",
                   "details": "image - Invalid image file: nope.png", "extra_info": {"input_name": "image"}}
    out = env.folders.folder("output")
    out.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(out / "a.png")
    prompt["1"]["inputs"]["image"] = "a.png [output]"
    assert check_request({"prompt": prompt}, env).ok
    prompt["1"]["inputs"]["image"] = "../../etc/passwd [output]"
    assert not check_request({"prompt": prompt}, env).ok
