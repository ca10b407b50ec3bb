"""A1111 ``parameters`` text: writing (A1111 1.10's create_infotext), reading (parse_generation_parameters),
GenerationParams round trips, and PNG/JPEG/WebP metadata files.

Expected strings are what A1111 1.10 writes for the same settings, derived from its code by hand:
``modules/processing.py`` create_infotext builds a dict with the fixed fields in this order -- Steps, Sampler,
Schedule type, CFG scale, Image CFG scale, Seed, Face restoration, Size, Model hash, Model, FP8 weight, Cache FP16
weight for LoRA, VAE hash, VAE, Variation seed, Variation seed strength, Seed resize from, Denoising strength,
Conditional mask weight, Clip skip, ENSD, Token merging ratio(s), Init image hash, RNG, Tiling -- then
``**p.extra_generation_params`` (a key already present keeps its place and takes the new value), then Version and
User; None values are dropped and each value goes through ``infotext_utils.quote``. The settings assumed are A1111's
defaults (model hash and name on, no external VAE so no VAE fields, no face restoration or tiling), values entered
through the web UI (whole numbers arrive as JSON integers: ``CFG scale: 7``) and "Random number generator source:
CPU" (Sumie's noise source, so ``RNG: CPU``). Sumie writes ``Version: sumie-<version>`` where A1111 writes
``v1.10.0``; :func:`a1111` swaps that one field.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from sumie import __version__
from sumie.errors import ConfigError, SumieError
from sumie.pipelines import output
from sumie.pipelines.infotext import (
    format_infotext,
    inpaint_from_infotext,
    params_from_infotext,
    parse_infotext,
    quote,
    sampler_labels,
    unquote,
)
from sumie.pipelines.output import next_free_path, read_png_info, save_image, save_png
from sumie.pipelines.params import GenerationParams, HiresParams, InpaintParams, RefinerParams
from sumie.sampling import registry

MODEL = {"model_name": "v1-5-pruned-emaonly", "model_hash": "6ce0161689"}


def a1111(text: str) -> str:
    """An A1111 1.10 infotext with Sumie's Version field."""
    assert text.endswith("Version: v1.10.0")
    return text.removesuffix("v1.10.0") + f"sumie-{__version__}"


def fmt(p: GenerationParams, seed: int = 1, subseed: int = 0, index: int = 0, **kw: object) -> str:
    return format_infotext(p, seed=seed, subseed=subseed, index=index, **{**MODEL, **kw})  # type: ignore[arg-type]


def mask() -> Image.Image:
    return Image.new("L", (64, 64), 255)


# --- writing: exact A1111 strings ---


def test_txt2img_default_sampler() -> None:
    # Sampler DPM++ 2M with "Automatic": its get_sigmas resolves A1111's per-sampler default (Karras) and sets
    # extra_generation_params["Schedule type"] = "Karras", which lands in the fixed third place. Empty negative
    # prompt -> no line. cfg 7 from the UI slider -> "7".
    p = GenerationParams(prompt="a cat", width=512, height=512)
    assert fmt(p) == a1111(
        "a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, RNG: CPU, Version: v1.10.0")


def test_euler_a_negative_prompt_clip_skip_and_fractional_cfg() -> None:
    # Euler a has no default scheduler in A1111: scheduler None -> get_sigmas writes nothing and p.scheduler
    # "Automatic" stays. Clip skip is written when > 1, in its fixed place before RNG. 7.5 -> "7.5".
    p = GenerationParams(prompt="masterpiece, 1girl", negative_prompt="lowres, bad anatomy", steps=28,
                         sampler="Euler a", cfg_scale=7.5, clip_skip=2, width=512, height=768)
    assert fmt(p, seed=123456789) == a1111(
        "masterpiece, 1girl\nNegative prompt: lowres, bad anatomy\nSteps: 28, Sampler: Euler a, Schedule type: "
        "Automatic, CFG scale: 7.5, Seed: 123456789, Size: 512x768, Model hash: 6ce0161689, "
        "Model: v1-5-pruned-emaonly, Clip skip: 2, RNG: CPU, Version: v1.10.0")


def test_img2img_denoising_strength() -> None:
    # Img2img init sets extra_generation_params["Denoising strength"]: it takes the fixed place after
    # "Seed resize from". A sumie-style sampler name is written with A1111's label.
    p = GenerationParams(prompt="a house", sampler="euler", width=512, height=512, init_images=[mask()],
                         denoising_strength=0.6)
    assert fmt(p, seed=42) == a1111(
        "a house\nSteps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 42, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.6, RNG: CPU, Version: v1.10.0")


def test_hires_fix_scale() -> None:
    # Txt2img init with hires: Denoising strength (fixed place), then in extra_generation_params order: Hires
    # prompt / negative prompt / schedule type (None: same as the first pass), Hires upscale (calculate_target_
    # resolution), Hires steps (only when set), Hires upscaler. DPM++ 2M SDE's default schedule is Exponential.
    # Clip skip's fixed place is after Denoising strength's.
    p = GenerationParams(prompt="a castle", sampler="DPM++ 2M SDE", width=512, height=512, clip_skip=2,
                         hires=HiresParams(scale=2.0, steps=10, denoising_strength=0.7))
    assert fmt(p, seed=5) == a1111(
        "a castle\nSteps: 20, Sampler: DPM++ 2M SDE, Schedule type: Exponential, CFG scale: 7, Seed: 5, "
        "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Clip skip: 2, "
        "RNG: CPU, "
        "Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, Version: v1.10.0")


def test_hires_fix_resize_without_steps() -> None:
    # An explicit target size is written as "Hires resize: WxH" instead of "Hires upscale"; steps 0 -> omitted.
    p = GenerationParams(prompt="a castle", sampler="Euler a", width=512, height=768,
                         hires=HiresParams(upscaler="lanczos", resize_x=1024, resize_y=1536, denoising_strength=0.5))
    assert fmt(p, seed=5) == a1111(
        "a castle\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 5, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.5, RNG: CPU, "
        "Hires resize: 1024x1536, Hires upscaler: Lanczos, Version: v1.10.0")


def test_variation_seed() -> None:
    # Variation seed / strength only when the strength is not 0; the seeds given are this image's.
    p = GenerationParams(prompt="a cat", width=512, height=512, subseed_strength=0.3)
    assert fmt(p, seed=7, subseed=99) == a1111(
        "a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 7, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Variation seed: 99, Variation seed strength: 0.3, "
        "RNG: CPU, Version: v1.10.0")
    p.subseed_strength = 0.0
    assert "Variation" not in fmt(p, seed=7, subseed=99)


def test_prompts_with_commas_quotes_newlines_are_written_raw_values_are_quoted() -> None:
    # Prompts are never quoted. Values with ',', ':' or a newline are json.dumps'ed with ensure_ascii=False;
    # a model hash of None (unknown) drops the field.
    p = GenerationParams(prompt='a "quoted" cat, (red:1.2)\nsecond line', negative_prompt='bad: "x"\nworse',
                         width=512, height=512)
    got = fmt(p, model_name='my "model", v2: ünï', model_hash=None)
    assert got == a1111(
        'a "quoted" cat, (red:1.2)\nsecond line\nNegative prompt: bad: "x"\nworse\nSteps: 20, Sampler: DPM++ 2M, '
        'Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model: "my \\"model\\", v2: ünï", RNG: CPU, '
        "Version: v1.10.0")


def test_inpainting_fields() -> None:
    # StableDiffusionProcessingImg2Img.init with a mask: Mask mode (inverted only), Mask blur (> 0), Inpaint area
    # + Masked area padding (only masked), Masked content (fill / latent noise / latent nothing; "original" is
    # not written), in that order, after the fixed fields.
    p = GenerationParams(prompt="a red hat", sampler="Euler a", width=512, height=512, init_images=[mask()],
                         inpaint=InpaintParams(mask=mask(), mask_blur=4, invert=True, fill="latent_noise",
                                               full_res=True, full_res_padding=32))
    assert fmt(p, seed=3) == a1111(
        "a red hat\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 3, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, RNG: CPU, "
        "Mask mode: Inpaint not masked, Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32, "
        "Masked content: latent noise, Version: v1.10.0")
    p.inpaint = InpaintParams(mask=mask(), mask_blur=0, fill="original")
    assert "Mask" not in fmt(p) and "Inpaint area" not in fmt(p)


def test_extra_networks_then_sampler_fields() -> None:
    # Lora / TI hashes are set when extra networks activate (before sampling), "Eta" when the sampler initialises
    # (Sampler.initialize writes it when eta differs from the sampler's default 1.0). Hash lists are quoted.
    p = GenerationParams(prompt="a cat <lora:add_detail:0.8>", sampler="Euler a", eta=0.67, width=512, height=512)
    extra = {"Lora hashes": "add_detail: 7c6bad76eb54", "TI hashes": "easynegative: c74b4e810b03"}
    assert fmt(p, seed=9, extra=extra) == a1111(
        "a cat <lora:add_detail:0.8>\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 9, "
        "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, RNG: CPU, "
        'Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03", Eta: 0.67, '
        "Version: v1.10.0")
    p.eta = 1.0  # the default: not written
    assert "Eta" not in fmt(p)


def test_ddim_eta_and_beta_schedule_and_refiner() -> None:
    # DDIM is a timesteps sampler: "Eta DDIM" (default 0). Beta: get_sigmas adds its alpha/beta options (0.6).
    p = GenerationParams(prompt="x", sampler="DDIM", eta=0.3, width=512, height=512)
    assert fmt(p).endswith("Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, RNG: CPU, "
                           f"Eta DDIM: 0.3, Version: sumie-{__version__}")
    assert "Sampler: DDIM, Schedule type: Automatic," in fmt(p)
    p = GenerationParams(prompt="x", sampler="Euler", scheduler="Beta", width=512, height=512)
    assert fmt(p) == a1111(
        "x\nSteps: 20, Sampler: Euler, Schedule type: Beta, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, RNG: CPU, Beta schedule alpha: 0.6, "
        "Beta schedule beta: 0.6, Version: v1.10.0")
    # apply_refiner: "Refiner" (A1111 adds " [hash]"), "Refiner switch at", set at the switch during sampling.
    p = GenerationParams(prompt="x", width=1024, height=1024, refiner=RefinerParams("/m/sd_xl_refiner_1.0.safetensors"))
    assert fmt(p).endswith("RNG: CPU, Refiner: sd_xl_refiner_1.0, Refiner switch at: 0.8, "
                           f"Version: sumie-{__version__}")


def test_extra_fields_take_their_fixed_place_and_lists_are_per_image() -> None:
    p = GenerationParams(prompt="x", width=512, height=512)
    got = fmt(p, index=1, extra={"VAE": "vae-ft-mse", "VAE hash": "735e4c3a44", "Note": ["a", "b"], "Flag": "Flag"})
    assert ("Model: v1-5-pruned-emaonly, VAE hash: 735e4c3a44, VAE: vae-ft-mse, RNG: CPU, Note: b, Flag, "
            f"Version: sumie-{__version__}") in got  # A1111 writes a value equal to its key as the bare key
    with pytest.raises(ConfigError, match="field name"):
        fmt(p, extra={"bad: key": 1})
    # ENSD (eta noise seed delta) has a fixed place between Clip skip and RNG, and reads back into the params
    p = GenerationParams(prompt="x", sampler="Euler a", clip_skip=2, width=512, height=512)
    got = fmt(p, extra={"ENSD": 31337})
    assert "Clip skip: 2, ENSD: 31337, RNG: CPU, Version" in got
    assert params_from_infotext(got).eta_noise_seed_delta == 31337


def test_sampler_labels() -> None:
    assert sampler_labels("dpmpp_2m", None) == ("DPM++ 2M", "Karras")
    assert sampler_labels("DPM++ 2M Karras", None) == ("DPM++ 2M", "Karras")
    assert sampler_labels("DPM++ 3M SDE", "automatic") == ("DPM++ 3M SDE", "Exponential")
    assert sampler_labels("euler_ancestral", "karras") == ("Euler a", "Karras")
    assert sampler_labels("Euler", "normal") == ("Euler", "Normal")
    assert sampler_labels("Euler", "uniform") == ("Euler", "Uniform")
    assert sampler_labels("euler", "sgm_uniform") == ("Euler", "SGM Uniform")
    # ComfyUI flavours that behave differently from A1111's namesakes keep Sumie's names
    assert sampler_labels("uni_pc", None) == ("uni_pc", "Automatic")
    assert sampler_labels("dpmpp_2m", "beta") == ("DPM++ 2M", "beta_comfyui")
    assert sampler_labels("uni_pc_bh2", None) == ("uni_pc_bh2", "Automatic")
    for sampler in registry.sampler_names():
        for scheduler in (None, "karras", "beta", "kl_optimal", "simple", "linear_quadratic"):
            want = registry.resolve(sampler, scheduler)
            got = registry.resolve(*sampler_labels(sampler, scheduler))
            assert (got[0].name, got[0].discard_penultimate_sigma, got[0].tail, got[1]) == (
                want[0].name, want[0].discard_penultimate_sigma, want[0].tail, want[1]), (sampler, scheduler)


def test_size_required_and_unknown_sampler() -> None:
    with pytest.raises(ConfigError, match="width"):
        fmt(GenerationParams(prompt="x"))
    with pytest.raises(ConfigError, match="unknown sampler"):
        fmt(GenerationParams(prompt="x", sampler="nope", width=64, height=64))


def test_quote_unquote() -> None:
    assert quote(7.0) == "7" and quote(7.5) == "7.5" and quote(2) == "2" and quote(True) == "True"
    assert quote("a, b") == '"a, b"' and quote("a: b") == '"a: b"' and quote("a\nb") == '"a\\nb"'
    assert quote("ünï, x") == '"ünï, x"'  # ensure_ascii=False
    assert quote('say "hi"') == 'say "hi"'  # A1111 leaves inner quotes alone
    assert unquote('"a, b"') == "a, b" and unquote('"broken') == '"broken' and unquote("plain") == "plain"


# --- reading: A1111 texts ---

REAL_110 = (
    "masterpiece, best quality, 1girl, <lora:add_detail:0.8>\n"
    "Negative prompt: easynegative, (worst quality:1.4), lowres\n"
    "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, "
    "Model hash: 7f96a1a9ca, Model: AnythingV5_v5PrtRE, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, "
    'Hires steps: 15, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", '
    'TI hashes: "easynegative: c74b4e810b03", Version: v1.10.0'
)
REAL_151 = (
    "photo of a [cat:dog:0.5]\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 768x512, Model hash: e1441589a6, "
    "Model: v1-5-pruned, Version: v1.5.1"
)
REAL_OLD_HIRES = (
    "a castle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 1024x1024, Model hash: 925997e9, "
    "Denoising strength: 0.7, First pass size: 0x0"
)
REAL_INPAINT = (
    "a red hat\nNegative prompt: blurry\n"
    "Steps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: 3000000000, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Mask blur: 4, "
    "Inpaint area: Only masked, Masked area padding: 32, Masked content: latent noise, RNG: CPU, Version: v1.10.0"
)
REAL_SDXL = (
    "cinematic photo, a lighthouse,\nstormy sea, 35mm\n"
    "Negative prompt: drawing, painting\n"
    "Steps: 40, Sampler: DPM++ 2M SDE, Schedule type: Exponential, CFG scale: 6.5, Seed: 77, Size: 1024x1024, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, VAE hash: 235745af8d, VAE: sdxl_vae.safetensors, "
    'Emphasis: No norm, Hires prompt: "a \\"storm\\", night", RNG: CPU, Refiner: sd_xl_refiner_1.0 [7440042bbd], '
    "Refiner switch at: 0.8, Version: v1.10.0"
)


def test_parse_a1111_110() -> None:
    d = parse_infotext(REAL_110)
    assert d["Prompt"] == "masterpiece, best quality, 1girl, <lora:add_detail:0.8>"
    assert d["Negative prompt"] == "easynegative, (worst quality:1.4), lowres"
    assert (d["Steps"], d["Sampler"], d["Schedule type"], d["CFG scale"]) == ("25", "DPM++ 2M", "Karras", "7")
    assert (d["Size-1"], d["Size-2"], d["Clip skip"], d["Denoising strength"]) == ("512", "768", "2", "0.45")
    assert d["Lora hashes"] == "add_detail: 7c6bad76eb54" and d["TI hashes"] == "easynegative: c74b4e810b03"
    assert d["Version"] == "v1.10.0" and d["RNG"] == "GPU"  # A1111's defaults for missing fields
    assert d["Hires resize-1"] == 0 and d["Hires sampler"] == "Use same sampler"
    assert "Downcast alphas_cumprod" not in d
    with pytest.warns(UserWarning, match="RNG: GPU"):
        p = params_from_infotext(REAL_110)
    assert (p.steps, p.sampler, p.scheduler, p.cfg_scale, p.seed) == (25, "DPM++ 2M", "Karras", 7.0, 1234567890)
    assert (p.width, p.height, p.clip_skip) == (512, 768, 2)
    assert p.hires == HiresParams(scale=2.0, upscaler="latent", steps=15, denoising_strength=0.45)


def test_parse_old_combined_sampler_and_backcompat() -> None:
    d = parse_infotext(REAL_151)
    assert (d["Sampler"], d["Schedule type"], d["Clip skip"]) == ("DPM++ 2M", "Karras", "1")
    # v1.5.1 < 1.6.0 with "[" in the prompt, and < v1.7.0-225: A1111 turns its compatibility options on
    assert d["Old prompt editing timelines"] is True and d["Downcast alphas_cumprod"] is True
    with pytest.warns(UserWarning, match="Old prompt editing timelines"):
        p = params_from_infotext(d)
    assert registry.resolve(p.sampler, p.scheduler)[1] == "karras" and (p.width, p.height) == (768, 512)
    assert p.cfg_scale == 7.5 and p.hires is None


@pytest.mark.parametrize("version", ["v1.5.1", "v1.6.0", "v1.6.0-RC-28-gabcdef0", "v1.7.0", "v1.7.0-224-gdeadbee",
                                     "v1.7.0-225-g1234567", "v1.8.0-RC", "v1.8.0", "v1.10.1", "sumie-0.1.0",
                                     "f2.0.1v1.10.1-previous-305-g1", "0.1.0"])
def test_version_backcompat_matches_packaging(version: str) -> None:
    from packaging import version as pv  # the oracle A1111 itself uses

    m = re.match(r"([^-]+-[^-]+)-.*", version)
    try:
        ver = pv.parse(m.group(1) if m else version)
    except pv.InvalidVersion:
        ver = None
    d = parse_infotext(f"[a:b:3]\nSteps: 20, Sampler: DDIM, Seed: 1, Refiner: r, Version: {version}")
    want = {
        "Old prompt editing timelines": ver is not None and ver < pv.parse("1.6.0"),
        "Pad conds v0": ver is not None and ver < pv.parse("1.6.0"),
        "Downcast alphas_cumprod": ver is not None and ver < pv.parse("v1.7.0-225"),
        "Refiner switch by sampling steps": ver is not None and ver < pv.parse("1.8.0"),
    }
    assert {k: d.get(k, False) for k in want} == want


def test_parse_old_hires_first_pass_size() -> None:
    d = parse_infotext(REAL_OLD_HIRES)
    # First pass size 0x0: A1111's old automatic first pass, ~512x512 pixels in multiples of 64
    assert (d["Size-1"], d["Size-2"], d["Hires resize-1"], d["Hires resize-2"]) == (512, 512, 1024, 1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = params_from_infotext(d)
    assert (p.width, p.height) == (512, 512)
    assert p.hires == HiresParams(upscaler="latent", denoising_strength=0.7, resize_x=1024, resize_y=1024)


def test_parse_inpaint_fields() -> None:
    d = parse_infotext(REAL_INPAINT)
    p = params_from_infotext(d)  # RNG: CPU and nothing unsupported: no warning expected
    assert p.denoising_strength == 0.75 and p.hires is None and p.seed == 3000000000 and p.cfg_scale == 5.0
    ip = inpaint_from_infotext(d, mask())
    assert (ip.mask_blur, ip.invert, ip.fill, ip.full_res, ip.full_res_padding) == (4, False, "latent_noise", True, 32)
    ip = inpaint_from_infotext("x\nSteps: 1, Sampler: Euler, Seed: 1, Denoising strength: 0.5", mask())
    assert (ip.mask_blur, ip.fill, ip.full_res) == (0, "original", False)  # A1111 omits blur 0 and "original"


def test_parse_multiline_quoted_and_refiner() -> None:
    d = parse_infotext(REAL_SDXL)
    assert d["Prompt"] == "cinematic photo, a lighthouse,\nstormy sea, 35mm"
    assert d["Hires prompt"] == 'a "storm", night' and d["VAE"] == "sdxl_vae.safetensors"
    with pytest.warns(UserWarning) as record:
        p = params_from_infotext(d)
    message = str(record[0].message)
    assert "Emphasis: No norm" in message and "Hires prompt" in message and "RNG" not in message
    assert p.refiner == RefinerParams(model="sd_xl_refiner_1.0", switch_at=0.8)
    assert (p.width, p.height, p.cfg_scale, p.steps) == (1024, 1024, 6.5, 40)


def test_parse_edge_cases() -> None:
    # No parameter line (fewer than 3 fields on the last line): everything is prompt.
    assert parse_infotext("just a prompt\nwith two lines")["Prompt"] == "just a prompt\nwith two lines"
    d = parse_infotext("Steps: 20, Sampler: Euler, CFG scale: 7, Model: , Seed: 3")
    assert d["Prompt"] == "" and "Model" not in d and d["Seed"] == "3"  # empty values are skipped, as in A1111
    with pytest.raises(ConfigError, match="Steps"):
        params_from_infotext("x\nSteps: many, Sampler: Euler, Seed: 1")
    with pytest.raises(ConfigError, match="Latent \\(bicubic\\)"):  # upscaler models are names; latent modes are not
        params_from_infotext("x\nSteps: 20, Sampler: Euler, Seed: 1, Denoising strength: 0.5, "
                             "Hires upscaler: Latent (bicubic)")
    with pytest.raises(ConfigError, match="unknown sampler"):
        params_from_infotext("x\nSteps: 20, Sampler: DPM adaptive, Seed: 1")


# --- round trips ---


def _assert_same(p: GenerationParams, q: GenerationParams, seed: int, subseed: int) -> None:
    assert (q.prompt, q.negative_prompt, q.steps, q.cfg_scale, q.seed) == (
        p.prompt, p.negative_prompt, p.steps, 7.0 if p.cfg_scale is None else p.cfg_scale, seed)
    (a, ka), (b, kb) = registry.resolve(p.sampler, p.scheduler), registry.resolve(q.sampler, q.scheduler)
    assert (a.name, a.discard_penultimate_sigma, a.tail, ka) == (b.name, b.discard_penultimate_sigma, b.tail, kb)
    assert (q.width, q.height, q.clip_skip, q.subseed_strength) == (p.width, p.height, p.clip_skip, p.subseed_strength)
    if p.subseed_strength:
        assert q.subseed == subseed
    if p.init_images:
        assert q.denoising_strength == p.denoising_strength
    assert q.hires == p.hires
    assert (q.eta, q.s_noise, q.cfg_rescale) == (p.eta, p.s_noise, p.cfg_rescale)
    assert (q.sdxl_original_size, q.sdxl_crop, q.sdxl_target_size, q.convention) == (
        p.sdxl_original_size, p.sdxl_crop, p.sdxl_target_size, p.convention)
    assert (q.refiner.model if q.refiner else None) == (p.refiner.model.split("/")[-1].removesuffix(".safetensors")
                                                       if p.refiner else None)


ROUND_TRIPS = [
    GenerationParams(prompt="a cat", width=512, height=512),
    GenerationParams(prompt='a "q", b: c\nline 2', negative_prompt="n, m\nk", sampler="euler_ancestral", steps=7,
                     cfg_scale=4.25, width=640, height=448, clip_skip=2, eta=0.5, s_noise=0.9),
    GenerationParams(prompt="i2i", sampler="DPM++ SDE Karras", init_images=[Image.new("RGB", (8, 8))],
                     denoising_strength=0.33, width=512, height=512, subseed_strength=0.25),
    GenerationParams(prompt="hr", sampler="uni_pc", scheduler="beta", width=512, height=512,
                     hires=HiresParams(scale=1.5, upscaler="lanczos", steps=12, denoising_strength=0.55)),
    GenerationParams(prompt="hr2", sampler="dpmpp_3m_sde", width=512, height=512,
                     hires=HiresParams(resize_x=1000, resize_y=0, denoising_strength=1.0)),
    GenerationParams(prompt="xl", sampler="DDIM", eta=0.2, width=1024, height=768, cfg_rescale=0.7,
                     sdxl_original_size=(2048, 1536), sdxl_crop=(64, 32), sdxl_target_size=(768, 1024),
                     convention="diffusers", refiner=RefinerParams("/x/refiner.safetensors", switch_at=0.75)),
    GenerationParams(prompt="i2i+hr", init_images=[Image.new("RGB", (8, 8))], denoising_strength=0.4,
                     width=512, height=512, hires=HiresParams(denoising_strength=0.6)),
]


@pytest.mark.parametrize("p", ROUND_TRIPS)
def test_round_trip(p: GenerationParams) -> None:
    text = fmt(p, seed=123, subseed=456)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Sumie's own texts hold nothing Sumie cannot apply
        q = params_from_infotext(text)
    _assert_same(p, q, 123, 456)


_line = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=30).map(str.strip)


@settings(max_examples=200, deadline=None)
@given(value=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40),
       prompt=st.lists(_line, max_size=3).map("\n".join).filter(lambda s: not s.lstrip().startswith("Negative")))
def test_any_value_and_prompt_survive(value: str, prompt: str) -> None:
    # Any field value survives A1111's quoting and parsing, except values shaped like a size (split into -1/-2).
    assume(not re.match(r"^(\d+)x(\d+)$", value))
    p = GenerationParams(prompt=prompt, width=64, height=64)
    d = parse_infotext(fmt(p, extra={"Note": value}))
    assert d["Note"] == value
    # A1111 strips the whole text, then each prompt line; empty lines inside stay
    assert d["Prompt"] == "\n".join(x.strip() for x in prompt.lstrip().split("\n"))


# --- files ---


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def test_save_png_text_chunk_and_read_back(tmp_path: Path) -> None:
    text = fmt(GenerationParams(prompt="a cat, b", width=64, height=64))
    path = save_png(Image.new("RGB", (64, 64), (10, 20, 30)), tmp_path / "00000-1.png", text)
    chunks = _chunks(path.read_bytes())
    assert (b"tEXt", b"parameters\0" + text.encode("latin-1")) in chunks  # PngInfo.add_text, as A1111
    assert chunks.index(next(c for c in chunks if c[0] == b"tEXt")) < [c[0] for c in chunks].index(b"IDAT")
    assert read_png_info(path) == text
    with Image.open(path) as im:
        assert im.getpixel((0, 0)) == (10, 20, 30) and im.info["parameters"] == text


def test_non_latin_text_goes_to_itxt(tmp_path: Path) -> None:
    text = "猫, ねこ\nSteps: 20, Sampler: Euler, Seed: 1"
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", text)
    itxt = [body for kind, body in _chunks(path.read_bytes()) if kind == b"iTXt"]
    assert len(itxt) == 1 and itxt[0].startswith(b"parameters\0\0\0") and text.encode() in itxt[0]
    assert read_png_info(path) == text


def test_no_overwrite(tmp_path: Path) -> None:
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", "first")
    with pytest.raises(SumieError, match="already exists.*overwrite"):
        save_png(Image.new("RGB", (8, 8)), path, "second")
    assert read_png_info(path) == "first"
    save_png(Image.new("RGB", (8, 8)), path, "second", overwrite=True)
    assert read_png_info(path) == "second" and sorted(os.listdir(tmp_path)) == ["a.png"]
    with pytest.raises(ConfigError, match=r"\.png"):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "a.jpg", "x")


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".webp"])
def test_jpeg_webp_parameters_in_exif_user_comment_as_a1111(tmp_path: Path, suffix: str) -> None:
    import piexif
    import piexif.helper

    text = "猫, (a cat:1.2)\nNegative prompt: dog\nSteps: 20, Sampler: Euler, Seed: 1"
    path = save_image(Image.new("RGBA", (16, 16), (200, 10, 10, 128)), tmp_path / f"a{suffix}", text, quality=95)
    # A1111's reader: piexif.load, then UserComment.load of the Exif IFD's tag
    raw = piexif.load(str(path))["Exif"][piexif.ExifIFD.UserComment]
    assert raw == piexif.helper.UserComment.dump(text, encoding="unicode")
    assert piexif.helper.UserComment.load(raw) == text and read_png_info(path) == text
    with Image.open(path) as im:
        assert im.format == ("WEBP" if suffix == ".webp" else "JPEG")
        assert np.abs(np.asarray(im.convert("RGB"), dtype=int)[8, 8] - (200, 10, 10)).max() < 40
    # and an image written the way A1111 writes it reads back here
    other = tmp_path / f"b{suffix}"
    Image.new("RGB", (16, 16)).save(other, quality=80, exif=piexif.dump(
        {"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(text, encoding="unicode")}}))
    assert read_png_info(other) == text


def test_save_image_refuses_unknown_types_and_bad_quality(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown image type '\.gif'.*\.png, \.jpg, \.jpeg, \.webp"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "a.gif", "x")
    with pytest.raises(ConfigError, match=r"quality must be in \[1, 100\]"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "a.jpg", "x", quality=101)
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = Image.Image.save

    def broken_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        fp.write(b"\x89PNG\r\n\x1a\npartial")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(SumieError, match="No space left"):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", "x")
    assert os.listdir(tmp_path) == []

    def crashing_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        real_save(self, fp, *args, **kwargs)
        raise RuntimeError("bug")

    monkeypatch.setattr(Image.Image, "save", crashing_save)
    with pytest.raises(RuntimeError):
        save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", "x")
    assert os.listdir(tmp_path) == []


def test_file_appearing_during_write_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a.png"
    real = output._write_tmp

    def racing(*args: object) -> Path:
        tmp = real(*args)  # type: ignore[arg-type]
        target.write_bytes(b"someone else's")
        return tmp

    monkeypatch.setattr(output, "_write_tmp", racing)
    with pytest.raises(SumieError, match="already exists"):
        save_png(Image.new("RGB", (8, 8)), target, "x")
    assert target.read_bytes() == b"someone else's" and os.listdir(tmp_path) == ["a.png"]
    target.unlink()

    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # file systems without hard links
    with pytest.raises(SumieError, match="already exists"):
        save_png(Image.new("RGB", (8, 8)), target, "x")
    target.unlink()
    monkeypatch.setattr(output, "_write_tmp", real)
    assert read_png_info(save_png(Image.new("RGB", (8, 8)), target, "y")) == "y"
    assert os.listdir(tmp_path) == ["a.png"]


def test_permissions_follow_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = save_png(Image.new("RGB", (8, 8)), tmp_path / "sub" / "a.png", None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert read_png_info(path) is None


def test_next_free_path(tmp_path: Path) -> None:
    assert next_free_path(tmp_path / "missing", "1") == tmp_path / "missing" / "00000-1.png"
    assert next_free_path(tmp_path, "123") == tmp_path / "00000-123.png"
    for name in ("00007-1.png", "00003-x.png", "notes.txt", "grid-0001.png", "12.txt"):
        (tmp_path / name).write_bytes(b"")
    assert next_free_path(tmp_path, "42") == tmp_path / "00013-42.png"  # after the largest leading number, 12
    assert next_free_path(tmp_path, 'a/b:"c"?') == tmp_path / "00013-a_b__c__.png"
    assert next_free_path(tmp_path, "") == tmp_path / "00013.png"
    (tmp_path / "00013.png").write_bytes(b"")
    assert next_free_path(tmp_path, "") == tmp_path / "00014.png"


@pytest.mark.parametrize("fmt_name", ["JPEG", "WEBP"])
def test_read_exif_user_comment(tmp_path: Path, fmt_name: str) -> None:
    # A1111 writes piexif UserComment(encoding="unicode"): b"UNICODE\0" + UTF-16 big-endian.
    text = "a cat, 猫\nSteps: 20, Sampler: Euler, Seed: 1"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    path = tmp_path / f"a.{fmt_name.lower()}"
    Image.new("RGB", (16, 16)).save(path, format=fmt_name, exif=exif.tobytes())
    assert read_png_info(path) == text
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-le")  # some tools write little-endian
    Image.new("RGB", (16, 16)).save(path, format=fmt_name, exif=exif.tobytes())
    assert read_png_info(path) == text


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(SumieError, match="no such file"):
        read_png_info(tmp_path / "missing.png")
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(SumieError, match="cannot read .* as an image"):
        read_png_info(tmp_path / "x.png")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    (tmp_path / "plain.png").write_bytes(buf.getvalue())
    assert read_png_info(tmp_path / "plain.png") is None


def test_png_reproduces_the_image(tmp_path: Path) -> None:
    # End to end: generate, save with metadata, read the PNG back, regenerate from its text alone.
    import numpy as np
    from safetensors.torch import save_file

    from sumie.checkpoints.save import random_single_file
    from sumie.configs import TINY
    from sumie.pipelines.engine import load

    save_file({k: v.contiguous() for k, v in random_single_file(TINY["sd1"], 0).items()}, tmp_path / "tiny.safetensors")
    engine = load(tmp_path / "tiny.safetensors")
    p = GenerationParams(prompt="a cat, (red:1.2)", negative_prompt="bad", steps=3, sampler="Euler a", clip_skip=2,
                         width=64, height=64, seed=-1, subseed_strength=0.5, hires=HiresParams(scale=1.5, steps=2))
    first = engine.generate(p)
    path = save_png(first.images[0], next_free_path(tmp_path / "out", str(first.seeds[0])), first.infotexts[0])
    assert path.name == f"00000-{first.seeds[0]}.png"
    again = engine.generate(params_from_infotext(read_png_info(path)))
    assert again.infotexts[0] == first.infotexts[0]
    with Image.open(path) as saved:
        assert np.array_equal(np.asarray(saved), np.asarray(again.images[0]))
