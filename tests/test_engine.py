"""The generation engine on tiny random-weight models (64x64, few steps): seeds, batches, prompt schedules, AND,
CFG, img2img conventions, variation seeds, hires fix, SDXL ADM ids, the refiner hand-off, 9-channel inpainting,
callbacks. A spy wrapped around the UNet records every network call (batch rows, inputs, conditioning)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

import sumie
from sumie.checkpoints.save import random_single_file
from sumie.configs import TINY
from sumie.errors import ConfigError
from sumie.models.taesd import TAESD
from sumie.models.unet import timestep_embedding
from sumie.pipelines import images as img_ops
from sumie.pipelines import outpaint, vae_io
from sumie.pipelines.control import ProgressEvent
from sumie.pipelines.denoise import GuidedModel, Stage
from sumie.pipelines.engine import Engine
from sumie.pipelines.params import GenerationParams, HiresParams, InpaintParams, RefinerParams
from sumie.pipelines.scheduled_conds import PromptConds, ScheduledCond
from sumie.pipelines.variation import MAX_SEED, VariationRNG, slerp
from sumie.sampling import registry
from sumie.sampling.guidance import masked_model


def _write(tmp: Path, name: str, cfg: object, seed: int) -> Path:
    path = tmp / f"{name}.safetensors"
    save_file(random_single_file(cfg, seed=seed), str(path))  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("engine")
    sd1 = TINY["sd1"]
    inpaint = sd1.with_(unet=dataclasses.replace(sd1.unet, in_channels=9))
    return {"sd1": _write(tmp, "tiny_sd1", sd1, 1), "sdxl": _write(tmp, "tiny_sdxl", TINY["sdxl"], 2),
            "refiner": _write(tmp, "tiny_refiner", TINY["sdxl_refiner"], 3),
            "inpaint": _write(tmp, "tiny_inpaint", inpaint, 4)}


@pytest.fixture(scope="module")
def sd1(paths: dict[str, Path]) -> Engine:
    return sumie.load(paths["sd1"])


@pytest.fixture(scope="module")
def sdxl(paths: dict[str, Path]) -> Engine:
    return sumie.load(paths["sdxl"])


class Spy(nn.Module):
    """Wraps a UNet and records the inputs of every call."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.inner = unet
        self.calls: list[dict[str, Tensor | None]] = []

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls.append({"x": x.clone(), "t": t.clone(), "context": context.clone(),
                           "y": None if y is None else y.clone()})
        return self.inner(x, t, context, y=y)


@contextmanager
def spy(models: object) -> Iterator[Spy]:
    """Replace ``models.unet`` by a spy for the duration."""
    unet = models.unet  # type: ignore[attr-defined]
    s = Spy(unet)
    models.unet = s  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        models.unet = unet  # type: ignore[attr-defined]


def P(**kw: object) -> GenerationParams:
    base: dict[str, object] = {"prompt": "a cat", "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64,
                               "seed": 7, "sampler": "Euler a"}
    base.update(kw)
    return GenerationParams(**base)  # type: ignore[arg-type]


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(np.int16)


@contextmanager
def decoded(engine: Engine) -> Iterator[list[Tensor]]:
    """Record the latents [B, 4, h, w] the engine decodes into images (``vae_io.decode_images``) for the duration."""
    seen: list[Tensor] = []
    decode = vae_io.decode_images

    def spy(vae: nn.Module, z: Tensor, *a: object, **k: object) -> list[Image.Image]:
        seen.append(z.clone())
        return decode(vae, z, *a, **k)  # type: ignore[arg-type]

    vae_io.decode_images = spy  # type: ignore[assignment]
    try:
        yield seen
    finally:
        vae_io.decode_images = decode


def assert_same_image(alone: Tensor, row: Tensor, alone_image: Image.Image, row_image: Image.Image) -> None:
    """A seed run alone against the same seed as one row of a batch: equal up to float rounding.

    Not the same kernels: batch 1 and batch B run the UNet's matmuls and convolutions in other shapes, so float32
    sums are taken in another order and the sampler carries the last-bit differences along. Measured (AVX2 AMD, every
    sampler, 3 steps): latents differ by at most 1e-5 of their max magnitude, rows of other seeds by ~1.7 times that
    max, so the tolerance is 1e-4 of the max. The images are decoded one at a time (the same VAE call); their float
    values then differ by ~0.001 of a uint8 level, which truncation can still turn into one level at a boundary: at
    most 1 level.
    """
    torch.testing.assert_close(row, alone, rtol=0, atol=1e-4 * alone.abs().max().item())
    assert np.abs(arr(alone_image) - arr(row_image)).max() <= 1


# --------------------------------------------------------------------------------------------------- txt2img / seeds

def test_txt2img_shapes_determinism_and_seeds(sd1: Engine) -> None:
    with decoded(sd1) as latents:
        a = sd1.generate(P(batch_size=2, n_iter=2))
    b = sd1.generate(P(batch_size=2, n_iter=2))
    assert [im.size for im in a.images] == [(64, 64)] * 4 and all(im.mode == "RGB" for im in a.images)
    assert a.seeds == [7, 8, 9, 10] and a.params.seed == 7 and a.params.width == 64
    assert all(np.array_equal(arr(x), arr(y)) for x, y in zip(a.images, b.images, strict=True))  # same computation
    assert not np.array_equal(arr(a.images[0]), arr(a.images[1]))
    # image k of the request == its seed alone (Euler a: the ancestral noise is per image too)
    batch = torch.cat(latents)
    for k in (1, 3):
        with decoded(sd1) as alone_latent:
            alone = sd1.generate(P(seed=7 + k)).images[0]
        assert_same_image(alone_latent[0][0], batch[k], alone, a.images[k])
    assert "Seed: 10" in a.infotexts[3] and a.images[3].info["parameters"] == a.infotexts[3]


def test_random_seed_is_reported_and_reproducible(sd1: Engine) -> None:
    r = sd1.generate(P(seed=-1, steps=2))
    s = r.seeds[0]
    assert 0 <= s < MAX_SEED and r.params.seed == s and f"Seed: {s}" in r.infotexts[0]
    again = sd1.generate(P(seed=s, steps=2))
    assert np.array_equal(arr(r.images[0]), arr(again.images[0]))


@pytest.mark.parametrize(("kw", "words"), [
    ({"width": 60}, "multiple of 8"), ({"height": 70}, "multiple of 8"), ({"steps": 0}, "at least 1"),
    ({"sampler": "Euler z"}, "unknown sampler"), ({"eta": 0.5, "sampler": "Euler"}, "eta"),
    ({"batch_size": 0}, "at least 1"), ({"subseed_strength": 1.5}, "variation strength"),
    ({"styles": ["x"]}, "styles"), ({"inpaint": InpaintParams(mask=Image.new("L", (64, 64)))}, "init image"),
    ({"cfg_rescale": 0.5, "prompt": "a AND b"}, "AND"), ({"cfg_rescale": 1.5}, "CFG rescale must be in"),
])
def test_bad_requests_are_config_errors(sd1: Engine, kw: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        sd1.generate(P(**kw))


def test_load_with_an_empty_model_path() -> None:
    with pytest.raises(ConfigError, match="the model path is empty"):
        sumie.load("")


# ------------------------------------------------------------------------------------------------- guidance / prompts

def test_cfg_one_skips_the_uncond_pass(sd1: Engine) -> None:
    with spy(sd1.models) as s:
        sd1.generate(P(batch_size=2, cfg_scale=1.0, sampler="Euler"))
    assert [c["x"].shape[0] for c in s.calls] == [2, 2, 2]  # type: ignore[union-attr]
    with spy(sd1.models) as s:
        sd1.generate(P(batch_size=2, cfg_scale=5.0, sampler="Euler"))
    assert [c["x"].shape[0] for c in s.calls] == [4, 4, 4]  # type: ignore[union-attr]


def _contexts(engine: Engine, texts: list[str]) -> Tensor:
    return engine.base.encoder(1).conditioner(texts).context


@pytest.mark.parametrize(("sampler", "steps", "switch_call", "calls"), [
    ("Euler", 4, 3, 4),  # schedule [(2, cat), (4, dog)]: calls 0-2 cat (A1111 switches one call late)
    ("Heun", 4, 5, 7),  # second order: planned over 8 calls -> [(4, cat), (8, dog)]; Heun makes 2 * 4 - 1 calls
])
def test_prompt_editing_switches_at_the_a1111_call(sd1: Engine, sampler: str, steps: int, switch_call: int,
                                                   calls: int) -> None:
    with spy(sd1.models) as s:
        sd1.generate(P(prompt="[a cat:a dog:0.5]", cfg_scale=1.0, sampler=sampler, steps=steps))
    ref = _contexts(sd1, ["a cat", "a dog"])  # encoded together, as A1111 (emphasis mean over the schedule)
    assert len(s.calls) == calls
    for k, c in enumerate(s.calls):
        want = ref[0] if k < switch_call else ref[1]
        torch.testing.assert_close(c["context"][0], want, rtol=0, atol=0)  # type: ignore[index]


def test_alternation_follows_a1111_step_counting(sd1: Engine) -> None:
    with spy(sd1.models) as s:
        sd1.generate(P(prompt="[cat|dog]", cfg_scale=1.0, sampler="Euler", steps=4))
    ref = _contexts(sd1, ["cat", "dog", "cat", "dog"])
    picked = [next(i for i in range(2) if torch.equal(c["context"][0], ref[i])) for c in s.calls]  # type: ignore
    assert picked == [0, 0, 1, 0]


def test_and_is_one_call_with_every_sub_prompt(sd1: Engine) -> None:
    with spy(sd1.models) as s:
        sd1.generate(P(prompt="a cat AND a dog :0.5", batch_size=2, sampler="Euler", steps=2))
    assert [c["x"].shape[0] for c in s.calls] == [6, 6]  # type: ignore[union-attr]
    ctx = s.calls[0]["context"]
    parts = _contexts(sd1, ["a cat"]), _contexts(sd1, ["a dog"])
    torch.testing.assert_close(ctx[0], parts[0][0], rtol=0, atol=0)  # type: ignore[index]
    torch.testing.assert_close(ctx[2], parts[1][0], rtol=0, atol=0)  # type: ignore[index]


class ToyDenoiser:
    """x0 = x * 0.5 + (context summed over features, averaged over tokens) per row (records calls).

    Averaging over tokens, like attention, gives the same for a context repeated to a longer length."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, x: Tensor, sigma: Tensor, context: Tensor, y: Tensor | None = None,
                 concat: Tensor | None = None) -> Tensor:
        self.rows.append(x.shape[0])
        return x * 0.5 + context.mean(dim=1).sum(dim=1).view(-1, 1, 1, 1)


def _sc(*vals: float, length: int = 1) -> ScheduledCond:
    ctx = torch.stack([torch.full((length, 2), v) for v in vals])
    return ScheduledCond(tuple(range(1, len(vals) + 1)), tuple(map(str, vals)), ctx)


def test_guided_model_combines_and_like_a1111() -> None:
    den = ToyDenoiser()
    cond = PromptConds(((_sc(1.0), 1.0), (_sc(3.0, length=2), 0.5)))
    uncond = PromptConds(((_sc(0.25), 1.0),))
    model = GuidedModel([Stage(den, cond, uncond)], scale=4.0)  # type: ignore[arg-type]
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    out = model(x, torch.tensor(1.0))
    # parts padded to 2 tokens by repeating their last vector (A1111 stack_conds): 2.0 and 6.0; the uncond has
    # 1 token and is repeated to 2, so conds and uncond share one call of 6 rows
    assert den.rows == [6]
    c1, c2, u = x * 0.5 + 2.0, x * 0.5 + 6.0, x * 0.5 + 0.5
    torch.testing.assert_close(out, u + (c1 - u) * 4.0 + (c2 - u) * 2.0)
    # schedules index by call: the second call takes each part's second entry
    den2 = ToyDenoiser()
    sched = GuidedModel([Stage(den2, PromptConds(((_sc(1.0, 2.0), 1.0),)), uncond)], 1.0)  # type: ignore[arg-type]
    first, second = sched(x, torch.tensor(1.0)), sched(x, torch.tensor(1.0))
    torch.testing.assert_close(first, x * 0.5 + 2.0)
    torch.testing.assert_close(second, x * 0.5 + 2.0)  # call 1 <= end 1: still the first entry
    torch.testing.assert_close(sched(x, torch.tensor(1.0)), x * 0.5 + 4.0)
    assert den2.rows == [2, 2, 2]  # scale 1, one plain part: no uncond rows


# ----------------------------------------------------------------------------------------------------- img2img

@pytest.fixture(scope="module")
def init_image(sd1: Engine) -> Image.Image:
    return sd1.generate(P(seed=3, steps=2)).images[0]


@pytest.mark.parametrize(("convention", "strength", "calls"), [
    ("a1111", 0.5, 6), ("diffusers", 0.5, 5), ("a1111", 1.0, 10), ("a1111", 0.0, 1), ("diffusers", 0.0, 0),
    ("a1111", 0.29, 3),
])
def test_img2img_steps_follow_the_convention(sd1: Engine, init_image: Image.Image, convention: str,
                                             strength: float, calls: int) -> None:
    with spy(sd1.models) as s:
        sd1.generate(P(init_images=[init_image], denoising_strength=strength, steps=10, sampler="DPM++ 2M",
                       convention=convention))
    assert len(s.calls) == calls


def test_img2img_strength_zero_returns_the_encoded_image(sd1: Engine, init_image: Image.Image) -> None:
    # diffusers: no step; the latent is a posterior sample drawn from the image's generator before the noise
    r = sd1.generate(P(init_images=[init_image], denoising_strength=0.0, convention="diffusers", seed=11))
    vae = sd1.models.vae
    with torch.no_grad():  # as the engine: the same computation (a graph-recording call takes plain convolutions)
        post = vae.encode(img_ops.to_tensor(init_image, convention="diffusers"))
        z = vae.scale_latents(post.sample(torch.Generator().manual_seed(11)))
    want = sd1.decode(z, "diffusers")[0]
    assert np.array_equal(arr(r.images[0]), arr(want))
    # A1111: one step from the smallest sigma (0.029) on the posterior mean: the latent barely moves
    # (compared in latent space: the tiny random VAE decoder magnifies any latent change)
    mean = vae.scale_latents(vae.encode(img_ops.to_tensor(init_image)).mean)
    with decoded(sd1) as latents:
        for strength in (0.0, 1.0):
            sd1.generate(P(init_images=[init_image], denoising_strength=strength, sampler="Euler", steps=10))
    assert (latents[0] - mean).abs().mean() < 0.05 < 1.0 < (latents[1] - mean).abs().mean()


def test_img2img_batch_and_default_size(sd1: Engine, init_image: Image.Image) -> None:
    big = init_image.resize((70, 67))
    r = sd1.generate(P(init_images=[big], width=None, height=None, batch_size=2))
    assert r.params.width == 64 and r.params.height == 64 and [im.size for im in r.images] == [(64, 64)] * 2
    two = sd1.generate(P(init_images=[init_image, init_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]))
    assert len(two.images) == 2 and two.params.batch_size == 2


# ------------------------------------------------------------------------------------------------ variation seeds

def test_variation_seed_strength(sd1: Engine) -> None:
    plain = sd1.generate(P(seed=5, sampler="Euler")).images[0]
    zero = sd1.generate(P(seed=5, subseed=99, subseed_strength=0.0, sampler="Euler")).images[0]
    assert np.array_equal(arr(plain), arr(zero))
    full = sd1.generate(P(seed=5, subseed=99, subseed_strength=1.0, sampler="Euler"))
    other = sd1.generate(P(seed=99, sampler="Euler")).images[0]
    assert np.array_equal(arr(full.images[0]), arr(other))
    half = sd1.generate(P(seed=5, subseed=99, subseed_strength=0.5, sampler="Euler", batch_size=2))
    assert half.seeds == [5, 5] and half.subseeds == [99, 100]
    assert not np.array_equal(arr(half.images[0]), arr(plain)) and not np.array_equal(arr(half.images[0]), arr(other))
    assert "Variation seed: 100" in half.infotexts[1]


def test_slerp_and_rng_follow_a1111() -> None:
    g = torch.Generator().manual_seed(0)
    low, high = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    assert torch.equal(slerp(0.0, low, high), low) and torch.equal(slerp(1.0, low, high), high)
    # nearly parallel noises take A1111's linear branch, weights the other way round
    torch.testing.assert_close(slerp(0.3, low, low * 1.0001), low * 0.3 + low * 1.0001 * 0.7)
    mid = slerp(0.5, low, high)
    ln, hn = low / low.norm(dim=1, keepdim=True), high / high.norm(dim=1, keepdim=True)
    omega = torch.acos((ln * hn).sum(1))
    w = (torch.sin(0.5 * omega) / torch.sin(omega)).unsqueeze(1)
    torch.testing.assert_close(mid, w * low + w * high)
    # the image's generator advances one draw whatever the variation; ENSD restarts it at seed + delta
    rng = VariationRNG([3], (4, 2, 2), [8], 0.7)
    rng.first()
    torch.testing.assert_close(rng()[0], _draws(3, 2)[1])
    ensd = VariationRNG([3], (4, 2, 2), eta_noise_seed_delta=31337)
    torch.testing.assert_close(ensd.first()[0], _draws(3, 1)[0])
    torch.testing.assert_close(ensd()[0], _draws(3 + 31337, 1)[0])


def _draws(seed: int, n: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 2, 2, generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------ hires fix

def test_hires_fix_sizes_and_steps(sd1: Engine) -> None:
    with spy(sd1.models) as s:
        r = sd1.generate(P(steps=3, sampler="Euler", hires=HiresParams(scale=1.5, steps=2, denoising_strength=0.5)))
    assert r.images[0].size == (96, 96)
    shapes = [tuple(c["x"].shape[-2:]) for c in s.calls]  # type: ignore[union-attr]
    assert shapes == [(8, 8)] * 3 + [(12, 12)] * 2  # fix-steps rule: the last 2 of int(2 / 0.5) = 4 steps
    crop = sd1.generate(P(steps=2, hires=HiresParams(resize_x=96, resize_y=64, steps=1)))
    assert crop.images[0].size == (96, 64)  # upscaled to 96x96, centre rows of the latent cropped (A1111)
    lanczos = sd1.generate(P(steps=2, hires=HiresParams(scale=2.0, upscaler="lanczos", steps=1)))
    assert lanczos.images[0].size == (128, 128) and "Hires upscaler: Lanczos" in lanczos.infotexts[0]


# ----------------------------------------------------------------------------------------------- SDXL and refiner

def _ids(y: Tensor, pooled: int, n: int) -> Tensor:
    return y[:, pooled:].reshape(y.shape[0], n, 256)


def test_sdxl_adm_ids(sdxl: Engine) -> None:
    with spy(sdxl.models) as s:
        sdxl.generate(P(steps=1, sdxl_original_size=(128, 96), sdxl_crop=(8, 0)))
    y = s.calls[0]["y"]
    assert y is not None and y.shape == (2, 64 + 6 * 256)
    want = timestep_embedding(torch.tensor([128.0, 96.0, 8.0, 0.0, 64.0, 64.0]), 256)
    for row in _ids(y, 64, 6):
        torch.testing.assert_close(row, want)


def test_refiner_takes_over_at_the_switch_sigma(sdxl: Engine, paths: dict[str, Path]) -> None:
    refiner = sdxl.refiner(paths["refiner"])
    params = P(steps=6, sampler="Euler", refiner=RefinerParams(str(paths["refiner"]), switch_at=0.6))
    with spy(sdxl.models) as base, spy(refiner.models) as ref:
        r = sdxl.generate(params)
    spec, schedule = registry.resolve("Euler", "Automatic")
    sigmas = registry.make_sigmas(spec, schedule, sdxl.discretization, 6, family="sdxl")
    table = sdxl.discretization.sigmas
    n_base = sum((999 - int(torch.argmin((table - s).abs()))) / 1000 < 0.6 for s in sigmas[:-1])
    assert len(base.calls) == n_base and len(ref.calls) == 6 - n_base and 0 < n_base < 6
    y = ref.calls[0]["y"]
    assert y is not None and y.shape == (2, 64 + 5 * 256)
    ids = _ids(y, 64, 5)  # rows: cond first, uncond last (A1111's order)
    torch.testing.assert_close(ids[1, 4], timestep_embedding(torch.tensor([2.5]), 256)[0])
    torch.testing.assert_close(ids[0, 4], timestep_embedding(torch.tensor([6.0]), 256)[0])
    torch.testing.assert_close(ids[0, :4], timestep_embedding(torch.tensor([64.0, 64.0, 0.0, 0.0]), 256))
    assert "Refiner: tiny_refiner" in r.infotexts[0]


# ------------------------------------------------------------------------------------------------------- inpainting

def _mask() -> Image.Image:
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (24, 24, 48, 48))
    return m


@pytest.mark.parametrize("convention", ["a1111", "diffusers"])
def test_inpainting_keeps_the_unmasked_image(sd1: Engine, init_image: Image.Image, convention: str) -> None:
    r = sd1.generate(P(init_images=[init_image], denoising_strength=0.9, convention=convention,
                       inpaint=InpaintParams(mask=_mask(), mask_blur=2, fill="latent_noise")))
    out, src = arr(r.images[0]), arr(init_image)
    if convention == "a1111":  # the overlay puts the original back outside the (blurred, doubled) mask
        assert np.array_equal(out[:16], src[:16]) and np.array_equal(out[:, :16], src[:, :16])
    assert np.abs(out[28:44, 28:44] - src[28:44, 28:44]).mean() > 2


def test_nine_channel_inpainting_model(paths: dict[str, Path], init_image: Image.Image) -> None:
    eng = sumie.load(paths["inpaint"])
    with spy(eng.models) as s:
        eng.generate(P(steps=2))
    assert s.calls[0]["x"].shape[1] == 9  # type: ignore[union-attr]
    assert torch.equal(s.calls[0]["x"][:, 4], torch.ones_like(s.calls[0]["x"][:, 4]))  # type: ignore[index]
    with spy(eng.models) as s:
        r = eng.generate(P(steps=2, init_images=[init_image], batch_size=2,
                           inpaint=InpaintParams(mask=_mask(), mask_blur=0)))
    x = s.calls[0]["x"]
    assert x is not None and x.shape[0] == 4
    want = torch.zeros(8, 8)
    want[3:6, 3:6] = 1
    assert all(torch.equal(x[i, 4], want) for i in range(4)) and r.images[0].size == (64, 64)
    torch.testing.assert_close(x[1, 5:], x[2, 5:], rtol=0, atol=0)  # the same masked-image latent for every row
    diffusers = eng.generate(P(steps=2, init_images=[init_image], batch_size=2, convention="diffusers",
                               inpaint=InpaintParams(mask=_mask(), mask_blur=0), denoising_strength=1.0))
    assert len(diffusers.images) == 2


# ---------------------------------------------------------------------------------------- callbacks and conventions

def test_progress_events_and_previews(sd1: Engine) -> None:
    events: list[ProgressEvent] = []
    sd1.generate(P(steps=3, batch_size=2, n_iter=2, hires=HiresParams(scale=1.5, steps=2)),
                 progress=events.append, preview_every=2)
    assert [(e.done, e.total) for e in events] == [(d, 10) for d in range(1, 11)]
    assert [(e.pass_name, e.batch, e.step, e.steps) for e in events[:5]] == [
        ("first", 0, 1, 3), ("first", 0, 2, 3), ("first", 0, 3, 3), ("hires", 0, 1, 2), ("hires", 0, 2, 2)]
    assert all(e.batches == 2 for e in events) and events[5].batch == 1 and events[-1].fraction == 1.0
    assert events[0].eta is not None and events[-1].eta == 0 and all(e.elapsed >= 0 for e in events)
    previews = [(e.done, e.preview) for e in events if e.preview is not None]
    assert [d for d, _ in previews] == [2, 3, 5, 7, 8, 10]  # every 2nd step of each pass and each pass's last
    # a random tiny VAE has no cheap latent -> RGB factors: previews decode with the VAE, at full size
    assert all(len(ims) == 2 for _, ims in previews) and previews[-1][1][0].size == (96, 96)  # type: ignore[index]
    sd1.taesd = TAESD().eval()
    try:
        fast: list[ProgressEvent] = []
        sd1.generate(P(steps=2), progress=fast.append, preview_every=1)
        assert [len(e.preview) for e in fast] == [1, 1] and fast[0].preview[0].size == (64, 64)  # type: ignore
    finally:
        sd1.taesd = None


def test_cheap_previews_use_a1111s_factors_for_the_sd_vaes() -> None:
    from sumie.configs import VAEConfig
    from sumie.models.vae import AutoencoderKL

    assert vae_io.cheap_factors(TINY["sd1"].vae) is None  # another latent space
    for scale, key in ((0.18215, "sd"), (0.13025, "sdxl")):
        with torch.device("meta"):
            vae = AutoencoderKL(VAEConfig(scaling_factor=scale))  # never run: the cheap path is a 4 x 3 matrix
        prev = vae_io.Previewer(vae)
        assert prev.method == "cheap"
        z = torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(0))
        img = np.asarray(prev(z)[0])
        assert img.shape == (3, 5, 3)
        f = vae_io.CHEAP_FACTORS[key]  # A1111: rgb[r] = sum_l z[l] * f[l][r], then truncate ((x + 1) / 2 * 255)
        r = sum(float(z[0, lch, 1, 2]) * f[lch][0] for lch in range(4))
        assert img[1, 2, 0] == int(255 * min(max((r + 1) / 2, 0.0), 1.0))


def test_uint8_conventions(sd1: Engine) -> None:
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    a1111, diffusers = arr(sd1.decode(z, "a1111")[0]), arr(sd1.decode(z, "diffusers")[0])
    d = diffusers - a1111
    assert d.min() >= 0 and d.max() <= 1 and d.any()


def test_zero_terminal_snr_checkpoints(sd1: Engine) -> None:
    eng = Engine(dataclasses.replace(sd1.models, zero_terminal_snr=True), tokenizer=sd1.tokenizer)
    assert float(eng.discretization.alphas_cumprod[-1]) == pytest.approx(4.8973451890853435e-08)  # A1111's value
    assert float(sd1.discretization.sigmas[-1]) < 20


@pytest.mark.parametrize("sampler", registry.sampler_names())
def test_every_sampler_runs_and_batches_per_image(sd1: Engine, sampler: str) -> None:
    with decoded(sd1) as latents:
        r = sd1.generate(P(sampler=sampler, steps=3, batch_size=2, seed=20))
        alone = sd1.generate(P(sampler=sampler, steps=3, seed=21)).images[0]
    assert [z.shape[0] for z in latents] == [2, 1]
    assert_same_image(latents[1][0], latents[0][1], alone, r.images[1])
    assert not np.array_equal(arr(r.images[0]), arr(r.images[1]))


def test_ensd_comments_and_extra_networks(sd1: Engine) -> None:
    plain = sd1.generate(P(steps=3))
    ensd = sd1.generate(P(steps=3, eta_noise_seed_delta=31337))
    assert "ENSD: 31337" in ensd.infotexts[0] and not np.array_equal(arr(plain.images[0]), arr(ensd.images[0]))
    det = sd1.generate(P(steps=3, sampler="Euler", eta_noise_seed_delta=31337))
    assert "ENSD" not in det.infotexts[0]  # deterministic: no noise after the first draw
    tagged = sd1.generate(P(steps=2, prompt="a cat <hypernet:detail:0.5> # a comment\nsitting"))
    assert len(tagged.warnings) == 1 and "<hypernet:detail:0.5>" in tagged.warnings[0]
    assert tagged.infotexts[0].startswith("a cat <hypernet:detail:0.5> \nsitting\n")
    same = sd1.generate(P(steps=2, prompt="a cat  \nsitting"))
    assert np.array_equal(arr(tagged.images[0]), arr(same.images[0]))


def test_half_precision_run(paths: dict[str, Path]) -> None:
    eng = sumie.load(paths["sd1"], dtype=torch.bfloat16)
    r = eng.generate(P(steps=2, batch_size=2))
    assert [im.size for im in r.images] == [(64, 64)] * 2
    assert next(eng.models.unet.parameters()).dtype == torch.bfloat16


def test_outpainting_extends_the_canvas(sd1: Engine, init_image: Image.Image) -> None:
    b = 2  # A1111 poor man's outpainting with mask blur b
    canvas, mask = outpaint.outpaint_canvas(init_image, 16, 0, 0, 8, fill="color", overlap=2 * b)
    latent_mask = outpaint.outpaint_mask(canvas.size, 16, 0, 0, 8, b // 2)
    r = sd1.generate(P(init_images=[canvas], width=None, height=None, denoising_strength=0.8, steps=3,
                       inpaint=InpaintParams(mask=mask, mask_blur=2 * b, fill="fill", latent_mask=latent_mask)))
    out = arr(r.images[0])
    assert r.images[0].size == (80, 72)
    keep = arr(init_image)[:48, 16:]  # far enough from the seam: the overlay restores the original exactly
    assert np.array_equal(out[:48, 32:], keep)
    assert np.abs(out[:, :8].astype(float) - 0).mean() > 1  # the new band is generated, not the black canvas


def test_only_masked_inpainting_pastes_back(sd1: Engine, init_image: Image.Image) -> None:
    big = init_image.resize((96, 80))
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (40, 30, 60, 50))
    r = sd1.generate(P(init_images=[big], width=64, height=64, denoising_strength=0.8,
                       inpaint=InpaintParams(mask=mask, mask_blur=0, full_res=True, full_res_padding=4)))
    out = arr(r.images[0])
    assert r.images[0].size == (96, 80)  # the crop was processed at 64x64 and pasted back
    assert np.array_equal(out[:20], arr(big)[:20]) and np.abs(out[32:48, 42:58] - arr(big)[32:48, 42:58]).mean() > 2


def test_masked_guided_model_blends_masked_regions() -> None:
    rows: list[Tensor] = []

    def mixing(x: Tensor, sigma: Tensor, context: Tensor, **_: object) -> Tensor:
        rows.append(x.clone())  # x0 = spatial mean of x + sum(context): the kept region's input matters
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x) + context.sum(dim=(1, 2)).view(-1, 1, 1, 1)

    mask = torch.zeros(1, 1, 3, 3)
    mask[..., 1:, :] = 1  # generate the lower two rows, keep the top one
    init, noise = torch.full((2, 4, 3, 3), 5.0), torch.ones(2, 4, 3, 3)
    stage = Stage(mixing, PromptConds(((_sc(1.0), 1.0),)), PromptConds(((_sc(0.0), 1.0),)))  # type: ignore[arg-type]
    model = masked_model(GuidedModel([stage], 1.0), mask, init, noise, blend_input=True, blend_from_call=1)
    x = torch.zeros(2, 4, 3, 3)
    first = model(x, torch.tensor(2.0))  # call 0 is not blended (diffusers' run from pure noise)
    torch.testing.assert_close(first[..., 0, :], init[..., 0, :])  # the prediction keeps the original
    torch.testing.assert_close(first[..., 1:, :], torch.full_like(first[..., 1:, :], 2.0))
    second = model(x, torch.tensor(2.0))  # kept row of the input re-noised: 5 + 1 * 2 = 7; mean 7 / 3
    torch.testing.assert_close(rows[1][..., 0, :], torch.full_like(rows[1][..., 0, :], 7.0))
    torch.testing.assert_close(second[..., 1:, :], torch.full_like(second[..., 1:, :], 7 / 3 + 2.0))
