"""The opt-in compiled UNet (``torch.compile``, inductor, frozen weights): the same output as the eager UNet within
fp32 rounding, eager for hooked and autograd calls, compiled again after a weight change (a LoRA patch, an in-place
edit), and through the engine an image within one level of the eager one.

Slow: inductor compiles C++ kernels, 30-90 s per graph for these small UNets on 2 cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_unet import random_unet, unet_inputs
from torch import Tensor

import sumie
from sumie.models.hooks import Residuals
from sumie.models.unet import UNetModel
from sumie.pipelines.compiled import CompiledUNet, weights_key
from sumie.pipelines.params import GenerationParams

pytestmark = pytest.mark.slow

# fp32, inductor's fused kernels sum in another order than ATen's (measured here: 2e-6 on outputs of scale ~3)
ATOL, RTOL = 1e-4, 1e-4


_model, _inputs = random_unet, unet_inputs


def test_compiled_unet_equals_eager_runs_hooks_eagerly_and_follows_weight_changes() -> None:
    unet = _model()
    compiled = CompiledUNet(unet)
    x, t, ctx = _inputs()
    with torch.no_grad():
        want = unet(x, t, ctx)
        got = compiled(x, t, ctx)
        assert compiled.compiles == 1
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        again = compiled(x, t, ctx)
        assert compiled.compiles == 1 and torch.equal(again, got)  # cached graph, same computation

        # a hooked call (ControlNet residuals) runs the eager UNet: bit for bit its output, nothing compiled
        skips = [torch.full_like(h, 0.1) for h in _skip_shapes(unet, x, t, ctx)]
        control = Residuals(skips=skips)
        assert torch.equal(compiled(x, t, ctx, control=control), unet(x, t, ctx, control=control))
        assert compiled.compiles == 1

        # an in-place weight change (what an optimizer step or a merge does): the frozen graph is rebuilt
        key = weights_key(unet)
        unet.out[2].weight.mul_(-1.0)
        assert weights_key(unet) != key
        changed = unet(x, t, ctx)
        assert not torch.allclose(changed, want, atol=1e-3)
        torch.testing.assert_close(compiled(x, t, ctx), changed, atol=ATOL, rtol=RTOL)
        assert compiled.compiles == 2
    with torch.enable_grad():  # autograd runs eagerly (training must see its gradients)
        out = compiled(x, t, ctx)
        assert out.requires_grad and compiled.compiles == 2


def _skip_shapes(unet: UNetModel, x: Tensor, t: Tensor, ctx: Tensor) -> list[Tensor]:
    """The skip connections of one eager call (their shapes for ControlNet-like residuals)."""
    seen: list[Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: seen.append(out)) for b in unet.input_blocks]
    try:
        unet(x, t, ctx)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_engine_compiled_image_is_within_one_level_and_follows_a_lora_patch() -> None:
    engine = sumie.load(None)  # sumie-tiny
    engine.show_progress = False
    params = GenerationParams(prompt="a red circle on a blue background", steps=4, width=64, height=64, seed=7)
    eager = np.asarray(engine.generate(params).images[0], dtype=np.int16)
    logs: list[str] = []
    engine.compile_unet(log=logs.append)
    compiled = np.asarray(engine.generate(params).images[0], dtype=np.int16)
    assert engine.base.compiled is not None and engine.base.compiled.compiles == 1, logs
    assert any("compiling the UNet for (2, 4, 16, 16)" in m for m in logs), logs
    assert np.abs(compiled - eager).max() <= 1  # fp32 rounding, at most one level of 255

    # weights patched in (what a LoRA does through the patcher): the compiled path compiles again and sees them
    patcher = engine.patcher.clone()
    weight = engine.models.unet.get_parameter("out.2.weight")
    patcher.add_patches({"unet.out.2.weight": weight.detach() * -1.5}, 1.0)
    with patcher.patched():
        got = np.asarray(engine.generate(params).images[0], dtype=np.int16)
        assert engine.base.compiled.compiles == 2, logs
        engine.compile_unet(False)
        want = np.asarray(engine.generate(params).images[0], dtype=np.int16)
    assert np.abs(want - eager).max() > 5  # the patch changes the image
    assert np.abs(got - want).max() <= 1
