"""UNet plug points (``sumie.models.hooks``): each hook kind changes the output exactly as a hand-made reference does.

The references are independent computations: a UNet whose weights were edited by hand so that it computes what the
hook should compute, or diffusers' own residual arguments. Two different computations of the same function are
compared with a tolerance of 1e-5 relative to the output scale (fp32; float rounding only).
"""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch
import torch.nn.functional as F
from tiny_unet import CFG, random_unet, unet_inputs
from torch import Tensor

from sumie.checkpoints.keymaps.unet import ldm_to_diffusers_unet
from sumie.models.hooks import AttnSite, CallInfo, ExtraTokens, Residuals, UNetOptions
from sumie.models.unet import UNetModel

_model, _inputs = random_unet, unet_inputs


def _close(a: Tensor, b: Tensor, rel: float = 1e-5) -> None:
    scale = max(1.0, b.abs().max().item())
    diff = (a - b).abs().max().item()
    assert diff <= rel * scale, f"max abs diff {diff} (scale {scale})"


def _attn_layers(model: UNetModel, kind: str) -> dict[tuple[tuple[str, int], int], torch.nn.Module]:
    """(block, transformer index) -> attn1 / attn2 module, found independently of the hook code."""
    out = {}
    groups = [("input", model.input_blocks), ("middle", [model.middle_block]), ("output", model.output_blocks)]
    for name, blocks in groups:
        for i, block in enumerate(blocks):
            for layer in block:
                for k, tb in enumerate(getattr(layer, "transformer_blocks", [])):
                    out[((name, i), k)] = tb.attn1 if kind == "self" else tb.attn2
    return out


@torch.no_grad()
def test_no_options_and_empty_options_are_the_plain_path() -> None:
    model = _model()
    x, t, ctx = _inputs()
    plain = model(x, t, ctx)
    assert torch.equal(model(x, t, ctx, options=UNetOptions()), plain)  # the same computation: bit for bit


@torch.no_grad()
def test_every_attention_layer_is_visited_with_its_site() -> None:
    model = _model()
    x, t, ctx = _inputs()
    seen: list[AttnSite] = []

    def record(site: AttnSite, opts: UNetOptions) -> None:
        seen.append(site)
        return None

    model(x, t, ctx, options=UNetOptions(extra_kv=[record]))
    cross = _attn_layers(model, "cross")
    assert [(s.block, s.index) for s in seen if s.kind == "cross"] == list(cross)
    assert {s.kind for s in seen} == {"cross"}  # extra tokens are a cross-attention hook
    sizes = {s.block: s.size for s in seen}
    assert sizes[("input", 1)] == (8, 8) and sizes[("middle", 0)] == (4, 4)


@pytest.mark.parametrize("scale", [1.0, 0.5, -0.3])
@torch.no_grad()
def test_extra_kv_tokens_add_scaled_attention(scale: float) -> None:
    """Extra tokens equal to the text's own keys/values at scale s == attention output times (1 + s)."""
    model = _model()
    x, t, ctx = _inputs()
    layers = _attn_layers(model, "cross")

    def same_tokens(site: AttnSite, opts: UNetOptions) -> ExtraTokens | None:
        attn = layers[(site.block, site.index)]
        return ExtraTokens(attn.to_k(ctx), attn.to_v(ctx), scale)

    hooked = model(x, t, ctx, options=UNetOptions(extra_kv=[same_tokens]))
    ref = copy.deepcopy(model)
    for attn in _attn_layers(ref, "cross").values():
        attn.to_out[0].weight.mul_(1 + scale)  # to_out(a * (1 + s)) = W (1 + s) a + b
    _close(hooked, ref(x, t, ctx))
    assert (hooked - model(x, t, ctx)).abs().max() > 1e-3


@torch.no_grad()
def test_extra_kv_scale_per_row_reaches_only_its_rows() -> None:
    model = _model()
    x, t, ctx = _inputs()
    layers = _attn_layers(model, "cross")
    plain = model(x, t, ctx)

    def tokens(site: AttnSite, opts: UNetOptions) -> ExtraTokens:
        attn = layers[(site.block, site.index)]
        return ExtraTokens(attn.to_k(ctx), attn.to_v(ctx), torch.tensor([0.0, 1.0]))

    hooked = model(x, t, ctx, options=UNetOptions(extra_kv=[tokens]))
    ref = copy.deepcopy(model)
    for attn in _attn_layers(ref, "cross").values():
        attn.to_out[0].weight.mul_(2)
    _close(hooked[0], plain[0])
    _close(hooked[1], ref(x, t, ctx)[1])


@torch.no_grad()
def test_replaced_attention_is_used_at_every_site() -> None:
    """An attention function that zeroes cross-attention == a UNet whose attn2 output weights are zero."""
    model = _model()
    x, t, ctx = _inputs()

    def no_cross(q: Tensor, k: Tensor, v: Tensor, site: AttnSite, opts: UNetOptions) -> Tensor:
        out = F.scaled_dot_product_attention(q, k, v)
        return out * 0 if site.kind == "cross" else out

    hooked = model(x, t, ctx, options=UNetOptions(attention=no_cross))
    ref = copy.deepcopy(model)
    for attn in _attn_layers(ref, "cross").values():
        attn.to_out[0].weight.zero_()
    _close(hooked, ref(x, t, ctx))

    def manual(q: Tensor, k: Tensor, v: Tensor, site: AttnSite, opts: UNetOptions) -> Tensor:
        w = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)  # Vaswani et al. 2017, eq. 1
        return w @ v

    _close(model(x, t, ctx, options=UNetOptions(attention=manual)), model(x, t, ctx))


@torch.no_grad()
def test_attention_input_patch_changes_what_keys_and_values_see() -> None:
    """Self-attention over its own tokens twice is the same function (softmax of duplicated keys);
    over zero tokens (no bias in to_k / to_v) its output is zero == attn1 output weights zeroed."""
    model = _model()
    x, t, ctx = _inputs()

    def doubled(h: Tensor, context: Tensor, site: AttnSite, opts: UNetOptions) -> Tensor:
        return torch.cat([context, context], dim=1) if site.kind == "self" else context

    _close(model(x, t, ctx, options=UNetOptions(attn_inputs=[doubled])), model(x, t, ctx))

    def zeros(h: Tensor, context: Tensor, site: AttnSite, opts: UNetOptions) -> Tensor:
        return context * 0 if site.kind == "self" else context

    ref = copy.deepcopy(model)
    for attn in _attn_layers(ref, "self").values():
        attn.to_out[0].weight.zero_()
    _close(model(x, t, ctx, options=UNetOptions(attn_inputs=[zeros])), ref(x, t, ctx))


@torch.no_grad()
def test_call_info_reaches_the_hooks() -> None:
    model = _model()
    x, t, ctx = _inputs()
    got: list[tuple[int, list[int]]] = []

    def record(site: AttnSite, opts: UNetOptions) -> None:
        assert opts.call is not None
        got.append((opts.call.step, opts.call.uncond.tolist()))

    call = CallInfo(step=3, sigma=torch.tensor([1.0, 1.0]), rows=torch.tensor([0, 1]))
    model(x, t, ctx, options=UNetOptions(extra_kv=[record], call=call))
    assert got and all(g == (3, [True, False]) for g in got)


@torch.no_grad()
def test_encoder_residuals_equal_diffusers_t2i_adapter_residuals() -> None:
    """Residuals(encoder=...) at the last block of each level == diffusers' down_intrablock_additional_residuals."""
    cfg = CFG
    model = _model(cfg, seed=4)
    dcfg = dict(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32,
    )
    ref = diffusers.UNet2DConditionModel(**dcfg).eval()
    sd = ldm_to_diffusers_unet(model.state_dict(), cfg)
    ref.load_state_dict(sd)
    x, t, ctx = _inputs(cfg)
    feats: list[Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, o: feats.append(o)) for b in model.input_blocks]
    model(x, t, ctx)
    for h in handles:
        h.remove()
    g = torch.Generator().manual_seed(9)
    # the last (res, attn) block of each level: input blocks 1 and 3 for one res block per level
    last = [1, 3]
    res = [torch.randn(feats[i].shape, generator=g) for i in last]
    encoder: list[Tensor | None] = [None] * len(model.input_blocks)
    for i, r in zip(last, res, strict=True):
        encoder[i] = r
    ours = model(x, t, ctx, control=Residuals(encoder=encoder))
    theirs = ref(x, t, ctx, down_intrablock_additional_residuals=[r.clone() for r in res]).sample
    _close(ours, theirs, rel=1e-4)
    assert (ours - model(x, t, ctx)).abs().max() > 1e-2


@torch.no_grad()
def test_skip_residuals_only_reach_the_decoder_while_encoder_residuals_run_on() -> None:
    model = _model()
    x, t, ctx = _inputs()
    feats: list[Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, o: feats.append(o)) for b in model.input_blocks]
    plain = model(x, t, ctx)
    for h in handles:
        h.remove()
    r = torch.randn(feats[1].shape, generator=torch.Generator().manual_seed(2))
    # hand-made reference: run the encoder with a forward hook adding r to block 1's output
    handle = model.input_blocks[1].register_forward_hook(lambda m, a, o: o + r)
    want_encoder = model(x, t, ctx)
    handle.remove()
    _close(model(x, t, ctx, control=Residuals(encoder=[None, r])), want_encoder)
    skip_only = model(x, t, ctx, control=Residuals(skips=[None, r]))
    assert not torch.allclose(skip_only, want_encoder) and not torch.allclose(skip_only, plain)


def test_residuals_add_elementwise_and_keep_missing_entries() -> None:
    a = Residuals(encoder=[torch.ones(1), None], skips=[None], middle=torch.ones(1))
    b = Residuals(encoder=[torch.ones(1) * 2], skips=[None, torch.ones(1)], middle=None)
    s = a.add(b)
    assert s.encoder[0].item() == 3 and s.encoder[1] is None  # type: ignore[union-attr]
    assert s.skips[0] is None and s.skips[1].item() == 1 and s.middle.item() == 1  # type: ignore[union-attr]


def test_too_many_residuals_is_an_error() -> None:
    model = _model()
    x, t, ctx = _inputs()
    with pytest.raises(ValueError, match="input blocks"):
        model(x, t, ctx, control=Residuals(skips=[None] * (len(model.input_blocks) + 1)))
