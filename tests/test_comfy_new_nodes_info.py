"""``/object_info`` entries of the ControlNet, CLIP vision, IP-Adapter and upscale-model nodes, against the
definitions they follow, read for this:

* ComfyUI ``nodes.py`` at e60e19b (the commit the search index holds): ``ControlNetLoader``,
  ``DiffControlNetLoader``, ``ControlNetApply``, ``ControlNetApplyAdvanced`` (``INPUT_TYPES``, ``RETURN_TYPES``,
  ``RETURN_NAMES``, ``CATEGORY`` "loaders" / "conditioning/controlnet"), ``CLIPVisionLoader`` (``clip_vision`` folder,
  "loaders"), ``CLIPVisionEncode`` ("conditioning"), with what newer ComfyUI (v0.3.64, the version Sumie's API
  follows) added: ``ControlNetApplyAdvanced``'s optional ``vae``, ``CLIPVisionEncode``'s ``crop`` ["center",
  "none"], ``ControlNetApply`` marked ``DEPRECATED`` (server.py ``node_info`` adds ``"deprecated": true``) and the
  display names "Apply ControlNet" / "Apply ControlNet (OLD)"; the other display names from
  ``NODE_DISPLAY_NAME_MAPPINGS`` ("Load ControlNet Model", "Load ControlNet Model (diff)", "Load CLIP Vision",
  "CLIP Vision Encode", "Load Upscale Model", "Upscale Image (using Model)");
* ComfyUI ``comfy_extras/nodes_upscale_model.py``: ``UpscaleModelLoader`` (``model_name`` from ``upscale_models``,
  "loaders"), ``ImageUpscaleWithModel`` (``upscale_model``, ``image``; "image/upscaling");
* cubiq/ComfyUI_IPAdapter_plus ``IPAdapterPlus.py`` (HEAD 9d076a3): ``IPAdapterModelLoader`` (``ipadapter_file``
  from ``ipadapter``, "ipadapter/loaders"), ``IPAdapterAdvanced`` (its required and optional inputs, ranges and
  lists, ``WEIGHT_TYPES`` in order; ``RETURN_TYPES`` ("MODEL",), "ipadapter"), display names "IPAdapter Model
  Loader" / "IPAdapter Advanced", python module ``custom_nodes.ComfyUI_IPAdapter_plus``.

The ComfyUI entries were also checked against a newer ComfyUI's own ``/object_info`` answer saved in a public
repository (found through the search index, file id 39851315444): ControlNetApply (with ``"deprecated": true``),
ControlNetApplyAdvanced (optional ``vae``), ControlNetLoader, DiffControlNetLoader, CLIPVisionLoader,
CLIPVisionEncode (``crop``), UpscaleModelLoader and ImageUpscaleWithModel (python module
``comfy_extras.nodes_upscale_model``) are there exactly as written here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_comfy_nodes import entry, expected

from sumie.checkpoints.manager import ModelFolders, ModelManager
from sumie.comfy import NODE_CLASSES, ComfyEnvironment, ComfyFolders, object_info

WEIGHT_TYPES = ["linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "style transfer precise", "composition precise"]


def new_entries(files: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """The added nodes' entries."""
    strength = ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}]
    pct = {"min": 0.0, "max": 1.0, "step": 0.001}
    ipa = "custom_nodes.ComfyUI_IPAdapter_plus"
    up = "comfy_extras.nodes_upscale_model"
    advanced = entry({"positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "control_net": ["CONTROL_NET"],
                      "image": ["IMAGE"], "strength": strength, "start_percent": ["FLOAT", {"default": 0.0, **pct}],
                      "end_percent": ["FLOAT", {"default": 1.0, **pct}]},
                     ["CONDITIONING", "CONDITIONING"], "conditioning/controlnet", display="Apply ControlNet",
                     names=["positive", "negative"], name="ControlNetApplyAdvanced")
    advanced["input"]["optional"] = {"vae": ["VAE"]}
    advanced["input_order"]["optional"] = ["vae"]
    old = entry({"conditioning": ["CONDITIONING"], "control_net": ["CONTROL_NET"], "image": ["IMAGE"],
                 "strength": strength}, ["CONDITIONING"], "conditioning/controlnet", display="Apply ControlNet (OLD)",
                name="ControlNetApply")
    old["deprecated"] = True
    ip = entry({"model": ["MODEL"], "ipadapter": ["IPADAPTER"], "image": ["IMAGE"],
                "weight": ["FLOAT", {"default": 1.0, "min": -1, "max": 5, "step": 0.05}],
                "weight_type": [WEIGHT_TYPES], "combine_embeds": [["concat", "add", "subtract", "average",
                                                                    "norm average"]],
                "start_at": ["FLOAT", {"default": 0.0, **pct}], "end_at": ["FLOAT", {"default": 1.0, **pct}],
                "embeds_scaling": [["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"]]},
               ["MODEL"], "ipadapter", display="IPAdapter Advanced", module=ipa, name="IPAdapterAdvanced")
    ip["input"]["optional"] = {"image_negative": ["IMAGE"], "attn_mask": ["MASK"], "clip_vision": ["CLIP_VISION"]}
    ip["input_order"]["optional"] = ["image_negative", "attn_mask", "clip_vision"]
    return {
        "ControlNetLoader": entry({"control_net_name": [files["controlnet"]]}, ["CONTROL_NET"], "loaders",
                                  display="Load ControlNet Model", name="ControlNetLoader"),
        "DiffControlNetLoader": entry({"model": ["MODEL"], "control_net_name": [files["controlnet"]]},
                                      ["CONTROL_NET"], "loaders", display="Load ControlNet Model (diff)",
                                      name="DiffControlNetLoader"),
        "ControlNetApply": old,
        "ControlNetApplyAdvanced": advanced,
        "CLIPVisionLoader": entry({"clip_name": [files["clip_vision"]]}, ["CLIP_VISION"], "loaders",
                                  display="Load CLIP Vision", name="CLIPVisionLoader"),
        "CLIPVisionEncode": entry({"clip_vision": ["CLIP_VISION"], "image": ["IMAGE"], "crop": [["center", "none"]]},
                                  ["CLIP_VISION_OUTPUT"], "conditioning", display="CLIP Vision Encode",
                                  name="CLIPVisionEncode"),
        "IPAdapterModelLoader": entry({"ipadapter_file": [files["ipadapter"]]}, ["IPADAPTER"], "ipadapter/loaders",
                                      display="IPAdapter Model Loader", module=ipa, name="IPAdapterModelLoader"),
        "IPAdapterAdvanced": ip,
        "UpscaleModelLoader": entry({"model_name": [files["upscale_models"]]}, ["UPSCALE_MODEL"], "loaders",
                                    display="Load Upscale Model", module=up, name="UpscaleModelLoader"),
        "ImageUpscaleWithModel": entry({"upscale_model": ["UPSCALE_MODEL"], "image": ["IMAGE"]}, ["IMAGE"],
                                       "image/upscaling", display="Upscale Image (using Model)", module=up,
                                       name="ImageUpscaleWithModel"),
    }


@pytest.fixture
def env(tmp_path: Path) -> ComfyEnvironment:
    """A ComfyUI models folder with files of every kind the new loaders list."""
    models = tmp_path / "models"
    for kind, names in {"checkpoints": ["b.safetensors", "sub/a.ckpt"], "loras": ["style.safetensors"],
                        "vae": ["ft-mse.safetensors"], "controlnet": ["control_canny.pth", "t2i/depth.safetensors"],
                        "clip_vision": ["vit-h.safetensors"], "ipadapter": ["ip-adapter_sd15.bin"],
                        "upscale_models": ["4x-UltraSharp.pth", "RealESRGAN_x2.pth"]}.items():
        for f in names:
            (models / kind / f).parent.mkdir(parents=True, exist_ok=True)
            (models / kind / f).write_bytes(b"x")
    folders = ComfyFolders.under(tmp_path)
    folders.input.mkdir(parents=True)
    return ComfyEnvironment(folders, ModelManager(ModelFolders(tmp_path)))


def test_new_nodes_object_info_match_their_definitions(env: ComfyEnvironment) -> None:
    """Every added node's entry (keys in server.py's order), and the node set is the core set plus these."""
    files = {"controlnet": ["control_canny.pth", "t2i/depth.safetensors"], "clip_vision": ["vit-h.safetensors"],
             "ipadapter": ["ip-adapter_sd15.bin"], "upscale_models": ["4x-UltraSharp.pth", "RealESRGAN_x2.pth"]}
    want = new_entries(files)
    info = json.loads(json.dumps(object_info(env)))
    core = expected({"checkpoints": ["b.safetensors", "sub/a.ckpt"], "loras": ["style.safetensors"],
                     "vae": ["ft-mse.safetensors"], "input": []})
    assert sorted(NODE_CLASSES) == sorted([*core, *want])
    for name, e in want.items():
        assert info[name] == e, name
        assert list(info[name]) == list(e), name
