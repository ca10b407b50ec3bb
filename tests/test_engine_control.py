"""The engine's plug points on a tiny random SD1 model: interrupt and skip, progress events, NaN checks, per-network
precision with the VAE upcast, hooks carried from ``generate`` to the UNet, extra-network handlers, warnings, and
prompts of different lengths in one UNet call."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

import sumie
from sumie.adapters.patcher import ModelPatcher
from sumie.checkpoints.save import random_single_file
from sumie.configs import TINY
from sumie.errors import NaNError
from sumie.models.hooks import AttnSite, CallInfo, ExtraTokens, Residuals, UNetOptions
from sumie.pipelines.control import JobControl, ProgressEvent
from sumie.pipelines.denoise import ModelHooks
from sumie.pipelines.engine import Engine
from sumie.pipelines.infotext import params_from_infotext
from sumie.pipelines.params import GenerationParams
from sumie.prompts.parser import ExtraNetwork


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("control")
    out = {}
    for name, seed in (("sd1", 1), ("sdxl", 2)):
        out[name] = tmp / f"tiny_{name}.safetensors"
        save_file(random_single_file(TINY[name], seed=seed), str(out[name]))  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def sd1(paths: dict[str, Path]) -> Engine:
    engine = sumie.load(paths["sd1"])
    engine.show_progress = False
    return engine


def P(**kw: object) -> GenerationParams:
    base: dict[str, object] = {"prompt": "a cat", "negative_prompt": "blurry", "steps": 6, "width": 64, "height": 64,
                               "seed": 7, "sampler": "Euler"}
    base.update(kw)
    return GenerationParams(**base)  # type: ignore[arg-type]


def arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im).astype(np.int16)


def _hash_weights(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------- interrupt, skip, progress

def test_interrupt_at_step_k_returns_the_image_of_step_k(sd1: Engine) -> None:
    control, seen = JobControl(), {}

    def listen(e: ProgressEvent) -> None:
        if e.step == 3:
            seen["x0"] = e.denoised.clone()  # type: ignore[union-attr]
            control.interrupt()

    r = sd1.generate(P(n_iter=2), progress=listen, control=control)
    assert r.interrupted and len(r.images) == 1 and r.seeds == [7]  # the second batch never started
    assert np.array_equal(arr(r.images[0]), arr(sd1.decode(seen["x0"])[0]))  # A1111: the newest prediction
    assert "Seed: 7" in r.infotexts[0] and r.images[0].info["parameters"] == r.infotexts[0]
    full = sd1.generate(P())
    assert not np.array_equal(arr(full.images[0]), arr(r.images[0]))


def test_skip_ends_one_batch_and_the_next_ones_run_as_usual(sd1: Engine) -> None:
    control, seen = JobControl(), {}

    def listen(e: ProgressEvent) -> None:
        if e.batch == 0 and e.step == 2:
            seen["x0"] = e.denoised.clone()  # type: ignore[union-attr]
            control.skip()

    r = sd1.generate(P(n_iter=3), progress=listen, control=control)
    plain = sd1.generate(P(n_iter=3))
    assert not r.interrupted and r.seeds == [7, 8, 9] and len(r.images) == 3
    assert np.array_equal(arr(r.images[0]), arr(sd1.decode(seen["x0"])[0]))
    for k in (1, 2):  # the same computation as without the skip: bit for bit
        assert np.array_equal(arr(r.images[k]), arr(plain.images[k]))


def test_interrupt_from_another_thread(sd1: Engine) -> None:
    control, started, events = JobControl(), threading.Event(), []

    def listen(e: ProgressEvent) -> None:
        events.append(e.done)
        started.set()
        if len(events) == 1:
            assert control_thread_done.wait(timeout=30)  # the other thread has interrupted by now

    control_thread_done = threading.Event()

    def stopper() -> None:
        assert started.wait(timeout=60)
        control.interrupt()
        control_thread_done.set()

    t = threading.Thread(target=stopper)
    t.start()
    r = sd1.generate(P(steps=20, n_iter=3), progress=listen, control=control)
    t.join()
    assert r.interrupted and events == [1] and len(r.images) == 1


# ------------------------------------------------------------------------------------------------------ NaN checks

def test_nan_in_the_unet_names_the_step(sd1: Engine) -> None:
    def poison(apply, x: Tensor, sigma: Tensor, **kw: object) -> Tensor:  # noqa: ANN001
        out = apply(x, sigma, **kw)
        return out * float("nan") if kw["call"].step == 2 else out  # type: ignore[attr-defined]

    with pytest.raises(NaNError, match=r"step 3 of 6 \(first pass\).*float32"):
        sd1.generate(P(), hooks=ModelHooks(wrappers=[poison]))


def test_nan_in_a_float32_vae_is_a_clear_error(paths: dict[str, Path]) -> None:
    eng = sumie.load(paths["sd1"])
    with torch.no_grad():
        eng.models.vae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NaNError, match="VAE decode.*float32.*--vae"):
        eng.generate(P(steps=2))


def test_sdxl_in_float16_keeps_its_vae_in_float32_and_runs_on_the_cpu(paths: dict[str, Path]) -> None:
    eng = sumie.load(paths["sdxl"], dtype=torch.float16)
    m = eng.models
    assert next(m.unet.parameters()).dtype == torch.float16 and m.vae.dtype == torch.float32
    assert all(next(te.parameters()).dtype == torch.float16 for te in m.text_encoders)
    r = eng.generate(P(steps=2, sampler="Euler a"))
    assert r.images[0].size == (64, 64) and not r.warnings
    forced = sumie.load(paths["sdxl"], dtype=torch.float16, vae_dtype=torch.float16, text_encoder_dtype=torch.float32)
    assert forced.models.vae.dtype == torch.float16
    assert next(forced.models.text_encoders[0].parameters()).dtype == torch.float32


def test_a_half_precision_vae_that_overflows_is_upcast_and_decoded_again(paths: dict[str, Path]) -> None:
    def overflowing(engine: Engine) -> None:
        # post_quant_conv = 60000 * identity (exact in float16): the latent enters the decoder beyond float16's
        # 65504 wherever |z| > 1.1; in float32 the decoder's group norms bring it back to scale
        conv = engine.models.vae.post_quant_conv
        with torch.no_grad():
            conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1) * 60000)
            conv.bias.zero_()

    eng = sumie.load(paths["sd1"], dtype=torch.float16)
    assert eng.models.vae.dtype == torch.float16
    overflowing(eng)
    r = eng.generate(P(steps=2))
    assert eng.models.vae.dtype == torch.float32
    assert len(r.warnings) == 1 and "overflowed in float16" in r.warnings[0]
    ref = sumie.load(paths["sd1"], dtype=torch.float16)
    ref.models.vae.to(torch.float32)  # the same float16-rounded weights, in float32 from the start
    overflowing(ref)
    want = ref.generate(P(steps=2))
    assert not want.warnings and np.array_equal(arr(r.images[0]), arr(want.images[0]))


# ----------------------------------------------------------------------------------------------- hooks end to end

def test_hooks_reach_every_model_call_with_its_step_sigma_and_rows(sd1: Engine) -> None:
    calls: list[CallInfo] = []

    def record(apply, x: Tensor, sigma: Tensor, **kw: object) -> Tensor:  # noqa: ANN001
        calls.append(kw["call"])  # type: ignore[arg-type]
        return apply(x, sigma, **kw)

    plain = sd1.generate(P(batch_size=2, steps=4))
    r = sd1.generate(P(batch_size=2, steps=4), hooks=ModelHooks(wrappers=[record]))
    assert all(np.array_equal(arr(a), arr(b)) for a, b in zip(plain.images, r.images, strict=True))
    assert [c.step for c in calls] == [0, 1, 2, 3]
    assert all(c.rows.tolist() == [1, 1, 0, 0] for c in calls)  # cond rows, then uncond rows
    assert calls[0].sigma.shape == (4,) and calls[0].sigma[0] > calls[1].sigma[0] > calls[3].sigma[0]

    def double(apply, x: Tensor, sigma: Tensor, **kw: object) -> Tensor:  # noqa: ANN001
        return apply(x, sigma, **kw) * 0.5

    changed = sd1.generate(P(batch_size=2, steps=4), hooks=ModelHooks(wrappers=[double]))
    assert not np.array_equal(arr(changed.images[0]), arr(plain.images[0]))


def test_unet_hooks_and_residuals_reach_the_unet_from_generate(sd1: Engine) -> None:
    plain = sd1.generate(P(steps=3))
    sites: list[AttnSite] = []

    def zero_scale(site: AttnSite, opts: UNetOptions) -> ExtraTokens:
        sites.append(site)
        assert opts.call is not None and opts.call.rows.tolist() == [1, 0]
        k = torch.ones(1, 3, 64 if site.size == (4, 4) else 32)  # the layer's width: 32 at 8x8, 64 at 4x4
        return ExtraTokens(k, k, 0.0)

    same = sd1.generate(P(steps=3), hooks=ModelHooks(unet=UNetOptions(extra_kv=[zero_scale])))
    assert np.array_equal(arr(same.images[0]), arr(plain.images[0]))  # scale 0 adds exactly nothing
    n_cross = sum(1 for s in sites if s.block == sites[0].block and s.index == sites[0].index)
    assert n_cross == 3 and len(sites) == 3 * len({(s.block, s.index) for s in sites})
    seen: list[int] = []

    def middle(x: Tensor, t: Tensor, context: Tensor, y: Tensor | None, call: CallInfo | None) -> Residuals:
        seen.append(call.step)  # type: ignore[union-attr]
        return Residuals(middle=torch.full((x.shape[0], 64, 4, 4), 0.5))

    moved = sd1.generate(P(steps=3), hooks=ModelHooks(residuals=[middle]))
    assert seen == [0, 1, 2] and not np.array_equal(arr(moved.images[0]), arr(plain.images[0]))


def test_prompts_of_different_lengths_share_one_unet_call(sd1: Engine) -> None:
    """A 2-chunk prompt against a 1-chunk negative prompt: one UNet call per step, equal to two separate calls."""
    long_prompt = "a cat, " * 30  # 90 tokens: two chunks
    diffs: list[float] = []

    def check(apply, x: Tensor, sigma: Tensor, **kw: object) -> Tensor:  # noqa: ANN001
        out = apply(x, sigma, **kw)
        ctx, rows = kw["context"], kw["call"].rows  # type: ignore[attr-defined]
        assert ctx.shape[1] == 154  # type: ignore[attr-defined]
        c, u = rows > 0, rows == 0
        kw_c = {**kw, "context": ctx[c], "call": None}  # type: ignore[index]
        kw_u = {**kw, "context": ctx[u][:, :77], "call": None}  # type: ignore[index]
        split = torch.cat([apply(x[c], sigma[c], **kw_c), apply(x[u], sigma[u], **kw_u)])
        diffs.append(float((out - split).abs().max() / split.abs().max()))
        return out

    r = sd1.generate(P(prompt=long_prompt, steps=3), hooks=ModelHooks(wrappers=[check]))
    assert len(diffs) == 3 and max(diffs) < 1e-5  # fp32 rounding: attention cannot tell repetition apart
    assert "Pad conds" not in r.infotexts[0]
    padded = sd1.generate(P(prompt=long_prompt, steps=3, pad_conds=True))
    assert "Pad conds: True" in padded.infotexts[0] and params_from_infotext(padded.infotexts[0]).pad_conds
    assert not np.array_equal(arr(padded.images[0]), arr(r.images[0]))  # A1111's padding attends to empty chunks


# ------------------------------------------------------------------------------------------ extra-network handlers

class ScaleQuery:
    """A test handler: ``<scaleq:NAME:W>`` multiplies the first text-encoder query weight by (1 + W)."""

    KEY = "clip_l.text_model.encoder.layers.0.self_attn.q_proj.weight"

    def __init__(self) -> None:
        self.patcher: ModelPatcher | None = None
        self.seen_weight: Tensor | None = None
        self.deactivated = 0

    def activate(self, engine: Engine, job: object, tags: list[ExtraNetwork]) -> None:
        if not tags:  # the engine calls every handler on every request
            self.patcher = None
            return
        w = float(tags[0].args[0])
        self.patcher = engine.patcher.clone()
        self.patcher.add_patches({self.KEY: lambda weight: weight * (1 + w)})
        self.patcher.patch()
        job.extra["Scaleq"] = tags[0].name  # type: ignore[attr-defined]

    def deactivate(self, engine: Engine, job: object) -> None:
        if self.patcher is not None:
            self.patcher.unpatch()
        self.deactivated += 1


def test_extra_network_handlers_patch_before_encoding_and_restore_after(sd1: Engine) -> None:
    te = sd1.models.text_encoders[0]
    before = _hash_weights(te), _hash_weights(sd1.models.unet)
    handler = ScaleQuery()
    sd1.extra_networks["scaleq"] = handler
    try:
        tagged = sd1.generate(P(prompt="a cat <scaleq:x:2.0>"))
    finally:
        del sd1.extra_networks["scaleq"]
    assert handler.deactivated == 1 and (_hash_weights(te), _hash_weights(sd1.models.unet)) == before
    plain = sd1.generate(P(prompt="a cat"))
    assert not tagged.warnings and "Scaleq: x" in tagged.infotexts[0]
    assert tagged.infotexts[0].startswith("a cat <scaleq:x:2.0>")  # the tag stays in the metadata, as A1111
    assert not np.array_equal(arr(tagged.images[0]), arr(plain.images[0]))  # the encoder was patched in time
    # the same weights patched by hand give the same image
    with torch.no_grad():
        q = te.text_model.encoder.layers[0].self_attn.q_proj.weight
        original = q.detach().clone()
        q.mul_(3.0)
        try:
            by_hand = sd1.generate(P(prompt="a cat"))
        finally:
            q.copy_(original)
    assert np.array_equal(arr(by_hand.images[0]), arr(tagged.images[0]))


def test_a_failing_request_still_deactivates_its_handlers(sd1: Engine) -> None:
    handler = ScaleQuery()
    sd1.extra_networks["scaleq"] = handler
    before = _hash_weights(sd1.models.text_encoders[0])
    try:
        with pytest.raises(NaNError):
            sd1.generate(P(prompt="a cat <scaleq:x:1.0>"),
                         hooks=ModelHooks(wrappers=[lambda apply, x, s, **kw: apply(x, s, **kw) * float("nan")]))
    finally:
        del sd1.extra_networks["scaleq"]
    assert handler.deactivated == 1 and _hash_weights(sd1.models.text_encoders[0]) == before


def test_unknown_extra_networks_are_one_warning_in_the_result(sd1: Engine) -> None:
    r = sd1.generate(dataclasses.replace(P(), prompt="a <lyco2:a:1> cat <lyco2:b:0.5>",
                                         negative_prompt="<hypernet:h:1>"))
    assert len(r.warnings) == 2
    assert "'lyco2'" in r.warnings[0] and "<lyco2:a:1>, <lyco2:b:0.5>" in r.warnings[0]
    assert "<hypernet:h:1>" in r.warnings[1]
