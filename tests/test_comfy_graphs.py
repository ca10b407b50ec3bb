"""More ComfyUI graphs on tiny random-weight models: img2img (denoise < 1) and inpainting with ComfyUI's numbers,
LoRA nodes, prompt weighting, CLIPSetLastLayer, SDXL's size conditioning.

img2img is compared with k-diffusion as in test_comfy_execution: sigmas ``get_sigmas(int(steps / denoise))[-(steps
+ 1):]`` (``KSampler.set_steps``), start ``latent * scale + noise * sigma0`` (``noise_scaling`` below sigma_max).
Inpainting checks ``KSamplerX0Inpaint``'s contract: where the noise mask is 0 the result is the original latent.
Prompt weights follow ``sd1_clip.ClipTokenWeightEncoder``: ``(z - z_empty) * w + z_empty`` per weighted token.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lora_testfiles import write_kohya
from PIL import Image, ImageDraw
from reference_kdiffusion import load as load_kdiffusion
from safetensors.torch import save_file
from test_comfy_execution import CFG, NEGATIVE, POSITIVE, SEED, SIZE, _context, _Inner, example_prompt, mad, run, saved

from sumie.checkpoints.manager import ModelFolders, ModelManager
from sumie.checkpoints.save import random_single_file
from sumie.comfy import ComfyEnvironment, ComfyFolders, PromptExecutor, check_request
from sumie.comfy import sampler as cs
from sumie.comfy.nodes.base import RunContext
from sumie.comfy.nodes.conditioning import (
    ConditioningSetArea,
    ConditioningSetMask,
    ConditioningSetTimestepRange,
    encode_text,
)
from sumie.comfy.nodes.latent import InpaintModelConditioning, VAEEncodeForInpaint, vae_encode
from sumie.comfy.nodes.loaders import load_checkpoint
from sumie.comfy.nodes.sampling import KSampler
from sumie.configs import TINY
from sumie.models.unet import sdxl_adm_vector
from sumie.pipelines.control import JobControl
from sumie.prompts.text_conditioning import ConditioningOptions, TextConditioner

STEPS, DENOISE = 4, 0.6


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ComfyUI folder: tiny SD1 and SDXL checkpoints, a kohya LoRA for the SD1 one, an input image."""
    base = tmp_path_factory.mktemp("comfy_graphs")
    ckpts = base / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    save_file(random_single_file(TINY["sd1"], seed=0), str(ckpts / "tiny_sd1.safetensors"))
    save_file(random_single_file(TINY["sdxl"], seed=1), str(ckpts / "tiny_sdxl.safetensors"))
    save_file(random_single_file(TINY["sdxl_refiner"], seed=3), str(ckpts / "tiny_refiner.safetensors"))
    inpaint = TINY["sd1"].with_(unet=replace(TINY["sd1"].unet, in_channels=9))
    save_file(random_single_file(inpaint, seed=2), str(ckpts / "tiny_sd1_inpaint.safetensors"))
    manager = ModelManager(ModelFolders(base))
    write_kohya(base / "models" / "loras" / "style.safetensors", manager.get("checkpoint", "tiny_sd1.safetensors"),
                scale=0.5)
    return base


@pytest.fixture(scope="module")
def manager(root: Path) -> ModelManager:
    """The module's model manager."""
    return ModelManager(ModelFolders(root))


@pytest.fixture
def env(tmp_path: Path, manager: ModelManager) -> ComfyEnvironment:
    """Fresh folders with an input image."""
    folders = ComfyFolders.under(tmp_path)
    folders.input.mkdir(parents=True)
    img = Image.new("RGB", (SIZE, SIZE), (200, 120, 40))
    ImageDraw.Draw(img).ellipse((10, 10, 50, 40), fill=(20, 60, 220))
    img.save(folders.input / "init.png")
    return ComfyEnvironment(folders, manager)


def img2img_prompt() -> dict[str, Any]:
    """LoadImage -> VAEEncode -> KSampler(denoise) -> VAEDecode -> SaveImage."""
    p = example_prompt("tiny_sd1.safetensors")
    p["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    p["10"] = {"class_type": "LoadImage", "inputs": {"image": "init.png"}}
    p["3"]["inputs"].update(steps=STEPS, denoise=DENOISE)
    return p


def test_img2img_matches_comfyui_denoise_handling(env: ComfyEnvironment) -> None:
    """denoise < 1: the last steps + 1 sigmas of int(steps / denoise), started from latent + noise * sigma0."""
    result, events = run(env, img2img_prompt())
    assert result.success, result.error
    assert [d["max"] for e, d in events if e == "progress"] == [STEPS] * STEPS
    ours = np.asarray(Image.open(saved(env, result)[0]).convert("RGB"))
    models = load_checkpoint(env, "tiny_sd1.safetensors")[0].models
    k_sampling, k_external = load_kdiffusion()
    den = k_external.CompVisDenoiser(_Inner(models.unet), quantize=True).float()
    sigmas = den.get_sigmas(int(STEPS / DENOISE)).float()[-(STEPS + 1):]
    pixels = torch.from_numpy(np.asarray(Image.open(env.folders.input / "init.png")).astype(np.float32) / 255.0)
    vae = models.vae
    with torch.no_grad():
        latent = vae.encode(pixels.permute(2, 0, 1)[None] * 2 - 1).mean * vae.config.scaling_factor
    cond, uncond = _context(models, POSITIVE), _context(models, NEGATIVE)

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        c, u = den(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond])).chunk(2)
        return u + (c - u) * CFG

    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        x = k_sampling.sample_euler(model, latent + noise * sigmas[0], sigmas, disable=True)
        img = vae.decode(x / vae.config.scaling_factor).float()
    ref = np.clip(255.0 * torch.clamp((img + 1) / 2, 0, 1)[0].permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)
    diff = mad(ours, ref)
    print(f"img2img: mean abs difference {diff:.4f}/255")
    assert diff < 1.0
    # A1111's plan (int(denoise * steps) + 1 steps of the steps-step schedule) is another image
    a1111 = den.get_sigmas(STEPS).float()[STEPS - int(DENOISE * STEPS) - 1:]
    assert len(a1111) != len(sigmas) or not torch.allclose(a1111, sigmas)


def _ctx(env: ComfyEnvironment) -> RunContext:
    return RunContext(env, "3", {}, None, JobControl())


def test_inpainting_keeps_the_unmasked_latent(env: ComfyEnvironment) -> None:
    """KSampler with a noise mask (VAEEncodeForInpaint): outside the mask the result is the encoded latent."""
    model, clip, vae = load_checkpoint(env, "tiny_sd1.safetensors")
    pixels = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 16:48, 16:48] = 1.0
    (latent,) = VAEEncodeForInpaint().run(_ctx(env), pixels=pixels, vae=vae, mask=mask, grow_mask_by=6).outputs
    assert latent["noise_mask"].shape == (1, 1, SIZE, SIZE) and latent["noise_mask"].sum() > mask.sum()
    pos = [[encode_text(clip, POSITIVE)[0], {}]]
    neg = [[encode_text(clip, NEGATIVE)[0], {}]]
    (out,) = KSampler().run(_ctx(env), model, SEED, 3, CFG, "euler", "normal", pos, neg, latent, 1.0).outputs
    f = vae.downscale
    keep = torch.nn.functional.interpolate(latent["noise_mask"], size=(SIZE // f, SIZE // f), mode="bilinear") == 0
    keep = keep.expand_as(out["samples"])
    torch.testing.assert_close(out["samples"][keep], latent["samples"][keep], rtol=1e-5, atol=1e-5)
    assert (out["samples"][~keep] - latent["samples"][~keep]).abs().mean() > 0.1
    # the grey fill: masked pixels encode as 0.5 grey
    grey = vae_encode(vae, torch.full((1, SIZE, SIZE, 3), 0.5))
    inside = slice(6, 10)
    assert (latent["samples"][..., inside, inside] - grey[..., inside, inside]).abs().max() < 0.5


def test_lora_nodes(env: ComfyEnvironment) -> None:
    """LoraLoader changes the image, strength 0 leaves it as it was, the model's weights are restored after the
    run, and LoraLoaderModelOnly (UNet only) gives a third image."""
    base = example_prompt("tiny_sd1.safetensors")
    plain, _ = run(env, base)
    lora = copy.deepcopy(base)
    lora["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1],
                                                         "lora_name": "style.safetensors", "strength_model": 1.0,
                                                         "strength_clip": 1.0}}
    lora["3"]["inputs"]["model"] = ["10", 0]
    lora["6"]["inputs"]["clip"] = ["10", 1]
    lora["7"]["inputs"]["clip"] = ["10", 1]
    with_lora, _ = run(env, lora)
    only = copy.deepcopy(base)
    only["10"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0], "lora_name": "style.safetensors",
                                                                  "strength_model": 1.0}}
    only["3"]["inputs"]["model"] = ["10", 0]
    model_only, _ = run(env, only)
    off = copy.deepcopy(lora)
    off["10"]["inputs"].update(strength_model=0.0, strength_clip=0.0)
    zero, _ = run(env, off)
    again, _ = run(env, base)
    imgs = [np.asarray(Image.open(saved(env, r)[0])) for r in (plain, with_lora, model_only, zero, again)]
    assert all(r.success for r in (plain, with_lora, model_only, zero, again))
    assert mad(imgs[0], imgs[1]) > 1.0 and mad(imgs[1], imgs[2]) > 0.1 and mad(imgs[0], imgs[2]) > 0.1
    assert np.array_equal(imgs[0], imgs[3]) and np.array_equal(imgs[0], imgs[4])


def test_prompt_weights_and_last_layer(env: ComfyEnvironment) -> None:
    """``(cat:1.5)``: that token is (z - z_empty) * 1.5 + z_empty, the others as unweighted; CLIPSetLastLayer -2
    is A1111's clip skip 2."""
    _, clip, _ = load_checkpoint(env, "tiny_sd1.safetensors")
    weighted, _, _ = encode_text(clip, "a (cat:1.5) dog")
    plain, _, _ = encode_text(clip, "a cat dog")
    empty, _, _ = encode_text(clip, "")
    want = plain.clone()
    want[:, 2] = (plain[:, 2] - empty[:, 2]) * 1.5 + empty[:, 2]
    torch.testing.assert_close(weighted, want)
    assert not torch.allclose(weighted, plain)
    skip2, _, _ = encode_text(clip.with_layer(-2), "a cat dog")
    m = clip.models
    ref = TextConditioner(m.config, m.text_encoders, None, ConditioningOptions(clip_skip=2))(["a cat dog"]).context
    torch.testing.assert_close(skip2, ref)
    assert not torch.allclose(skip2, plain)


def test_sdxl_size_conditioning(env: ComfyEnvironment) -> None:
    """SDXL's ADM vector: CLIPTextEncodeSDXL's sizes, else the latent size x 8 (``encode_model_conds``); the
    SDXL graph runs with CLIPTextEncodeSDXL and a plain CLIPTextEncode negative."""
    model, clip, _ = load_checkpoint(env, "tiny_sdxl.safetensors")
    pooled = torch.randn(1, model.models.config.unet.adm_in_channels - 6 * 256)
    y = cs._adm(model, {"pooled_output": pooled}, (1, 4, 8, 12), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(y, sdxl_adm_vector(pooled, torch.tensor([[64.0, 96, 0, 0, 64, 96]]), 256))
    opts = {"pooled_output": pooled, "width": 1024, "height": 768, "crop_w": 8, "crop_h": 16, "target_width": 512,
            "target_height": 256}
    y = cs._adm(model, opts, (1, 4, 8, 12), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(y, sdxl_adm_vector(pooled, torch.tensor([[768.0, 1024, 16, 8, 256, 512]]), 256))
    p = example_prompt("tiny_sdxl.safetensors")
    p["6"] = {"class_type": "CLIPTextEncodeSDXL", "inputs": {
        "clip": ["4", 1], "width": 1024, "height": 1024, "crop_w": 0, "crop_h": 0, "target_width": 1024,
        "target_height": 1024, "text_g": "a castle", "text_l": "a castle, " * 30}}
    result, _ = run(env, p)
    assert result.success, result.error
    context, pooled_g, _ = encode_text(clip, "a castle")
    assert context.shape[-1] == sum(e.width for e in model.models.config.text_encoders) and pooled_g is not None


def test_area_and_mask_composition(env: ComfyEnvironment) -> None:
    """calc_cond_batch: entries averaged with their weights (an area's 8-cell edge ramps, a mask's values times
    mask_strength, times strength), 0 where nothing acts; timestep ranges switch entries on and off."""
    model, _, _ = load_checkpoint(env, "tiny_sd1.safetensors")

    def const(v: float) -> list[list[Any]]:
        return [[torch.full((1, 77, 8), v), {}]]

    ctx = _ctx(env)
    (area,) = ConditioningSetArea().run(ctx, const(3.0), width=128, height=128, x=64, y=64, strength=1.0).outputs
    mask = torch.zeros(1, 32, 32)
    mask[:, :16, :] = 0.5
    (masked,) = ConditioningSetMask().run(ctx, const(5.0), mask=mask, strength=2.0, set_cond_area="default").outputs
    shape = (1, 4, 32, 32)
    guide = cs.ComfyCFG(model, const(1.0) + area + masked, const(0.0), 1.0, shape)
    guide.denoiser = lambda x, sigma, context, **kw: context.mean(dim=(1, 2))[:, None, None, None].expand_as(x)
    out = guide(torch.zeros(shape), torch.tensor([1.0]))
    ramp = torch.ones(16, 16)
    for t in range(8):  # inner edges on all four sides (the area is inside the latent)
        ramp[t] *= (t + 1) / 8
        ramp[15 - t] *= (t + 1) / 8
        ramp[:, t] *= (t + 1) / 8
        ramp[:, 15 - t] *= (t + 1) / 8
    a = torch.zeros(32, 32)
    a[8:24, 8:24] = ramp
    m = mask[0] * 2.0
    want = (1.0 + 3.0 * a + 5.0 * m) / (1.0 + a + m)
    torch.testing.assert_close(out[0, 0], want)
    (late,) = ConditioningSetTimestepRange().run(ctx, const(7.0), start=0.5, end=1.0).outputs
    guide = cs.ComfyCFG(model, late, const(0.0), 1.0, shape)
    guide.denoiser = lambda x, sigma, context, **kw: context.mean(dim=(1, 2))[:, None, None, None].expand_as(x)
    high, low = guide.ds.sigma_max.reshape(1), torch.tensor([0.1])
    assert guide(torch.zeros(shape), high).abs().max() == 0  # not active yet: nothing predicts, 0
    assert torch.all(guide(torch.zeros(shape), low) == 7.0)
    bounds = cs._area_and_mult({"mask": mask, "set_area_to_bounds": True}, shape, torch.device("cpu"), torch.float32)
    assert bounds[0] == (16, 32, 0, 0)


def test_inpaint_model_conditioning(env: ComfyEnvironment) -> None:
    """A 9-channel inpainting UNet gets [rounded mask, scaled latent of the grey-filled image] beside its input
    (``concat_cond``); without a mask, ones and ComfyUI's blank-image latent; a KSampler run keeps the unmasked
    latent."""
    model, clip, vae = load_checkpoint(env, "tiny_sd1_inpaint.safetensors")
    pixels = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 8:40, 16:56] = 1.0
    pos = [[encode_text(clip, POSITIVE)[0], {}]]
    neg = [[encode_text(clip, NEGATIVE)[0], {}]]
    p, n, latent = InpaintModelConditioning().run(_ctx(env), pos, neg, vae, pixels, mask).outputs
    assert torch.equal(latent["samples"], vae_encode(vae, pixels)) and torch.equal(latent["noise_mask"][:, 0], mask)
    f = vae.downscale
    shape = (1, 4, SIZE // f, SIZE // f)
    guide = cs.ComfyCFG(model, p, n, CFG, shape)
    scaled = vae.scale_latents(latent["samples"])
    guide.set_inpaint(scaled, None)
    concat = guide.positive[0].concat
    small = torch.nn.functional.interpolate(latent["noise_mask"], size=shape[-2:], mode="bilinear").round()
    assert torch.equal(concat[:, :1], small)
    torch.testing.assert_close(concat[:, 1:], vae.scale_latents(p[0][1]["concat_latent_image"]))
    plain = cs.ComfyCFG(model, pos, neg, CFG, shape)
    plain.set_inpaint(scaled, None)
    assert torch.equal(plain.positive[0].concat[:, 0], torch.ones(1, *shape[-2:]))
    assert torch.allclose(plain.positive[0].concat[0, 1:, 0, 0], torch.tensor(cs.BLANK_INPAINT_LATENT))
    (out,) = KSampler().run(_ctx(env), model, SEED, 3, CFG, "euler", "normal", p, n, latent, 1.0).outputs
    keep = (small == 0).expand_as(out["samples"])
    torch.testing.assert_close(out["samples"][keep], latent["samples"][keep], rtol=1e-5, atol=1e-5)


def test_sdxl_refiner_conditioning(env: ComfyEnvironment) -> None:
    """The refiner's ADM ids are (h, w, crop_h, crop_w, aesthetic score); the score defaults to 6, or 2.5 on the
    negative side (``SDXLRefiner.encode_adm``); a refiner graph runs with CLIPTextEncodeSDXLRefiner."""
    model, _, _ = load_checkpoint(env, "tiny_refiner.safetensors")
    pooled = torch.randn(1, model.models.config.unet.adm_in_channels - 5 * 256)
    cpu = torch.device("cpu")
    for negative, score in ((False, 6.0), (True, 2.5)):
        y = cs._adm(model, {"pooled_output": pooled}, (1, 4, 8, 8), cpu, torch.float32, negative)
        torch.testing.assert_close(y, sdxl_adm_vector(pooled, torch.tensor([[64.0, 64, 0, 0, score]]), 256))
    p = example_prompt("tiny_refiner.safetensors")
    p["6"] = {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {"ascore": 7.5, "width": 512, "height": 512,
                                                                    "text": "a castle", "clip": ["4", 1]}}
    result, _ = run(env, p)
    assert result.success, result.error


def test_load_image_reruns_when_the_file_changes(env: ComfyEnvironment) -> None:
    """LoadImage's IS_CHANGED is the file's hash: the same graph re-runs from LoadImage when the file changed,
    and is fully cached when it did not."""
    executor = PromptExecutor(env)
    check = check_request({"prompt": img2img_prompt()}, env)
    first = executor.execute(copy.deepcopy(check.prompt), "a", check.outputs)
    again = executor.execute(copy.deepcopy(check.prompt), "b", check.outputs)
    Image.new("RGB", (SIZE, SIZE), (10, 200, 30)).save(env.folders.input / "init.png")
    changed = executor.execute(copy.deepcopy(check.prompt), "c", check.outputs)
    assert first.success and "10" in first.executed and again.executed == []
    assert changed.executed == ["10", "5", "3", "8", "9"]
