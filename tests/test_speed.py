"""Exact-output speed-ups of the UNet: each must give the same output as the plain computation.

Cross-attention keys / values of the text context are cached across calls (the context is the same at every step of
a pass): the cached path runs the same computation on the same inputs, so outputs are compared bit for bit; the
cache must be dropped when the context or the to_k / to_v weights change (LoRA patch, in-place edit).
"""

from __future__ import annotations

import copy

import torch
from tiny_unet import random_unet, unet_inputs
from torch import Tensor

from sumie.adapters.patcher import ModelPatcher
from sumie.models.attention import CrossAttention
from sumie.models.unet import UNetModel

_model, _inputs = random_unet, unet_inputs


def _cross(m: UNetModel) -> list[CrossAttention]:
    return [mod for name, mod in m.named_modules() if name.endswith("attn2")]


def _count_kv(m: UNetModel) -> list[int]:
    """A counter of to_k calls of the cross-attention layers (one element, incremented per call)."""
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    for attn in _cross(m):
        attn.to_k.register_forward_hook(hook)
    return calls


def _reference(m: UNetModel, x: Tensor, t: Tensor, ctx: Tensor) -> Tensor:
    """The plain computation: with gradients on, the cache is neither read nor written."""
    with torch.enable_grad():
        return m(x, t, ctx).detach()


def test_cached_kv_is_reused_and_bitwise_equal() -> None:
    m = _model()
    x, t, ctx = _inputs()
    n_layers = len(_cross(m))
    assert n_layers > 0
    ref = _reference(m, x, t, ctx)
    calls = _count_kv(m)
    with torch.no_grad():
        first = m(x, t, ctx.clone())
        assert calls[0] == n_layers
        second = m(x * 0.5, t, ctx.clone())  # another step: new latent, same context values in a new tensor
        assert calls[0] == n_layers, "the context's keys were recomputed"
    assert torch.equal(first, ref)
    assert torch.equal(second, _reference(m, x * 0.5, t, ctx))


def test_changed_context_recomputes() -> None:
    m = _model()
    x, t, ctx = _inputs()
    calls = _count_kv(m)
    other = ctx.clone()
    other[1, 3, 0] += 1.0
    with torch.no_grad():
        m(x, t, ctx)
        out = m(x, t, other)
    assert calls[0] == 2 * len(_cross(m))
    assert torch.equal(out, _reference(m, x, t, other))
    assert not torch.equal(out, _reference(m, x, t, ctx))


def test_lora_patch_after_a_cached_pass_invalidates() -> None:
    m = _model()
    x, t, ctx = _inputs()
    with torch.no_grad():
        before = m(x, t, ctx)
    key = next(k for k in m.state_dict() if k.endswith("attn2.to_k.weight"))
    delta = torch.randn(m.state_dict()[key].shape, generator=torch.Generator().manual_seed(3))
    baked = copy.deepcopy(m)
    with torch.no_grad():
        baked.get_parameter(key).add_(delta)
    patcher = ModelPatcher(m)
    patcher.add_patches({key: delta})
    with patcher.patched(), torch.no_grad():
        patched = m(x, t, ctx)
    with torch.no_grad():
        after = m(x, t, ctx)
    assert torch.equal(patched, _reference(baked, x, t, ctx))
    assert not torch.equal(patched, before)
    assert torch.equal(after, before)  # unpatched: the original weights again


def test_in_place_weight_change_invalidates() -> None:
    m = _model()
    x, t, ctx = _inputs()
    with torch.no_grad():
        m(x, t, ctx)
        _cross(m)[0].to_v.weight.mul_(2.0)  # e.g. load_state_dict or an optimizer step: same tensor, new version
        out = m(x, t, ctx)
    assert torch.equal(out, _reference(m, x, t, ctx))


def test_no_cache_while_recording_gradients() -> None:
    m = _model()
    x, t, ctx = _inputs()
    calls = _count_kv(m)
    with torch.no_grad():
        m(x, t, ctx)
    out = m(x, t, ctx)
    assert calls[0] == 2 * len(_cross(m))
    assert out.requires_grad
