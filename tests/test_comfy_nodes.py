"""``/object_info`` entries and the small nodes' semantics, against ComfyUI's own definitions.

Each expected entry is written from ComfyUI's source, read for this (the commit the search index holds):
``nodes.py`` at e60e19b (the ``INPUT_TYPES`` / ``RETURN_TYPES`` / ``CATEGORY`` / ``DESCRIPTION`` /
``OUTPUT_TOOLTIPS`` of each class and ``NODE_DISPLAY_NAME_MAPPINGS``), ``comfy_extras/nodes_custom_sampler.py``
in its ``io.Schema`` form (SamplerCustom, KSamplerSelect, BasicScheduler, KarrasScheduler, CFGGuider, RandomNoise,
SamplerCustomAdvanced: categories ``sampling/custom_sampling/...``, ``control_after_generate`` on the seeds),
``comfy_extras/nodes_clip_sdxl.py`` (CLIPTextEncodeSDXL / Refiner, ``INPUT_TYPES`` style) and ``server.py``
``node_info`` (the keys and their order). Option lists that depend on files (checkpoints, LoRAs, VAEs, input
images) come from the folders; the sampler and scheduler lists are ComfyUI's ``SAMPLER_NAMES`` /
``SCHEDULER_NAMES`` in ComfyUI's order, keeping the names Sumie runs (written out here, so dropping or reordering
one fails).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from sumie.checkpoints.manager import ModelFolders, ModelManager
from sumie.comfy import NODE_CLASSES, ComfyEnvironment, ComfyFolders, object_info
from sumie.comfy.nodes.base import RunContext
from sumie.pipelines.control import JobControl

MAXRES = 16384
SEED_MAX = 0xFFFFFFFFFFFFFFFF
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde",
            "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun",
            "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ddim", "uni_pc", "uni_pc_bh2"]
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic",
              "kl_optimal"]
CFG = ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}]
CUSTOM = "comfy_extras.nodes_custom_sampler"


def entry(required: dict[str, Any], output: list[str], category: str, *, display: str | None = None,
          description: str = "", module: str = "nodes", output_node: bool = False, names: list[str] | None = None,
          tooltips: list[str] | None = None, hidden: dict[str, Any] | None = None, name: str = "") -> dict[str, Any]:
    """An /object_info entry as server.py's node_info builds it."""
    inputs: dict[str, Any] = {"required": required}
    if hidden is not None:
        inputs["hidden"] = hidden
    info = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()}, "output": output,
            "output_is_list": [False] * len(output), "output_name": names or output, "name": name,
            "display_name": display or name, "description": description, "python_module": module,
            "category": category, "output_node": output_node}
    if tooltips is not None:
        info["output_tooltips"] = tooltips
    return info


def expected(files: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Every implemented node's entry, from ComfyUI's definitions."""
    hidden = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
    upscale = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
    latent_upscale = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
    sdxl_size = ["INT", {"default": 1024.0, "min": 0, "max": MAXRES}]
    sdxl_crop = ["INT", {"default": 0, "min": 0, "max": MAXRES}]
    sdxl_text = ["STRING", {"multiline": True, "dynamicPrompts": True}]
    karras_f = lambda d, top: ["FLOAT", {"default": d, "min": 0.0, "max": top, "step": 0.01, "round": False}]  # noqa: E731
    e = {
        "KSampler": entry({
            "model": ["MODEL", {"tooltip": "The model used for denoising the input latent."}],
            "seed": ["INT", {"default": 0, "min": 0, "max": SEED_MAX,
                             "tooltip": "The random seed used for creating the noise."}],
            "steps": ["INT", {"default": 20, "min": 1, "max": 10000,
                              "tooltip": "The number of steps used in the denoising process."}],
            "cfg": ["FLOAT", {**CFG[1], "tooltip": "The Classifier-Free Guidance scale balances creativity and "
                              "adherence to the prompt. Higher values result in images more closely matching the "
                              "prompt however too high values will negatively impact quality."}],
            "sampler_name": [SAMPLERS, {"tooltip": "The algorithm used when sampling, this can affect the quality, "
                                        "speed, and style of the generated output."}],
            "scheduler": [SCHEDULERS, {"tooltip": "The scheduler controls how noise is gradually removed to form "
                                       "the image."}],
            "positive": ["CONDITIONING", {"tooltip": "The conditioning describing the attributes you want to include "
                                          "in the image."}],
            "negative": ["CONDITIONING", {"tooltip": "The conditioning describing the attributes you want to exclude "
                                          "from the image."}],
            "latent_image": ["LATENT", {"tooltip": "The latent image to denoise."}],
            "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "The amount of "
                                  "denoising applied, lower values will maintain the structure of the initial image "
                                  "allowing for image to image sampling."}],
        }, ["LATENT"], "sampling", display="KSampler", tooltips=["The denoised latent."],
            description="Uses the provided model, positive and negative conditioning to denoise the latent image."),
        "KSamplerAdvanced": entry({
            "model": ["MODEL"], "add_noise": [["enable", "disable"]],
            "noise_seed": ["INT", {"default": 0, "min": 0, "max": SEED_MAX}],
            "steps": ["INT", {"default": 20, "min": 1, "max": 10000}], "cfg": CFG,
            "sampler_name": [SAMPLERS], "scheduler": [SCHEDULERS], "positive": ["CONDITIONING"],
            "negative": ["CONDITIONING"], "latent_image": ["LATENT"],
            "start_at_step": ["INT", {"default": 0, "min": 0, "max": 10000}],
            "end_at_step": ["INT", {"default": 10000, "min": 0, "max": 10000}],
            "return_with_leftover_noise": [["disable", "enable"]],
        }, ["LATENT"], "sampling", display="KSampler (Advanced)"),
        "CheckpointLoaderSimple": entry(
            {"ckpt_name": [files["checkpoints"], {"tooltip": "The name of the checkpoint (model) to load."}]},
            ["MODEL", "CLIP", "VAE"], "loaders", display="Load Checkpoint",
            description="Loads a diffusion model checkpoint, diffusion models are used to denoise latents.",
            tooltips=["The model used for denoising latents.", "The CLIP model used for encoding text prompts.",
                      "The VAE model used for encoding and decoding images to and from latent space."]),
        "VAELoader": entry({"vae_name": [files["vae"]]}, ["VAE"], "loaders", display="Load VAE"),
        "LoraLoader": entry({
            "model": ["MODEL", {"tooltip": "The diffusion model the LoRA will be applied to."}],
            "clip": ["CLIP", {"tooltip": "The CLIP model the LoRA will be applied to."}],
            "lora_name": [files["loras"], {"tooltip": "The name of the LoRA."}],
            "strength_model": ["FLOAT", {**strength, "tooltip": "How strongly to modify the diffusion model. This "
                                         "value can be negative."}],
            "strength_clip": ["FLOAT", {**strength, "tooltip": "How strongly to modify the CLIP model. This value "
                                        "can be negative."}],
        }, ["MODEL", "CLIP"], "loaders", display="Load LoRA",
            tooltips=["The modified diffusion model.", "The modified CLIP model."],
            description="LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are "
                        "denoised such as applying styles. Multiple LoRA nodes can be linked together."),
        "LoraLoaderModelOnly": entry({"model": ["MODEL"], "lora_name": [files["loras"]],
                                      "strength_model": ["FLOAT", strength]}, ["MODEL"], "loaders"),
        "CLIPTextEncode": entry({
            "text": ["STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The text to be encoded."}],
            "clip": ["CLIP", {"tooltip": "The CLIP model used for encoding the text."}],
        }, ["CONDITIONING"], "conditioning", display="CLIP Text Encode (Prompt)",
            tooltips=["A conditioning containing the embedded text used to guide the diffusion model."],
            description="Encodes a text prompt using a CLIP model into an embedding that can be used to guide the "
                        "diffusion model towards generating specific images."),
        "CLIPSetLastLayer": entry({"clip": ["CLIP"], "stop_at_clip_layer": ["INT", {"default": -1, "min": -24,
                                                                                    "max": -1, "step": 1}]},
                                  ["CLIP"], "conditioning", display="CLIP Set Last Layer"),
        "ConditioningCombine": entry({"conditioning_1": ["CONDITIONING"], "conditioning_2": ["CONDITIONING"]},
                                     ["CONDITIONING"], "conditioning", display="Conditioning (Combine)"),
        "ConditioningConcat": entry({"conditioning_to": ["CONDITIONING"], "conditioning_from": ["CONDITIONING"]},
                                    ["CONDITIONING"], "conditioning", display="Conditioning (Concat)"),
        "ConditioningZeroOut": entry({"conditioning": ["CONDITIONING"]}, ["CONDITIONING"], "advanced/conditioning"),
        "ConditioningSetTimestepRange": entry({
            "conditioning": ["CONDITIONING"], "start": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0,
                                                                  "step": 0.001}],
            "end": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}],
        }, ["CONDITIONING"], "advanced/conditioning"),
        # INPUT_TYPES lists "clip" twice (after text_g and after text_l): the dict keeps the first place
        "CLIPTextEncodeSDXL": entry({
            "width": sdxl_size, "height": sdxl_size, "crop_w": sdxl_crop, "crop_h": sdxl_crop,
            "target_width": sdxl_size, "target_height": sdxl_size, "text_g": sdxl_text, "clip": ["CLIP"],
            "text_l": sdxl_text,
        }, ["CONDITIONING"], "advanced/conditioning", module="comfy_extras.nodes_clip_sdxl"),
        "CLIPTextEncodeSDXLRefiner": entry({
            "ascore": ["FLOAT", {"default": 6.0, "min": 0.0, "max": 1000.0, "step": 0.01}],
            "width": sdxl_size, "height": sdxl_size, "text": sdxl_text, "clip": ["CLIP"],
        }, ["CONDITIONING"], "advanced/conditioning", module="comfy_extras.nodes_clip_sdxl"),
        "ConditioningSetArea": entry({
            "conditioning": ["CONDITIONING"],
            "width": ["INT", {"default": 64, "min": 64, "max": MAXRES, "step": 8}],
            "height": ["INT", {"default": 64, "min": 64, "max": MAXRES, "step": 8}],
            "x": ["INT", {"default": 0, "min": 0, "max": MAXRES, "step": 8}],
            "y": ["INT", {"default": 0, "min": 0, "max": MAXRES, "step": 8}],
            "strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}],
        }, ["CONDITIONING"], "conditioning", display="Conditioning (Set Area)"),
        "ConditioningSetAreaPercentage": entry({
            "conditioning": ["CONDITIONING"],
            "width": ["FLOAT", {"default": 1.0, "min": 0, "max": 1.0, "step": 0.01}],
            "height": ["FLOAT", {"default": 1.0, "min": 0, "max": 1.0, "step": 0.01}],
            "x": ["FLOAT", {"default": 0, "min": 0, "max": 1.0, "step": 0.01}],
            "y": ["FLOAT", {"default": 0, "min": 0, "max": 1.0, "step": 0.01}],
            "strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}],
        }, ["CONDITIONING"], "conditioning", display="Conditioning (Set Area with Percentage)"),
        "ConditioningSetMask": entry({
            "conditioning": ["CONDITIONING"], "mask": ["MASK"],
            "strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}],
            "set_cond_area": [["default", "mask bounds"]],
        }, ["CONDITIONING"], "conditioning", display="Conditioning (Set Mask)"),
        "EmptyLatentImage": entry({
            "width": ["INT", {"default": 512, "min": 16, "max": MAXRES, "step": 8,
                              "tooltip": "The width of the latent images in pixels."}],
            "height": ["INT", {"default": 512, "min": 16, "max": MAXRES, "step": 8,
                               "tooltip": "The height of the latent images in pixels."}],
            "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096,
                                   "tooltip": "The number of latent images in the batch."}],
        }, ["LATENT"], "latent", display="Empty Latent Image", tooltips=["The empty latent image batch."],
            description="Create a new batch of empty latent images to be denoised via sampling."),
        "LatentUpscale": entry({
            "samples": ["LATENT"], "upscale_method": [latent_upscale],
            "width": ["INT", {"default": 512, "min": 0, "max": MAXRES, "step": 8}],
            "height": ["INT", {"default": 512, "min": 0, "max": MAXRES, "step": 8}],
            "crop": [["disabled", "center"]],
        }, ["LATENT"], "latent", display="Upscale Latent"),
        "LatentUpscaleBy": entry({"samples": ["LATENT"], "upscale_method": [latent_upscale],
                                  "scale_by": ["FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}]},
                                 ["LATENT"], "latent", display="Upscale Latent By"),
        "LatentFromBatch": entry({"samples": ["LATENT"], "batch_index": ["INT", {"default": 0, "min": 0, "max": 63}],
                                  "length": ["INT", {"default": 1, "min": 1, "max": 64}]},
                                 ["LATENT"], "latent/batch", display="Latent From Batch"),
        "RepeatLatentBatch": entry({"samples": ["LATENT"], "amount": ["INT", {"default": 1, "min": 1, "max": 64}]},
                                   ["LATENT"], "latent/batch", display="Repeat Latent Batch"),
        "SetLatentNoiseMask": entry({"samples": ["LATENT"], "mask": ["MASK"]}, ["LATENT"], "latent/inpaint",
                                    display="Set Latent Noise Mask"),
        "VAEDecode": entry({"samples": ["LATENT", {"tooltip": "The latent to be decoded."}],
                            "vae": ["VAE", {"tooltip": "The VAE model used for decoding the latent."}]},
                           ["IMAGE"], "latent", display="VAE Decode", tooltips=["The decoded image."],
                           description="Decodes latent images back into pixel space images."),
        "VAEEncode": entry({"pixels": ["IMAGE"], "vae": ["VAE"]}, ["LATENT"], "latent", display="VAE Encode"),
        "VAEEncodeForInpaint": entry({"pixels": ["IMAGE"], "vae": ["VAE"], "mask": ["MASK"],
                                      "grow_mask_by": ["INT", {"default": 6, "min": 0, "max": 64, "step": 1}]},
                                     ["LATENT"], "latent/inpaint", display="VAE Encode (for Inpainting)"),
        "InpaintModelConditioning": entry({"positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
                                           "vae": ["VAE"], "pixels": ["IMAGE"], "mask": ["MASK"]},
                                          ["CONDITIONING", "CONDITIONING", "LATENT"], "conditioning/inpaint",
                                          names=["positive", "negative", "latent"]),
        "SaveImage": entry({
            "images": ["IMAGE", {"tooltip": "The images to save."}],
            "filename_prefix": ["STRING", {"default": "ComfyUI", "tooltip": "The prefix for the file to save. This "
                                           "may include formatting information such as %date:yyyy-MM-dd% or %Empty "
                                           "Latent Image.width% to include values from nodes."}],
        }, [], "image", display="Save Image", output_node=True, hidden=hidden,
            description="Saves the input images to your ComfyUI output directory."),
        "PreviewImage": entry({"images": ["IMAGE"]}, [], "image", display="Preview Image", output_node=True,
                              hidden=hidden),
        "LoadImage": entry({"image": [files["input"], {"image_upload": True}]}, ["IMAGE", "MASK"], "image",
                           display="Load Image"),
        "LoadImageMask": entry({"image": [files["input"], {"image_upload": True}],
                                "channel": [["alpha", "red", "green", "blue"]]}, ["MASK"], "mask",
                               display="Load Image (as Mask)"),
        "ImageScale": entry({"image": ["IMAGE"], "upscale_method": [upscale],
                             "width": ["INT", {"default": 512, "min": 0, "max": MAXRES, "step": 1}],
                             "height": ["INT", {"default": 512, "min": 0, "max": MAXRES, "step": 1}],
                             "crop": [["disabled", "center"]]}, ["IMAGE"], "image/upscaling", display="Upscale Image"),
        "ImageScaleBy": entry({"image": ["IMAGE"], "upscale_method": [upscale],
                               "scale_by": ["FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}]},
                              ["IMAGE"], "image/upscaling", display="Upscale Image By"),
        "ImageInvert": entry({"image": ["IMAGE"]}, ["IMAGE"], "image", display="Invert Image"),
        "SamplerCustom": entry({
            "model": ["MODEL"], "add_noise": ["BOOLEAN", {"default": True}],
            "noise_seed": ["INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}],
            "cfg": CFG, "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "sampler": ["SAMPLER"],
            "sigmas": ["SIGMAS"], "latent_image": ["LATENT"],
        }, ["LATENT", "LATENT"], "sampling/custom_sampling", module=CUSTOM, names=["output", "denoised_output"]),
        "KSamplerSelect": entry({"sampler_name": [SAMPLERS]}, ["SAMPLER"], "sampling/custom_sampling/samplers",
                                module=CUSTOM),
        "BasicScheduler": entry({"model": ["MODEL"], "scheduler": [SCHEDULERS],
                                 "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
                                 "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}]},
                                ["SIGMAS"], "sampling/custom_sampling/schedulers", module=CUSTOM),
        "KarrasScheduler": entry({"steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
                                  "sigma_max": karras_f(14.614642, 5000.0), "sigma_min": karras_f(0.0291675, 5000.0),
                                  "rho": karras_f(7.0, 100.0)}, ["SIGMAS"], "sampling/custom_sampling/schedulers",
                                 module=CUSTOM),
        "CFGGuider": entry({"model": ["MODEL"], "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
                            "cfg": CFG}, ["GUIDER"], "sampling/custom_sampling/guiders", module=CUSTOM),
        "RandomNoise": entry({"noise_seed": ["INT", {"default": 0, "min": 0, "max": SEED_MAX,
                                                     "control_after_generate": True}]},
                             ["NOISE"], "sampling/custom_sampling/noise", module=CUSTOM),
        "SamplerCustomAdvanced": entry({"noise": ["NOISE"], "guider": ["GUIDER"], "sampler": ["SAMPLER"],
                                        "sigmas": ["SIGMAS"], "latent_image": ["LATENT"]}, ["LATENT", "LATENT"],
                                       "sampling/custom_sampling", module=CUSTOM, names=["output", "denoised_output"]),
    }
    for name, info in e.items():
        info["name"] = name
        info["display_name"] = info["display_name"] or name
    return e


@pytest.fixture
def env(tmp_path: Path) -> ComfyEnvironment:
    """A ComfyUI folder with model files (names only matter) and two input images."""
    models = tmp_path / "models"
    for kind, files in (("checkpoints", ["b.safetensors", "sub/a.ckpt"]), ("loras", ["style.safetensors"]),
                        ("vae", ["ft-mse.safetensors"])):
        for f in files:
            (models / kind / f).parent.mkdir(parents=True, exist_ok=True)
            (models / kind / f).write_bytes(b"x")
    folders = ComfyFolders.under(tmp_path)
    folders.input.mkdir(parents=True)
    Image.new("RGBA", (8, 8)).save(folders.input / "b.png")
    Image.new("RGB", (8, 8)).save(folders.input / "a.png")
    return ComfyEnvironment(folders, ModelManager(ModelFolders(tmp_path)))


def test_object_info_entries_match_comfyui(env: ComfyEnvironment) -> None:
    """Every node's entry equals ComfyUI's definition, keys in server.py's order, JSON-serialisable."""
    files = {"checkpoints": ["b.safetensors", "sub/a.ckpt"], "loras": ["style.safetensors"],
             "vae": ["ft-mse.safetensors"], "input": ["a.png", "b.png"]}
    want = expected(files)
    info = json.loads(json.dumps(object_info(env)))
    assert sorted(info) == sorted(NODE_CLASSES)
    assert set(want) <= set(info)  # the nodes added later are checked in test_comfy_new_nodes_info.py
    for name, entry_ in want.items():
        assert info[name] == entry_, name
        assert list(info[name]) == list(entry_), name  # key order of node_info
    assert object_info(env, "KSampler") == {"KSampler": object_info(env)["KSampler"]}
    assert object_info(env, "NoSuchNode") == {}


def test_embedded_model_listed_without_a_checkpoint_folder(tmp_path: Path) -> None:
    """No model folders: CheckpointLoaderSimple offers the embedded sumie-tiny."""
    env = ComfyEnvironment(ComfyFolders.under(tmp_path), ModelManager())
    assert object_info(env, "CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] \
        == ["sumie-tiny"]


def ctx(env: ComfyEnvironment) -> RunContext:
    """A run context for calling nodes directly."""
    return RunContext(env, "1", {}, None, JobControl())


def run(env: ComfyEnvironment, name: str, **inputs: Any) -> tuple[Any, ...]:
    """One node's outputs."""
    return NODE_CLASSES[name]().run(ctx(env), **inputs).outputs


def test_latent_batch_nodes(env: ComfyEnvironment) -> None:
    """LatentFromBatch remembers batch_index; RepeatLatentBatch continues it; SetLatentNoiseMask reshapes."""
    lat = {"samples": torch.arange(4.0).reshape(4, 1, 1, 1).repeat(1, 4, 2, 2)}
    (picked,) = run(env, "LatentFromBatch", samples=lat, batch_index=1, length=2)
    assert picked["batch_index"] == [1, 2] and picked["samples"][:, 0, 0, 0].tolist() == [1.0, 2.0]
    (clamped,) = run(env, "LatentFromBatch", samples=lat, batch_index=9, length=5)
    assert clamped["batch_index"] == [3]
    (rep,) = run(env, "RepeatLatentBatch", samples=picked, amount=3)
    assert rep["batch_index"] == [1, 2, 3, 4, 5, 6] and rep["samples"].shape[0] == 6
    (masked,) = run(env, "SetLatentNoiseMask", samples=lat, mask=torch.ones(16, 16))
    assert masked["noise_mask"].shape == (1, 1, 16, 16) and "noise_mask" not in lat
    (empty,) = run(env, "EmptyLatentImage", width=72, height=64, batch_size=2)
    assert empty["samples"].shape == (2, 4, 8, 9) and not empty["samples"].any()
    (up,) = run(env, "LatentUpscale", samples=lat, upscale_method="nearest-exact", width=0, height=32, crop="disabled")
    assert up["samples"].shape[-2:] == (8, 8)  # at least 64 px: 64 / 8
    (by,) = run(env, "LatentUpscaleBy", samples=lat, upscale_method="bilinear", scale_by=1.5)
    assert by["samples"].shape[-2:] == (3, 3)


def test_image_nodes(env: ComfyEnvironment) -> None:
    """LoadImage (alpha inverted as the mask), LoadImageMask channels, ImageScale keeps the aspect for 0,
    centre crop, ImageInvert."""
    img = Image.new("RGBA", (8, 4), (255, 0, 0, 64))
    img.save(env.folders.input / "c.png")
    image, mask = run(env, "LoadImage", image="c.png")
    assert image.shape == (1, 4, 8, 3) and torch.allclose(image[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(mask, torch.full((1, 4, 8), 1 - 64 / 255))
    (red,) = run(env, "LoadImageMask", image="c.png", channel="red")
    assert torch.equal(red, torch.ones(1, 4, 8))
    _, no_alpha = run(env, "LoadImage", image="a.png")
    assert torch.equal(no_alpha, torch.zeros(1, 64, 64))
    (scaled,) = run(env, "ImageScale", image=image, upscale_method="bilinear", width=16, height=0, crop="disabled")
    assert scaled.shape == (1, 8, 16, 3)
    (cropped,) = run(env, "ImageScale", image=image, upscale_method="nearest-exact", width=4, height=4,
                     crop="center")
    assert cropped.shape == (1, 4, 4, 3)
    (lz,) = run(env, "ImageScaleBy", image=image, upscale_method="lanczos", scale_by=2.0)
    assert lz.shape == (1, 8, 16, 3)
    (inv,) = run(env, "ImageInvert", image=image)
    assert torch.equal(inv, 1.0 - image)


def test_conditioning_nodes(env: ComfyEnvironment) -> None:
    """Combine appends entries, Concat appends the first ``from`` entry's tokens, ZeroOut zeroes context and
    pooled, SetTimestepRange records start / end percent; inputs are left as they were."""
    a = [[torch.ones(1, 77, 8), {"pooled_output": torch.ones(1, 4)}]]
    b = [[torch.full((1, 154, 8), 2.0), {}], [torch.zeros(1, 77, 8), {}]]
    (comb,) = run(env, "ConditioningCombine", conditioning_1=a, conditioning_2=b)
    assert len(comb) == 3 and comb[0] is a[0]
    (cat,) = run(env, "ConditioningConcat", conditioning_to=a, conditioning_from=b)
    assert cat[0][0].shape == (1, 231, 8) and cat[0][0][0, 100, 0] == 2.0
    (zero,) = run(env, "ConditioningZeroOut", conditioning=a)
    assert not zero[0][0].any() and not zero[0][1]["pooled_output"].any() and a[0][0].all()
    (rng,) = run(env, "ConditioningSetTimestepRange", conditioning=a, start=0.2, end=0.7)
    assert rng[0][1]["start_percent"] == 0.2 and rng[0][1]["end_percent"] == 0.7 and "start_percent" not in a[0][1]
