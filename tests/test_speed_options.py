"""Speed options that change the image (README "Speed options that change the image"): A1111's NGMS and Skip Early
CFG, token merging (ToMe; tomesd 0.1.3 as the oracle of the matching), DeepCache and the TAESD final decode. Each is
off by default; each test checks that off (or on where it cannot act) leaves the image bit-identical, and that on it
does what it says (fewer UNet rows, fewer deep-block calls, merged tokens)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tomesd.merge import bipartite_soft_matching_random2d
from torch import Tensor, nn

import sumie
from sumie.checkpoints.save import random_single_file
from sumie.cli.main import _build_params, build_parser
from sumie.configs import TINY
from sumie.errors import ConfigError
from sumie.models.hooks import AttnSite, DeepCache, UNetOptions
from sumie.models.taesd import TAESD
from sumie.models.tome import TokenMerging, bipartite_soft_matching_2d
from sumie.models.unet import UNetModel
from sumie.pipelines.denoise import GuidedModel, Stage
from sumie.pipelines.engine import Engine
from sumie.pipelines.infotext import format_infotext, params_from_infotext
from sumie.pipelines.params import GenerationParams, HiresParams
from sumie.pipelines.scheduled_conds import PromptConds, ScheduledCond
from sumie.sampling.guidance import guided_call


def _write(tmp: Path, name: str, cfg: object, seed: int) -> Path:
    path = tmp / f"{name}.safetensors"
    save_file(random_single_file(cfg, seed=seed), str(path))  # type: ignore[arg-type]
    return path


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return sumie.load(_write(tmp_path_factory.mktemp("speed"), "tiny_sd1", TINY["sd1"], 1))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return sumie.load(_write(tmp_path_factory.mktemp("speed_xl"), "tiny_sdxl", TINY["sdxl"], 2))


class Rows(nn.Module):
    """Wraps a UNet and records the batch rows of every call."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.inner = unet
        self.rows: list[int] = []

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        self.rows.append(x.shape[0])
        return self.inner(x, *args, **kwargs)


def P(**kw: object) -> GenerationParams:
    base: dict[str, object] = {"prompt": "a cat", "negative_prompt": "blurry", "steps": 6, "width": 64, "height": 64,
                               "seed": 7, "sampler": "Euler", "cfg_scale": 5.0}
    base.update(kw)
    return GenerationParams(**base)  # type: ignore[arg-type]


def run(engine: Engine, **kw: object) -> tuple[np.ndarray, list[int], str]:
    """(image as int16 array, UNet batch rows per call, infotext) of one generation."""
    unet = engine.models.unet
    spy = Rows(unet)
    engine.models.unet = spy  # type: ignore[assignment]
    try:
        res = engine.generate(P(**kw))
    finally:
        engine.models.unet = unet
    return np.asarray(res.images[0]).astype(np.int16), spy.rows, res.infotexts[0]


def test_everything_is_off_by_default() -> None:
    p = GenerationParams()
    assert (p.token_merging_ratio, p.token_merging_ratio_hr, p.s_min_uncond, p.skip_early_cond,
            p.deepcache_interval) == (0.0, 0.0, 0.0, 0.0, 0)
    assert not (p.token_merging_random or p.s_min_uncond_all or p.taesd_decode)


# ------------------------------------------------------------------------------------------ NGMS, Skip Early CFG

def test_ngms_skips_the_uncond_rows_on_odd_calls_below_the_sigma(sd1: Engine) -> None:
    off, rows, text = run(sd1)
    assert rows == [2] * 6 and "NGMS" not in text and "Skip Early CFG" not in text
    never, rows_never, _ = run(sd1, s_min_uncond=1e-4)  # on, but no sigma of the schedule is below it
    assert rows_never == [2] * 6 and np.array_equal(never, off)
    on, rows_on, text_on = run(sd1, s_min_uncond=100.0)
    assert rows_on == [2, 1, 2, 1, 2, 1] and "NGMS: 100" in text_on and "NGMS all steps" not in text_on
    assert np.abs(on - off).max() > 0
    _, rows_all, text_all = run(sd1, s_min_uncond=100.0, s_min_uncond_all=True)
    assert rows_all == [1] * 6 and "NGMS all steps: True" in text_all


def test_skip_early_cond_drops_the_uncond_on_the_first_fraction(sd1: Engine) -> None:
    off, _, _ = run(sd1)
    on, rows, text = run(sd1, skip_early_cond=0.5)
    assert rows == [1, 1, 1, 1, 2, 2]  # calls 0..3: call / 6 <= 0.5 (A1111's rule)
    assert "Skip Early CFG: 0.5" in text and np.abs(on - off).max() > 0


def test_skipped_uncond_combines_like_a1111() -> None:
    """A skipped uncond: a plain prompt gives its cond; with AND the first cond stands in for the uncond, scale 1."""
    def den(x: Tensor, sigma: Tensor, context: Tensor) -> Tensor:
        return x * 0 + context[:, :1, :1, None]  # [B, 1, 1, 1]: each row's first context value

    x, sigma = torch.zeros(1, 1, 1, 1), torch.ones(1)
    c1, c2, u = ({"context": torch.full((1, 1, 1), v)} for v in (2.0, 5.0, 1.0))
    plain = guided_call(den, x, sigma, [(c1, 1.0)], u, 7.0, skip_uncond=True)
    assert plain.item() == 2.0
    both = guided_call(den, x, sigma, [(c1, 1.0), (c2, 0.5)], u, 7.0, skip_uncond=True)
    assert both.item() == 2.0 + 0.5 * (5.0 - 2.0)
    assert guided_call(den, x, sigma, [(c1, 1.0)], u, 7.0).item() == 1.0 + 7.0 * (2.0 - 1.0)

    def sc(v: float) -> PromptConds:
        return PromptConds(((ScheduledCond((1000,), (str(v),), torch.full((1, 1, 1), v)), 1.0),))

    calls: list[int] = []

    def counting(x: Tensor, sigma: Tensor, context: Tensor) -> Tensor:
        calls.append(x.shape[0])
        return den(x, sigma, context)

    model = GuidedModel([Stage(counting, sc(2.0), sc(1.0))], 7.0, s_min_uncond=5.0)  # type: ignore[arg-type]
    for s in (9.0, 9.0, 4.0, 4.0):  # calls 1 and 3 are odd; only call 3 is below 5
        model(x, torch.tensor([s]))
    assert calls == [2, 2, 2, 1] and model.uncond_skipped == 1


# -------------------------------------------------------------------------------------------------------- ToMe

@pytest.mark.parametrize(("h", "w", "r", "rand"), [(8, 8, 20, False), (6, 10, 13, False), (7, 9, 25, False),
                                                    (8, 8, 20, True), (5, 6, 9, True)])
def test_token_matching_equals_tomesd(h: int, w: int, r: int, rand: bool) -> None:
    """Merge, a token-mixing function (attention, which ignores token order) and unmerge give tomesd's result."""
    g = torch.Generator().manual_seed(3)
    metric = torch.randn(2, h * w, 16, generator=g)
    x = torch.randn(2, h * w, 8, generator=g)
    ours = bipartite_soft_matching_2d(metric, w, h, 2, 2, r, torch.Generator().manual_seed(5) if rand else None)
    ref = bipartite_soft_matching_random2d(metric, w, h, 2, 2, r, no_rand=not rand,
                                           generator=torch.Generator().manual_seed(5))

    def attend(t: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(t[:, None], t[:, None], t[:, None])[:, 0] + t.square()

    assert ours[0](x).shape == (2, h * w - r, 8)
    torch.testing.assert_close(ours[1](attend(ours[0](x))), ref[1](attend(ref[0](x))), rtol=1e-5, atol=1e-6)


def test_token_merging_hook_acts_at_the_full_resolution_only() -> None:
    tome = TokenMerging(0.5, (16, 16))
    x = torch.randn(2, 256, 8)
    site = AttnSite(("input", 1), 0, "self", (16, 16))
    assert tome(x, site, UNetOptions()) is not None
    assert tome(x[:, :64], dataclasses.replace(site, size=(8, 8)), UNetOptions()) is None  # downsample 2
    assert TokenMerging(0.003, (16, 16))(x, site, UNetOptions()) is None  # int(256 * 0.003) = 0 tokens


def test_token_merging_changes_the_image_and_nothing_when_nothing_merges(sd1: Engine, sdxl: Engine) -> None:
    off, _, text = run(sd1)
    assert "Token merging" not in text
    none_merged, _, _ = run(sd1, token_merging_ratio=0.001)  # 16 x 16 latent: int(256 * 0.001) = 0
    assert np.array_equal(none_merged, off)
    on, _, text_on = run(sd1, token_merging_ratio=0.5)
    assert np.abs(on - off).max() > 0 and "Token merging ratio: 0.5" in text_on
    rand, _, text_rand = run(sd1, token_merging_ratio=0.5, token_merging_random=True)
    assert np.abs(rand - on).max() > 0 and "Token merging random: True" in text_rand
    again, _, _ = run(sd1, token_merging_ratio=0.5, token_merging_random=True)
    assert np.array_equal(again, rand)  # the draw comes from the seed
    # tiny SDXL has no attention at the full latent resolution: ToMe (max_downsample 1) merges nothing, as A1111
    xl_off, _, _ = run(sdxl, steps=2)
    xl_on, _, _ = run(sdxl, steps=2, token_merging_ratio=0.5)
    assert np.array_equal(xl_on, xl_off)


# --------------------------------------------------------------------------------------------------- DeepCache

@pytest.mark.parametrize("depth", [0, 1, 3])
def test_deepcache_reuse_of_the_same_input_is_the_full_call(depth: int) -> None:
    """A cached call on the inputs the cache was made from computes exactly the full UNet (same ops, same inputs)."""
    unet = UNetModel(TINY["sd1"].unet).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, TINY["sd1"].unet.context_dim, generator=g)
    middle: list[int] = []
    handle = unet.middle_block.register_forward_hook(lambda *a: middle.append(1))
    with torch.no_grad():
        full = unet(x, t, ctx)
        opts = UNetOptions(deep_cache=DeepCache(interval=2, depth=depth))
        first = unet(x, t, ctx, options=opts)
        cached = unet(x, t, ctx, options=opts)
        other = unet(x + 1, t, ctx, options=opts)  # call 2: due, in full
        reused = unet(x, t, ctx, options=opts)  # call 3: the features of x + 1 with the shallow part of x
    handle.remove()
    assert torch.equal(first, full) and torch.equal(cached, full)
    assert len(middle) == 3  # full, first, other: the cached calls skipped the middle block
    assert not torch.equal(reused, full) and not torch.equal(reused, other)


def test_deepcache_in_the_engine(sd1: Engine) -> None:
    off, _, text = run(sd1)
    same, _, _ = run(sd1, deepcache_interval=1)  # every call in full: off
    assert np.array_equal(same, off) and "DeepCache" not in text
    middle: list[int] = []
    handle = sd1.models.unet.middle_block.register_forward_hook(lambda *a: middle.append(1))
    try:
        on, _, text_on = run(sd1, deepcache_interval=3, deepcache_depth=1)
    finally:
        handle.remove()
    assert len(middle) == 2  # calls 0 and 3 of 6
    assert np.abs(on - off).max() > 0 and "DeepCache interval: 3, DeepCache depth: 1" in text_on


# ------------------------------------------------------------------------------------------------ TAESD decode

def test_taesd_final_decode(sd1: Engine) -> None:
    with pytest.raises(ConfigError, match="TAESD decoder"):
        sd1.generate(P(taesd_decode=True))
    off, _, _ = run(sd1)
    sd1.taesd = TAESD(encoder=False).eval()
    try:
        same, _, _ = run(sd1)  # a loaded TAESD alone changes nothing
        on, _, text = run(sd1, taesd_decode=True)
        expect = ((sd1.taesd.decode(_latent(sd1)).clamp(-1, 1) + 1) * 127.5)
    finally:
        sd1.taesd = None
    assert np.array_equal(same, off) and "VAE Decoder: TAESD" in text and on.shape == off.shape
    assert np.abs(on - off).max() > 0
    np.testing.assert_array_equal(on, expect[0].permute(1, 2, 0).detach().numpy().astype(np.uint8))


def _latent(engine: Engine) -> Tensor:
    """The final latent of the default request (the sampler's output, before decoding)."""
    seen: list[Tensor] = []
    engine.generate(P(), progress=lambda e: seen.append(e.denoised))  # type: ignore[attr-defined]
    return seen[-1]


# ------------------------------------------------------------------------------------ infotext, CLI, validation

def test_infotext_round_trip_and_cli_flags() -> None:
    p = P(token_merging_ratio=0.3, token_merging_ratio_hr=0.5, token_merging_random=True, s_min_uncond=2.5,
          s_min_uncond_all=True, skip_early_cond=0.2, deepcache_interval=3, deepcache_depth=2, taesd_decode=True,
          hires=HiresParams(scale=1.5))
    text = format_infotext(p, seed=7, subseed=0, index=0, model_name="m", model_hash=None)
    assert "Token merging ratio: 0.3, Token merging ratio hr: 0.5" in text
    back = params_from_infotext(text)
    for f in ("token_merging_ratio", "token_merging_ratio_hr", "token_merging_random", "s_min_uncond",
              "s_min_uncond_all", "skip_early_cond", "deepcache_interval", "deepcache_depth", "taesd_decode"):
        assert getattr(back, f) == getattr(p, f), f
    hr_default = format_infotext(dataclasses.replace(p, token_merging_ratio_hr=0.0), seed=7, subseed=0, index=0,
                                 model_name="m", model_hash=None)
    assert "Token merging ratio hr: 0.3" in hr_default  # A1111: the hires pass falls back to the first pass's
    args = build_parser().parse_args(["generate", "x", "--token-merging-ratio", "0.4", "--ngms", "1.5",
                                      "--ngms-all-steps", "--skip-early-cond", "0.1", "--deepcache-interval", "3",
                                      "--deepcache-depth", "1", "--taesd-decode", "--token-merging-random"])
    q, _ = _build_params(args, "txt2img")
    assert (q.token_merging_ratio, q.s_min_uncond, q.s_min_uncond_all, q.skip_early_cond, q.deepcache_interval,
            q.deepcache_depth, q.taesd_decode, q.token_merging_random) == (0.4, 1.5, True, 0.1, 3, 1, True, True)
    d, _ = _build_params(build_parser().parse_args(["generate", "x"]), "txt2img")
    assert d == GenerationParams(prompt="x")


@pytest.mark.parametrize(("kw", "words"), [
    ({"token_merging_ratio": 0.95}, "token merging ratio"), ({"s_min_uncond": -1.0}, "s min uncond"),
    ({"skip_early_cond": 1.5}, "skip early cond"), ({"deepcache_interval": -2}, "deepcache interval"),
    ({"deepcache_depth": -1}, "deepcache depth")])
def test_bad_speed_options_are_config_errors(sd1: Engine, kw: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        sd1.generate(P(**kw))


def test_a1111_api_request_and_options_reach_the_params() -> None:
    """The A1111 API: the request's s_min_uncond (else the option), and the NGMS / Skip Early CFG / ToMe options."""
    from sumie.serve.config import Limits
    from sumie.serve.mapping import build_plan
    from sumie.serve.models import Txt2ImgRequest
    from sumie.serve.options import DEFAULT_OPTIONS

    class Catalog:
        def checkpoint(self, name: object, field: str) -> str:
            return "model"

        def vae(self, name: object, field: str) -> None:
            return None

    def params(options: dict[str, object], **req: object) -> GenerationParams:
        plan = build_plan("txt2img", Txt2ImgRequest(prompt="a", steps=2, **req), Catalog(),  # type: ignore[arg-type]
                          {**DEFAULT_OPTIONS, **options}, Limits())
        assert not any("s_min_uncond" in w for w in plan.warnings)
        return plan.params

    p = params({})
    assert (p.s_min_uncond, p.skip_early_cond, p.token_merging_ratio) == (0.0, 0.0, 0.0)
    p = params({"s_min_uncond": 1.5, "s_min_uncond_all": True, "skip_early_cond": 0.25, "token_merging_ratio": 0.4,
                "token_merging_ratio_hr": 0.6})
    assert (p.s_min_uncond, p.s_min_uncond_all, p.skip_early_cond, p.token_merging_ratio,
            p.token_merging_ratio_hr) == (1.5, True, 0.25, 0.4, 0.6)
    assert params({"s_min_uncond": 1.5}, s_min_uncond=3.0).s_min_uncond == 3.0
