"""End-to-end parity with diffusers' pipelines on random-weight models: the same images for the same seeds.

Each model is built with diffusers/transformers from a config dict, saved as a diffusers pipeline folder (unet/,
vae/, text_encoder/[_2], scheduler/, model_index.json) that Sumie loads with ``sumie.load``, and run by the diffusers
pipeline (StableDiffusion, Img2Img, Inpaint with a 4- and a 9-channel UNet, SDXL) with the same scheduler, the same
per-image CPU-generator noise and plain prompts. Sumie runs with ``convention="diffusers"``; both outputs go to uint8
with diffusers' rounding and must agree within 1/255 mean absolute difference (measured: ~1e-4 of a level).

The tiny models use the layers' default initialisation (the decoded images have real contrast: std ~0.18 in [0, 1])
and the tests check the comparison can fail: another prompt or the A1111 convention moves the images by far more than
the tolerance. The A1111 convention is exercised against the same references: it truncates to uint8 where diffusers
rounds, and its img2img runs ``int(strength * steps) + 1`` steps where diffusers runs ``int(strength * steps)``.

The full-size SD1.5 architecture (random weights, 64x64) is ``@pytest.mark.slow``.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image, ImageDraw

import sumie
from sumie.pipelines.engine import Engine
from sumie.pipelines.params import GenerationParams, InpaintParams
from sumie.sampling import schedules

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 steps_offset=1)
PROMPT, NEGATIVE = "a photo of a cat, best quality", "blurry"
SEEDS = [5, 6]
TOL = 1.0  # mean absolute difference in uint8 levels (1/255)
STRICT = 0.05  # what the numbers actually are (~1e-4): fail loudly if parity degrades


# ----------------------------------------------------------------------------------------------- building models


def _vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocab and merges from the packaged BPE file (OpenAI ``simple_tokenizer``'s recipe)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in keep}
    chars.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in chars)})
    byte_chars = list(chars.values())
    raw = resources.files("sumie").joinpath("data", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]  # type: ignore[misc]


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Any]:
    """transformers CLIPTokenizers: padding with EOS (SD1, SDXL's first encoder) and with '!' (OpenCLIP)."""
    vocab, merges = _vocab()
    eos = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="<|endoftext|>")
    bang = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")
    assert len(eos) == 49408 and eos.pad_token_id == 49407 and bang.pad_token_id == 0
    return {"eos": eos, "bang": bang}


def _text_config(hidden: int, layers: int, heads: int, act: str, projection: int | None = None) -> Any:
    kw = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
              vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, hidden_act=act)
    if projection is not None:
        kw["projection_dim"] = projection
    return transformers.CLIPTextConfig(**kw)


TINY_SD1 = dict(
    unet=dict(block_out_channels=(32, 64), layers_per_block=1,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
              attention_head_dim=8, sample_size=8),
    vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             scaling_factor=0.18215),
    text=[(64, 2, 1, "quick_gelu", None)],
)
TINY_SDXL = dict(
    unet=dict(block_out_channels=(64, 128), layers_per_block=1,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=128, attention_head_dim=(1, 2),
              transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
              addition_time_embed_dim=256, projection_class_embeddings_input_dim=64 + 6 * 256, sample_size=8),
    vae=dict(TINY_SD1["vae"], scaling_factor=0.13025),
    text=[(64, 2, 1, "quick_gelu", None), (64, 2, 1, "gelu", 64)],
)
# Stable Diffusion 1.5's architecture (diffusers' UNet2DConditionModel defaults are SD1's but for the context width)
FULL_SD1 = dict(
    unet=dict(cross_attention_dim=768, sample_size=64),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             scaling_factor=0.18215, sample_size=512),
    text=[(768, 12, 12, "quick_gelu", None)],
)


@dataclasses.dataclass
class Models:
    """A random-weight model as diffusers modules and as the pipeline folder Sumie loads."""

    root: Path
    parts: dict[str, Any]
    engine: Engine
    xl: bool


def build(root: Path, spec: dict[str, Any], *, xl: bool = False, in_channels: int = 4, seed: int = 0) -> Models:
    """Random diffusers/transformers modules from ``spec``, written as a diffusers pipeline folder, then loaded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"], in_channels=in_channels)
    vae = AutoencoderKL(**spec["vae"])
    encoders: dict[str, Any] = {}
    for i, (hidden, layers, heads, act, projection) in enumerate(spec["text"]):
        cfg = _text_config(hidden, layers, heads, act, projection)
        name = "text_encoder" if i == 0 else "text_encoder_2"
        encoders[name] = (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(cfg)
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    for name, m in encoders.items():
        m.save_pretrained(root / name)
        index[name] = ["transformers", type(m).__name__]
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon", **SCHEDULER}))
    (root / "model_index.json").write_text(json.dumps(index))
    engine = sumie.load(root)
    engine.show_progress = False
    assert engine.models.config.inpainting == (in_channels == 9)
    return Models(root, {"unet": unet.eval(), "vae": vae.eval(), **{k: v.eval() for k, v in encoders.items()}},
                  engine, xl)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build(tmp_path_factory.mktemp("sd1"), TINY_SD1)


@pytest.fixture(scope="module")
def sd1_inpaint(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build(tmp_path_factory.mktemp("sd1_inpaint"), TINY_SD1, in_channels=9, seed=1)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build(tmp_path_factory.mktemp("sdxl"), TINY_SDXL, xl=True, seed=2)


def pipeline(cls_name: str, m: Models, scheduler: Any, tokenizers: dict[str, Any]) -> Any:
    """A diffusers pipeline over the modules of ``m`` (no safety checker, no watermark)."""
    cls = getattr(diffusers, cls_name)
    kw: dict[str, Any] = dict(vae=m.parts["vae"], text_encoder=m.parts["text_encoder"], tokenizer=tokenizers["eos"],
                              unet=m.parts["unet"], scheduler=scheduler)
    if m.xl:
        kw.update(text_encoder_2=m.parts["text_encoder_2"], tokenizer_2=tokenizers["bang"], add_watermarker=False)
    else:
        kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls(**kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ schedulers


@dataclasses.dataclass(frozen=True)
class Sched:
    """A diffusers scheduler and the Sumie sampler/schedule that runs the same steps."""

    cls: str
    options: dict[str, Any]
    sampler: str
    schedule: str  # a Sumie schedule name, or "spacing": diffusers' own timestep spacing via ``sigmas_fn``
    ancestral: bool = False  # draws noise at every step from the images' generators

    def make(self, spacing: str) -> Any:
        return getattr(diffusers, self.cls)(**SCHEDULER, timestep_spacing=spacing, **self.options)

    def sigmas_fn(self, engine: Engine, spacing: str) -> Callable[[int], torch.Tensor] | None:
        """diffusers' timestep-spaced sigmas as Sumie computes them (``schedules.diffusers_sigmas``)."""
        if self.schedule != "spacing":
            return None
        rule = "dpmsolver" if self.cls.startswith("DPMSolver") else "euler"
        return lambda n: schedules.diffusers_sigmas(engine.discretization, n, spacing, rule=rule)[1]  # type: ignore


SCHEDS = {
    "euler": Sched("EulerDiscreteScheduler", {}, "Euler", "spacing"),
    "euler_karras": Sched("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "Euler", "Karras"),
    "euler_a": Sched("EulerAncestralDiscreteScheduler", {}, "Euler a", "spacing", ancestral=True),
    "dpmpp_2m": Sched("DPMSolverMultistepScheduler", {}, "DPM++ 2M", "spacing"),
    "dpmpp_2m_karras": Sched("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M", "Karras"),
}


# ------------------------------------------------------------------------------------------------ comparing


def start_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """diffusers' per-image CPU noise: ``randn(shape, generator=Generator('cpu').manual_seed(seed))``."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def u8(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) for im in images])


def ref_u8(ref: np.ndarray, rounding: str = "round") -> np.ndarray:
    """diffusers' float images [B, H, W, 3] in [0, 1] as uint8 levels: its rounding, or A1111's truncation."""
    v = ref.astype(np.float32) * 255
    return (np.round(v) if rounding == "round" else np.floor(v)).astype(np.float64)


def mad(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    d = np.abs(a - b)
    return float(d[where].mean() if where is not None else d.mean())


def check(ours: np.ndarray, ref: np.ndarray, label: str, where: np.ndarray | None = None) -> float:
    """Assert parity (mean |diff| < 1/255, and in fact < STRICT levels) and that the images have contrast."""
    diff = mad(ours, ref, where)
    print(f"{label}: mean |diff| = {diff:.2e} levels (max {np.abs(ours - ref).max():.0f}); image std {ref.std():.1f}")
    assert ref.std() > 20, f"{label}: reference images are nearly flat; the comparison would not discriminate"
    assert diff < TOL, f"{label}: mean abs difference {diff:.3f}/255 exceeds 1/255"
    assert diff < STRICT, f"{label}: mean abs difference {diff:.3f}/255; expected ~1e-4 (parity regressed)"
    return diff


def params(**kw: Any) -> GenerationParams:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=4, cfg_scale=7.0, seed=SEEDS[0], width=64, height=64,
                batch_size=len(SEEDS), convention="diffusers")
    return GenerationParams(**{**base, **kw})


def init_image(size: int = 64) -> Image.Image:
    """A structured RGB test image: colour gradients with a few shapes."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    arr = np.stack([x * 255, y * 255, (1 - x) * (1 - y) * 255], axis=-1).astype(np.uint8)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    d.ellipse((8, 10, 40, 42), fill=(240, 200, 30))
    d.rectangle((36, 30, 60, 58), fill=(20, 40, 160))
    return img


def block_mask(size: int = 64) -> Image.Image:
    """A binary mask aligned to the 8-pixel latent grid (white = repaint), so A1111's bicubic latent mask and
    diffusers' nearest one coincide."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((16, 8, 47, 39), fill=255)
    return mask


# ------------------------------------------------------------------------------------------------ txt2img


@pytest.mark.parametrize("name", list(SCHEDS))
def test_txt2img_matches_stable_diffusion_pipeline(sd1: Models, tokenizers: dict[str, Any], name: str) -> None:
    s = SCHEDS[name]
    pipe = pipeline("StableDiffusionPipeline", sd1, s.make("linspace"), tokenizers)
    # the start noise as latents=; an ancestral sampler draws it from the images' generators, then its step noise
    noise = dict(generator=generators(SEEDS)) if s.ancestral else dict(latents=start_noise((4, 8, 8), SEEDS))
    ref = pipe([PROMPT] * len(SEEDS), negative_prompt=[NEGATIVE] * len(SEEDS), num_inference_steps=4,
               guidance_scale=7.0, height=64, width=64, output_type="np", **noise).images
    p = params(sampler=s.sampler, scheduler=s.schedule if s.schedule != "spacing" else "Automatic")
    res = sd1.engine.generate(p, sigmas_fn=s.sigmas_fn(sd1.engine, "linspace"))
    assert res.seeds == SEEDS
    ours = u8(res.images)
    check(ours, ref_u8(ref), f"txt2img {name}")
    # the comparison discriminates: another prompt moves the images by far more than the differences above
    other = u8(sd1.engine.generate(dataclasses.replace(p, prompt="a red car"),
                                   sigmas_fn=s.sigmas_fn(sd1.engine, "linspace")).images)
    assert mad(other, ours) > 20 * STRICT


def test_a1111_convention_truncates_where_diffusers_rounds(sd1: Models, tokenizers: dict[str, Any]) -> None:
    # Euler with Karras sigmas and linspace spacing: diffusers' start scale and network timesteps are A1111's own,
    # so the two conventions sample alike and differ in the uint8 conversion only.
    s = SCHEDS["euler_karras"]
    pipe = pipeline("StableDiffusionPipeline", sd1, s.make("linspace"), tokenizers)
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.0, height=64, width=64,
               num_images_per_prompt=len(SEEDS), latents=start_noise((4, 8, 8), SEEDS), output_type="np").images
    a1111 = u8(sd1.engine.generate(params(sampler="Euler", scheduler="Karras", convention="a1111")).images)
    diff = u8(sd1.engine.generate(params(sampler="Euler", scheduler="Karras")).images)
    check(a1111, ref_u8(ref, "floor"), "txt2img euler_karras, A1111 convention vs floor(reference)")
    step = diff - a1111
    assert set(np.unique(step)) <= {0.0, 1.0}  # rounding is never below truncation, at most one level above
    assert 0.3 < step.mean() < 0.7  # about half of the values round up
    assert mad(a1111, ref_u8(ref)) > 0.3  # so A1111's images are not diffusers' images


def test_dpmpp_2m_start_scale_and_timesteps_per_convention(sd1: Models, tokenizers: dict[str, Any]) -> None:
    # The network's inputs, call by call. diffusers' DPMSolverMultistep starts from noise * sqrt(sigma_max^2 + 1)
    # and gives the UNet rounded integer timesteps; A1111 (k-diffusion) starts from noise * sigma_max and
    # interpolates log sigma to fractional timesteps.
    s = SCHEDS["dpmpp_2m_karras"]
    pipe = pipeline("StableDiffusionPipeline", sd1, s.make("linspace"), tokenizers)
    noise = start_noise((4, 8, 8), SEEDS[:1])
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"ref": [], "diffusers": [], "a1111": []}
    key = ["ref"]

    def record(_: Any, args: tuple[Any, ...]) -> None:
        seen[key[0]].append((args[0][:1].clone(), torch.as_tensor(args[1]).reshape(-1)[:1].clone()))

    hooks = [sd1.parts["unet"].register_forward_pre_hook(record),
             sd1.engine.models.unet.register_forward_pre_hook(record)]
    try:
        pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.0, height=64, width=64,
             latents=noise, output_type="np")
        for convention in ("diffusers", "a1111"):
            key[0] = convention
            sd1.engine.generate(params(sampler="DPM++ 2M", scheduler="Karras", batch_size=1, convention=convention))
    finally:
        for h in hooks:
            h.remove()
    ref_t = torch.cat([t for _, t in seen["ref"]]).float()
    ours_t = torch.cat([t for _, t in seen["diffusers"]])
    a1111_t = torch.cat([t for _, t in seen["a1111"]])
    assert torch.equal(ours_t, ref_t) and torch.equal(ref_t, ref_t.round())
    assert not torch.equal(a1111_t, a1111_t.round()) and (a1111_t - ref_t).abs().max() < 1
    sigma_max = float(sd1.engine.discretization.sigmas[-1])
    # the UNet sees x * c_in, c_in = 1 / sqrt(sigma^2 + 1): the noise itself (diffusers) or scaled down (A1111)
    torch.testing.assert_close(seen["ref"][0][0], noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["diffusers"][0][0], noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["a1111"][0][0], noise * sigma_max / (sigma_max**2 + 1) ** 0.5,
                               rtol=1e-5, atol=1e-5)


def test_sdxl_matches_stable_diffusion_xl_pipeline(sdxl: Models, tokenizers: dict[str, Any]) -> None:
    # SDXL's scheduler config uses "leading" spacing (start noise sqrt(sigma_max^2 + 1)); DPM++ 2M Karras spans
    # the whole table either way. An explicit negative prompt: diffusers zeroes the embeddings of an empty one.
    for name, spacing in (("euler", "leading"), ("dpmpp_2m_karras", "leading")):
        s = SCHEDS[name]
        pipe = pipeline("StableDiffusionXLPipeline", sdxl, s.make(spacing), tokenizers)
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=6.0, height=64, width=64,
                   num_images_per_prompt=len(SEEDS), latents=start_noise((4, 8, 8), SEEDS), output_type="np").images
        p = params(sampler=s.sampler, scheduler=s.schedule if s.schedule != "spacing" else "Automatic", cfg_scale=6.0)
        ours = u8(sdxl.engine.generate(p, sigmas_fn=s.sigmas_fn(sdxl.engine, spacing)).images)
        check(ours, ref_u8(ref), f"sdxl {name} ({spacing})")


# ------------------------------------------------------------------------------------------------ img2img


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m_karras"])
def test_img2img_matches_img2img_pipeline(sd1: Models, tokenizers: dict[str, Any], name: str) -> None:
    s = SCHEDS[name]
    pipe = pipeline("StableDiffusionImg2ImgPipeline", sd1, s.make("linspace"), tokenizers)
    image = init_image()
    ref = pipe(PROMPT, image=image, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=5, guidance_scale=7.0,
               num_images_per_prompt=len(SEEDS), generator=generators(SEEDS), output_type="np").images
    sigmas_fn = s.sigmas_fn(sd1.engine, "linspace")
    p = params(sampler=s.sampler, scheduler=s.schedule if s.schedule != "spacing" else "Automatic", steps=5,
               init_images=[image], denoising_strength=0.6)
    calls: list[tuple[int, int]] = []
    ours = u8(sd1.engine.generate(p, sigmas_fn=sigmas_fn, progress=lambda e: calls.append((e.done, e.total))).images)
    check(ours, ref_u8(ref), f"img2img {name}")
    assert calls[-1] == (3, 3)  # diffusers: int(0.6 * 5) = 3 steps

    # A1111's convention: int(0.6 * 5) + 1 = 4 steps from the posterior mean; a different image
    calls.clear()
    a1111 = u8(sd1.engine.generate(dataclasses.replace(p, convention="a1111"), sigmas_fn=sigmas_fn,
                                   progress=lambda e: calls.append((e.done, e.total))).images)
    assert calls[-1] == (4, 4)
    assert mad(a1111, ref_u8(ref)) > 20 * STRICT


# ------------------------------------------------------------------------------------------------ inpainting


def _inpaint_pair(m: Models, tokenizers: dict[str, Any], name: str, strength: float) -> tuple[np.ndarray, ...]:
    """(Sumie diffusers convention, Sumie A1111 convention, diffusers reference) for the block mask."""
    s = SCHEDS[name]
    pipe = pipeline("StableDiffusionInpaintPipeline", m, s.make("linspace"), tokenizers)
    image, mask = init_image(), block_mask()
    # One image per generator: with a single image diffusers' inpainting encodes it (and the masked image) once
    # with the first generator only and repeats the latent, while its img2img pipeline, and Sumie, give every
    # image of the batch its own posterior sample.
    n = len(SEEDS)
    ref = pipe([PROMPT] * n, image=[image] * n, mask_image=[mask] * n, strength=strength,
               negative_prompt=[NEGATIVE] * n, height=64, width=64, num_inference_steps=5, guidance_scale=7.0,
               generator=generators(SEEDS), output_type="np").images
    p = params(sampler=s.sampler, scheduler=s.schedule if s.schedule != "spacing" else "Automatic", steps=5,
               init_images=[image] * len(SEEDS), denoising_strength=strength,
               inpaint=InpaintParams(mask=mask, mask_blur=0, fill="original"))
    sigmas_fn = s.sigmas_fn(m.engine, "linspace")
    ours = u8(m.engine.generate(p, sigmas_fn=sigmas_fn).images)
    a1111 = u8(m.engine.generate(dataclasses.replace(p, convention="a1111"), sigmas_fn=sigmas_fn).images)
    return ours, a1111, ref_u8(ref)


def _check_a1111_overlay(a1111: np.ndarray, ref: np.ndarray) -> None:
    """A1111 pastes the original pixels back outside the mask (diffusers returns the whole decoded image)."""
    outside = np.broadcast_to((np.asarray(block_mask()) <= 127)[None, :, :, None], a1111.shape)
    original = np.broadcast_to(u8([init_image()]), a1111.shape)
    assert mad(a1111, original, outside) == 0.0
    assert mad(ref, original, outside) > 20 * STRICT


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpaint_4_channel_matches_inpaint_pipeline(sd1: Models, tokenizers: dict[str, Any], strength: float) -> None:
    # diffusers blends the original latent, noised to the next step, outside the mask after every step; Sumie
    # re-noises the kept region of the input of every call (the same for one-call-per-step samplers).
    ours, a1111, ref = _inpaint_pair(sd1, tokenizers, "dpmpp_2m_karras", strength)
    check(ours, ref, f"inpaint 4-channel dpmpp_2m_karras, strength {strength}")
    _check_a1111_overlay(a1111, ref)


@pytest.mark.parametrize("strength", [0.75, 1.0])
def test_inpaint_9_channel_matches_inpaint_pipeline(sd1_inpaint: Models, tokenizers: dict[str, Any],
                                                    strength: float) -> None:
    ours, a1111, ref = _inpaint_pair(sd1_inpaint, tokenizers, "euler", strength)
    check(ours, ref, f"inpaint 9-channel euler, strength {strength}")
    _check_a1111_overlay(a1111, ref)


# ------------------------------------------------------------------------------------------------ full size


@pytest.mark.slow
def test_full_size_sd15_matches_diffusers(tmp_path: Path, tokenizers: dict[str, Any]) -> None:
    m = build(tmp_path, FULL_SD1)
    for name in ("euler", "dpmpp_2m_karras"):
        s = SCHEDS[name]
        pipe = pipeline("StableDiffusionPipeline", m, s.make("linspace"), tokenizers)
        ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4, guidance_scale=7.0, height=64, width=64,
                   num_images_per_prompt=len(SEEDS), latents=start_noise((4, 8, 8), SEEDS), output_type="np").images
        p = params(sampler=s.sampler, scheduler=s.schedule if s.schedule != "spacing" else "Automatic")
        ours = u8(m.engine.generate(p, sigmas_fn=s.sigmas_fn(m.engine, "linspace")).images)
        check(ours, ref_u8(ref), f"full-size SD1.5 txt2img {name}")
    pipe = pipeline("StableDiffusionImg2ImgPipeline", m, SCHEDS["euler"].make("linspace"), tokenizers)
    ref = pipe(PROMPT, image=init_image(), strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=5,
               guidance_scale=7.0, num_images_per_prompt=len(SEEDS), generator=generators(SEEDS),
               output_type="np").images
    p = params(sampler="Euler", steps=5, init_images=[init_image()], denoising_strength=0.6)
    ours = u8(m.engine.generate(p, sigmas_fn=SCHEDS["euler"].sigmas_fn(m.engine, "linspace")).images)
    check(ours, ref_u8(ref), "full-size SD1.5 img2img euler")
