"""LoRA parity with diffusers: a kohya LoRA on a small random SD1 model, applied by Sumie (tag -> patched weights)
and by diffusers' ``StableDiffusionPipeline.load_lora_weights`` (its kohya converter + PEFT layers), same seeds.

The model and the comparison are test_pipeline_parity's (diffusers' scheduler spacing, per-image CPU noise, the
diffusers convention, uint8 with diffusers' rounding): mean |diff| < 1/255 and in fact < 0.05 levels. diffusers runs
the LoRA unmerged (``W x + s B A x``) and Sumie merged (``(W + s B A) x``), so the outputs differ by fp32 rounding
only. The check can fail: the LoRA moves the image by far more than the tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import test_pipeline_parity as pp
from lora_testfiles import write_kohya
from test_pipeline_parity import sd1, tokenizers  # noqa: F401 - the fixtures

PROMPT = "a photo of a cat, best quality"


def test_kohya_lora_image_matches_diffusers(sd1: pp.Models, tokenizers: dict[str, Any],  # noqa: F811
                                           tmp_path: Path) -> None:
    lora = write_kohya(tmp_path / "cat_style.safetensors", sd1.engine.models, rank=4, alpha=2.0, seed=11, scale=0.15)
    s = pp.SCHEDS["euler"]
    p = pp.params(prompt=PROMPT + " <lora:cat_style:1>", sampler=s.sampler)
    sigmas = s.sigmas_fn(sd1.engine, "linspace")
    plain = pp.u8(sd1.engine.generate(pp.params(sampler=s.sampler), sigmas_fn=sigmas).images)
    handler = sd1.engine.extra_networks["lora"]
    handler.library.dirs.append(tmp_path)  # type: ignore[attr-defined]
    try:
        ours = pp.u8(sd1.engine.generate(p, sigmas_fn=sigmas).images)
    finally:
        handler.unpatch()  # type: ignore[attr-defined]
        handler.library.dirs.remove(tmp_path)  # type: ignore[attr-defined]
    pipe = pp.pipeline("StableDiffusionPipeline", sd1, s.make("linspace"), tokenizers)
    pipe.load_lora_weights(str(tmp_path), weight_name=lora.name, adapter_name="cat_style")
    try:
        n = len(pp.SEEDS)
        ref = pipe([PROMPT] * n, negative_prompt=[p.negative_prompt] * n, num_inference_steps=4,
                   guidance_scale=7.0, height=64, width=64, output_type="np",
                   latents=pp.start_noise((4, 8, 8), pp.SEEDS)).images
    finally:
        pipe.unload_lora_weights()
    pp.check(ours, pp.ref_u8(ref), "kohya LoRA txt2img (Sumie tag vs diffusers load_lora_weights)")
    assert pp.mad(ours, plain) > 20 * pp.STRICT  # the LoRA changed the image far beyond the tolerance
