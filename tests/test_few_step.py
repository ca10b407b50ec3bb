"""Few-step generation: LCM-distilled UNets (guidance embedding), LCM-LoRA-style LCM sampling, SD-Turbo-style use.

Parity with diffusers (0.42) on random-weight models, built and compared as in ``test_pipeline_parity``: diffusers'
``LatentConsistencyModelPipeline`` + ``LCMScheduler`` on a UNet with ``time_cond_proj_dim=256`` (Sumie: sampler
"lcm", schedule "lcm", CFG scale = diffusers' guidance_scale); ``StableDiffusionPipeline`` + ``LCMScheduler`` on a
plain UNet at guidance 1 and 1.5 (how LCM-LoRA users run it); ``StableDiffusionPipeline`` /
``StableDiffusionImg2ImgPipeline`` + ``EulerAncestralDiscreteScheduler(timestep_spacing="trailing")`` at guidance
0 and 1 (SD-Turbo's recipe: 1 step, or 2 steps at strength 0.5). Tolerance: ``check`` of the parity tests (mean
|diff| < 1/255 and < 0.05 levels).

UNet calls are counted with a forward pre-hook on the loaded UNet (its batch rows and guidance input) and, for which
rows are cond and uncond, with a :class:`~sumie.pipelines.denoise.ModelHooks` wrapper.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file
from test_pipeline_parity import (
    NEGATIVE,
    PROMPT,
    SCHEDULER,
    SEEDS,
    STRICT,
    TINY_SD1,
    TINY_SDXL,
    Models,
    _vocab,
    build,
    check,
    generators,
    init_image,
    mad,
    params,
    pipeline,
    ref_u8,
    u8,
)

import sumie
from sumie.checkpoints.loader import load_models
from sumie.checkpoints.save import single_file_state_dict
from sumie.cli.main import main as cli_main
from sumie.configs import TINY, config_from_dict, config_to_dict
from sumie.errors import ConfigError
from sumie.models.unet import UNetModel, guidance_scale_embedding
from sumie.pipelines.denoise import ModelHooks
from sumie.pipelines.engine import Engine
from sumie.pipelines.params import GenerationParams
from sumie.sampling import registry, schedules
from sumie.sampling.discretization import DiscreteSigmas
from sumie.sampling.samplers.lcm import LCMDenoiser, lcm_timesteps

LCM_SD1 = dict(TINY_SD1, unet=dict(TINY_SD1["unet"], time_cond_proj_dim=256))


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Any]:
    """transformers' CLIP tokenizer over Sumie's packaged vocabulary (SD1 pads with EOS)."""
    vocab, merges = _vocab()
    return {pad: transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=token)
            for pad, token in (("eos", "<|endoftext|>"), ("bang", "!"))}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build(tmp_path_factory.mktemp("sd1"), TINY_SD1)


@pytest.fixture(scope="module")
def lcm(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build(tmp_path_factory.mktemp("lcm"), LCM_SD1, seed=3)


@pytest.fixture(scope="module")
def tiny() -> Engine:
    engine = sumie.load()
    engine.show_progress = False
    return engine


class UNetCalls:
    """Forward pre-hook on a UNet (Sumie's or diffusers'): (batch rows, guidance input) of every call, and the
    first call's input."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[tuple[int, torch.Tensor | None]] = []
        self.first: torch.Tensor | None = None
        self.handle = unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        g = kwargs.get("guidance")
        self.calls.append((int(args[0].shape[0]), None if g is None else g.detach().clone()))
        if self.first is None:
            self.first = args[0].detach().clone()

    def __enter__(self) -> UNetCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()

    @property
    def rows(self) -> list[int]:
        return [n for n, _ in self.calls]


def row_labels(denoisers: list[type] | None = None) -> tuple[ModelHooks, list[list[int]]]:
    """A wrapper that records each model call's row labels (0 = uncond, k >= 1 = cond k) and, into ``denoisers``,
    the type of the denoiser it wraps."""
    seen: list[list[int]] = []

    def wrapper(apply: Any, x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        seen.append(kw["call"].rows.tolist())
        if denoisers is not None:
            denoisers.append(type(apply))
        return apply(x, sigma, **kw)

    return ModelHooks(wrappers=[wrapper]), seen


# ----------------------------------------------------------------------------------- the guidance-embedding UNet


def test_guidance_embedding_unet_matches_diffusers_from_folder_and_single_file(
        lcm: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from diffusers import LatentConsistencyModelPipeline

    models = lcm.engine.models
    assert models.config.unet.guidance_embed_dim == 256
    assert models.config.unet == dataclasses.replace(TINY["sd1"].unet, guidance_embed_dim=256)
    assert config_from_dict(config_to_dict(models.config)) == models.config

    w = torch.tensor([0.0, 7.0, -1.0])
    ref_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)  # type: ignore
    torch.testing.assert_close(guidance_scale_embedding(w, 256), ref_emb, rtol=1e-5, atol=1e-5)

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, 64, generator=g)
    t = torch.tensor([999.0, 499.0, 19.0])
    with torch.no_grad():
        ref = lcm.parts["unet"](x, t, ctx, timestep_cond=ref_emb).sample
        ours = models.unet(x, t, ctx, guidance=w)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        # the embedding is an input that matters: w = 0 everywhere moves the output by far more than the tolerance
        assert (models.unet(x, t, ctx, guidance=torch.zeros(3)) - ours).abs().max() > 1e-2

    # LCM single files keep diffusers' name under model.diffusion_model. (diffusers' to-original script)
    sd = single_file_state_dict(models.config, models.unet, models.vae, models.text_encoders)
    assert sd["model.diffusion_model.time_embedding.cond_proj.weight"].shape == (32, 256)
    path = tmp_path / "lcm.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))  # no sumie.config: detected from the keys
    single = load_models(path)
    assert single.config.unet == models.config.unet
    with torch.no_grad():
        assert torch.equal(single.unet(x, t, ctx, guidance=w), ours)
    assert cli_main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unet"]["guidance_embed_dim"] == 256
    assert cli_main(["info", str(path)]) == 0
    assert "guidance:     embedded (256, LCM-distilled)" in capsys.readouterr().out


def test_guidance_input_needs_a_guidance_embedding() -> None:
    unet = UNetModel(TINY["sd1"].unet)
    assert unet.time_embedding is None
    x, ctx = torch.zeros(1, 4, 8, 8), torch.zeros(1, 77, 64)
    with pytest.raises(ValueError, match="no guidance embedding"):
        unet(x, torch.tensor([10.0]), ctx, guidance=torch.tensor([1.0]))


# ----------------------------------------------------------------------------------- schedules


def test_trailing_and_lcm_schedules_are_diffusers_timesteps() -> None:
    from diffusers import EulerDiscreteScheduler, LCMScheduler

    ds = DiscreteSigmas.from_betas()
    for n in (1, 2, 3, 4, 7, 8):
        euler = EulerDiscreteScheduler(**{**SCHEDULER, "timestep_spacing": "trailing"})
        euler.set_timesteps(n)
        torch.testing.assert_close(registry.make_sigmas(*registry.resolve("Euler", "trailing"), ds, n), euler.sigmas,
                                   rtol=1e-5, atol=0)
        sch = LCMScheduler(**SCHEDULER)
        sch.set_timesteps(n)
        assert torch.equal(lcm_timesteps(n), sch.timesteps)
        sigmas = registry.make_sigmas(*registry.resolve("LCM", "lcm"), ds, n)
        assert torch.equal(sigmas[:-1], ds.sigmas[sch.timesteps]) and sigmas[-1] == 0
    # trailing is ComfyUI's "simple" when n divides 1000, not otherwise (round vs floor of 1000 i / n)
    assert torch.equal(schedules.make_sigmas("trailing", ds, 4), schedules.make_sigmas("simple", ds, 4))
    assert not torch.equal(schedules.make_sigmas("trailing", ds, 3), schedules.make_sigmas("simple", ds, 3))
    with pytest.raises(ConfigError, match="LCM needs"):
        schedules.make_sigmas("lcm", ds, 51)


# ----------------------------------------------------------------------------------- LCM parity


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_unet_matches_latent_consistency_pipeline(lcm: Models, tokenizers: dict[str, Any], steps: int) -> None:
    from diffusers import LCMScheduler

    pipe = pipeline("LatentConsistencyModelPipeline", lcm, LCMScheduler(**SCHEDULER), tokenizers)
    ref = pipe([PROMPT] * len(SEEDS), num_inference_steps=steps, guidance_scale=8.0, height=64, width=64,
               generator=generators(SEEDS), output_type="np").images
    p = params(sampler="LCM", scheduler="lcm", steps=steps, cfg_scale=8.0, negative_prompt="")
    with UNetCalls(lcm.engine.models.unet) as calls:
        res = lcm.engine.generate(p)
    ours = u8(res.images)
    check(ours, ref_u8(ref), f"LCM UNet, {steps} step(s), guidance 8")
    assert res.warnings == []
    # one cond-only call per step over the batch, w = 8 - 1 embedded
    assert calls.rows == [len(SEEDS)] * steps
    assert all(g is not None and torch.equal(g, torch.full((len(SEEDS),), 7.0)) for _, g in calls.calls)
    # the scale reaches the UNet: guidance 1 (w = 0) gives other images (by ~0.7 levels on this random model)
    other = u8(lcm.engine.generate(dataclasses.replace(p, cfg_scale=1.0)).images)
    assert mad(other, ours) > 5 * STRICT


def test_lcm_unet_ignores_the_negative_prompt_with_a_warning(lcm: Models) -> None:
    p = params(sampler="LCM", scheduler="lcm", steps=2, cfg_scale=2.0, batch_size=1, negative_prompt="")
    hooks, labels = row_labels()
    with UNetCalls(lcm.engine.models.unet) as calls:
        plain = lcm.engine.generate(p, hooks=hooks)
    assert calls.rows == [1, 1] and labels == [[1], [1]]
    assert all(g is not None and torch.equal(g, torch.tensor([1.0])) for _, g in calls.calls)
    for convention in ("diffusers", "a1111"):
        negative = lcm.engine.generate(dataclasses.replace(p, negative_prompt=NEGATIVE, cfg_rescale=0.7,
                                                           convention=convention))
        assert any("negative prompt was ignored" in w for w in negative.warnings)
        assert any("CFG rescale was ignored" in w for w in negative.warnings)
        if convention == "diffusers":
            assert np.array_equal(u8(negative.images), u8(plain.images))
    with pytest.raises(ConfigError, match="AND needs an uncond pass"):
        lcm.engine.generate(dataclasses.replace(p, prompt="a cat AND a dog"))


@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_lcm_sampler_on_plain_unet_matches_stable_diffusion_pipeline(sd1: Models, tokenizers: dict[str, Any],
                                                                     guidance: float) -> None:
    # LCM-LoRA's recipe (the LoRA itself aside): a plain UNet, LCMScheduler, guidance 1 to 2, 4 steps
    from diffusers import LCMScheduler

    pipe = pipeline("StableDiffusionPipeline", sd1, LCMScheduler(**SCHEDULER), tokenizers)
    ref = pipe([PROMPT] * len(SEEDS), negative_prompt=[NEGATIVE] * len(SEEDS), num_inference_steps=4,
               guidance_scale=guidance, height=64, width=64, generator=generators(SEEDS), output_type="np").images
    p = params(sampler="LCM", scheduler="lcm", steps=4, cfg_scale=guidance)
    hooks, labels = row_labels()
    with UNetCalls(sd1.engine.models.unet) as calls:
        ours = u8(sd1.engine.generate(p, hooks=hooks).images)
    check(ours, ref_u8(ref), f"LCM sampler on a plain UNet, guidance {guidance}")
    n = len(SEEDS)
    if guidance == 1.0:  # no uncond pass, negative prompt or not
        assert calls.rows == [n] * 4 and labels == [[1] * n] * 4
    else:  # cond and uncond rows in one batched call
        assert calls.rows == [2 * n] * 4 and labels == [[1] * n + [0] * n] * 4
    assert all(g is None for _, g in calls.calls)
    # the LCM sampler is the one diffusers runs: Euler on the same sigmas gives other images
    euler = u8(sd1.engine.generate(dataclasses.replace(p, sampler="Euler")).images)
    assert mad(euler, ours) > 20 * STRICT


# ----------------------------------------------------------------------------------- SD-Turbo-style use


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_one_step_euler_a_trailing_matches_stable_diffusion_pipeline(sd1: Models, tokenizers: dict[str, Any],
                                                                     guidance: float) -> None:
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler(**{**SCHEDULER, "timestep_spacing": "trailing"})
    pipe = pipeline("StableDiffusionPipeline", sd1, scheduler, tokenizers)
    ref = pipe([PROMPT] * len(SEEDS), negative_prompt=[NEGATIVE] * len(SEEDS), num_inference_steps=1,
               guidance_scale=guidance, height=64, width=64, generator=generators(SEEDS), output_type="np").images
    p = params(sampler="Euler a", scheduler="trailing", steps=1, cfg_scale=guidance)
    with UNetCalls(sd1.engine.models.unet) as calls:
        ours = u8(sd1.engine.generate(p).images)
    check(ours, ref_u8(ref), f"1-step Euler a (trailing), guidance {guidance}")
    assert calls.rows == [len(SEEDS)]  # diffusers: guidance <= 1 is no CFG
    if guidance == 0.0:  # A1111's CFG 0 is uncond + 0 * (cond - uncond): the uncond pass runs, other images
        with UNetCalls(sd1.engine.models.unet) as calls:
            a1111 = u8(sd1.engine.generate(dataclasses.replace(p, convention="a1111")).images)
        assert calls.rows == [2 * len(SEEDS)]
        assert mad(a1111, ours) > 20 * STRICT


def test_sdxl_turbo_style_trailing_starts_from_sigma_max(tmp_path: Path, tokenizers: dict[str, Any]) -> None:
    # SDXL-Turbo's scheduler config: Euler a with trailing spacing, whose start noise is sigma_max (the stock SDXL
    # configs' leading spacing starts from sqrt(sigma_max^2 + 1)); 1 step at guidance 0
    from diffusers import EulerAncestralDiscreteScheduler

    xl = build(tmp_path, TINY_SDXL, xl=True, seed=2)
    scheduler = EulerAncestralDiscreteScheduler(**{**SCHEDULER, "timestep_spacing": "trailing"})
    pipe = pipeline("StableDiffusionXLPipeline", xl, scheduler, tokenizers)
    with UNetCalls(xl.parts["unet"]) as theirs:
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=1, guidance_scale=0.0, height=64, width=64,
                   num_images_per_prompt=len(SEEDS), generator=generators(SEEDS), output_type="np").images
    p = params(sampler="Euler a", scheduler="trailing", steps=1, cfg_scale=0.0)
    with UNetCalls(xl.engine.models.unet) as calls:
        ours = u8(xl.engine.generate(p).images)
    check(ours, ref_u8(ref), "SDXL 1-step Euler a (trailing), guidance 0")
    assert calls.rows == theirs.rows == [len(SEEDS)]
    # the UNet sees noise * sigma_max / sqrt(sigma_max^2 + 1) as diffusers' does; the same sigma under the stock
    # leading start (sgm_uniform here) gives it the noise itself, 0.23% larger
    torch.testing.assert_close(calls.first, theirs.first, rtol=1e-5, atol=1e-5)
    with UNetCalls(xl.engine.models.unet) as leading:
        xl.engine.generate(dataclasses.replace(p, scheduler="sgm_uniform"))
    assert (leading.first - theirs.first).abs().max() > 1e-3  # type: ignore[operator]


def test_two_step_img2img_at_half_strength(sd1: Models, tokenizers: dict[str, Any]) -> None:
    # SD-Turbo's img2img recipe: 2 steps at strength 0.5 (diffusers: int(2 * 0.5) = 1 step), guidance 0
    from diffusers import EulerAncestralDiscreteScheduler

    scheduler = EulerAncestralDiscreteScheduler(**{**SCHEDULER, "timestep_spacing": "trailing"})
    pipe = pipeline("StableDiffusionImg2ImgPipeline", sd1, scheduler, tokenizers)
    image = init_image()
    ref = pipe(PROMPT, image=image, strength=0.5, num_inference_steps=2, guidance_scale=0.0,
               num_images_per_prompt=len(SEEDS), generator=generators(SEEDS), output_type="np").images
    p = params(sampler="Euler a", scheduler="trailing", steps=2, cfg_scale=0.0, init_images=[image],
               denoising_strength=0.5, negative_prompt="")
    with UNetCalls(sd1.engine.models.unet) as calls:
        ours = u8(sd1.engine.generate(p).images)
    check(ours, ref_u8(ref), "img2img 2 steps at strength 0.5, Euler a (trailing), guidance 0")
    assert calls.rows == [len(SEEDS)]
    # A1111: int(0.5 * 2) + 1 = 2 steps, from sigma_max, at CFG 1 no uncond pass either
    with UNetCalls(sd1.engine.models.unet) as calls:
        sd1.engine.generate(dataclasses.replace(p, convention="a1111", cfg_scale=1.0, batch_size=1))
    assert calls.rows == [1, 1]


# ----------------------------------------------------------------------------------- UNet calls


@pytest.mark.parametrize("sampler, schedule", [("Euler a", "sgm_uniform"), ("Euler", "trailing"), ("LCM", "lcm")])
@pytest.mark.parametrize("steps", [1, 4])
def test_cfg_1_makes_one_cond_only_call_per_step(tiny: Engine, sampler: str, schedule: str, steps: int) -> None:
    p = dict(prompt="a red circle", negative_prompt="blue", sampler=sampler, scheduler=schedule, steps=steps,
             cfg_scale=1.0, seed=1, batch_size=1)
    denoisers: list[type] = []
    hooks, labels = row_labels(denoisers)
    with UNetCalls(tiny.models.unet) as calls:
        tiny.generate(GenerationParams(**p), hooks=hooks)  # type: ignore[arg-type]
    assert calls.rows == [1] * steps and labels == [[1]] * steps
    # the LCM sampler's model applies LCM's boundary condition (A1111's LCM sampler and LCMScheduler do)
    assert len(denoisers) == steps and all((d is LCMDenoiser) == (sampler == "LCM") for d in denoisers)
    with UNetCalls(tiny.models.unet) as calls:
        tiny.generate(GenerationParams(**{**p, "cfg_scale": 2.0}), hooks=hooks)  # type: ignore[arg-type]
    assert calls.rows == [2] * steps and labels[steps:] == [[1, 0]] * steps
