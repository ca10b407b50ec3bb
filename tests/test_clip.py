"""CLIP text encoders: parity with transformers, OpenCLIP key maps and math, meta loading, low precision."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sumie.checkpoints.keymaps.clip import (
    add_text_model_prefix,
    hf_to_openclip,
    infer_text_config,
    openclip_to_hf,
)
from sumie.configs import CLIP_G, CLIP_H, CLIP_L, TextEncoderConfig
from sumie.errors import CheckpointError, ConfigError
from sumie.models.clip import CLIPTextModel

if TYPE_CHECKING:
    from transformers import CLIPTextConfig

BOS, EOS = 49406, 49407

# Tiny stand-ins for the real encoders: real vocabulary and 77 positions so real token ids work.
TINY_L = replace(CLIP_L, width=64, layers=4, heads=2, intermediate=128)
TINY_G = replace(CLIP_G, width=64, layers=4, heads=2, intermediate=160, projection_dim=48)


def _close(actual: Tensor, expected: Tensor, rel: float = 1e-4) -> float:
    """Assert max |actual - expected| <= rel * max(1, max |expected|); return the max difference."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual.float() - expected.float()).abs().max().item()
    bound = rel * max(1.0, expected.float().abs().max().item())
    assert diff <= bound, f"max diff {diff:.3g} > {bound:.3g}"
    return diff


def _tokens(seed: int = 0) -> Tensor:
    """[4, 77] prompts: BOS + ids + EOS, padded with EOS (SD1/clip_l style) or 0 (OpenCLIP style)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, pad in ((5, EOS), (12, 0), (75, EOS), (0, 0)):
        ids = torch.randint(1, BOS, (n,), generator=g).tolist()
        row = [BOS, *ids, EOS]
        rows.append(row + [pad] * (77 - len(row)))
    return torch.tensor(rows)


def _randomize(module: nn.Module, seed: int) -> None:
    """Overwrite every parameter with random values (LayerNorm gains around 1) so no key mapping hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def _hf_config(cfg: TextEncoderConfig, eos_token_id: int = EOS) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.activation,
        projection_dim=cfg.projection_dim or cfg.width,
        layer_norm_eps=1e-5,
        bos_token_id=BOS,
        eos_token_id=eos_token_id,
    )


def _reference(cfg: TextEncoderConfig, eos_token_id: int = EOS, seed: int = 0) -> nn.Module:
    """transformers CLIPTextModel (no projection) or CLIPTextModelWithProjection, random weights."""
    from transformers import CLIPTextModel as HFTextModel
    from transformers import CLIPTextModelWithProjection

    cls = HFTextModel if cfg.projection_dim is None else CLIPTextModelWithProjection
    ref = cls(_hf_config(cfg, eos_token_id)).eval()
    _randomize(ref, seed)
    return ref


def _ours_from(ref: nn.Module, cfg: TextEncoderConfig) -> CLIPTextModel:
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    # transformers >= 5 drops the "text_model." level from CLIPTextModel (not from ...WithProjection).
    model.load_state_dict(add_text_model_prefix(ref.state_dict()), strict=True, assign=True)
    return model.eval()


def _ref_run(ref: nn.Module, tokens: Tensor) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
    """(hidden states without the embeddings, last_hidden_state, pooled or text_embeds)."""
    out = ref(input_ids=tokens, output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return out.hidden_states[1:], out.last_hidden_state, pooled


@pytest.mark.parametrize("cfg", [TINY_L, TINY_G], ids=["openai_l_quick_gelu", "openclip_g_gelu_proj"])
@torch.no_grad()
def test_parity_with_transformers(cfg: TextEncoderConfig) -> None:
    ref = _reference(cfg)
    ours = _ours_from(ref, cfg)
    tokens = _tokens()
    hs, last, pooled_ref = _ref_run(ref, tokens)
    assert len(hs) == cfg.layers
    norm = ours.text_model.final_layer_norm

    hidden, pooled = ours(tokens, layer=-1, final_norm=True)
    _close(hidden, last)
    _close(pooled, pooled_ref)
    assert pooled.shape == (4, cfg.projection_dim or cfg.width)

    for layer in (-2, -3):
        _close(ours(tokens, layer=layer, final_norm=False)[0], hs[layer])
        _close(ours(tokens, layer=layer, final_norm=True)[0], norm(hs[layer]))
        # The pooled output never depends on the selected layer.
        assert torch.equal(ours(tokens, layer=layer, final_norm=False)[1], pooled)

    # Skipping the trailing layers gives the same hidden states and no pooled output.
    skipped, none = ours(tokens, layer=-2, final_norm=False, need_pooled=False)
    assert none is None
    assert torch.equal(skipped, ours(tokens, layer=-2, final_norm=False)[0])

    # Positive indices count from the first layer; None takes the config's values.
    assert torch.equal(ours(tokens, layer=cfg.layers - 2)[0], ours(tokens, layer=-2)[0])
    expected = hs[cfg.layer] if not cfg.final_norm else norm(hs[cfg.layer])
    _close(ours(tokens)[0], expected)


@torch.no_grad()
def test_layer_out_of_range() -> None:
    with torch.device("meta"):
        model = CLIPTextModel(TINY_L)
    for layer in (4, -5):
        with pytest.raises(ConfigError, match="layer"):
            model(torch.zeros(1, 77, dtype=torch.long, device="meta"), layer=layer)


@pytest.mark.parametrize("eos_token_id", [EOS, 2], ids=["eos_49407", "legacy_eos_2"])
@torch.no_grad()
def test_pooled_eos_selection_matches_both_transformers_modes(eos_token_id: int) -> None:
    """transformers picks the first ``eos_token_id`` (or the argmax when the config says eos=2, as the
    openai/clip-vit-large-patch14 config does); both agree with our argmax for EOS- and 0-padded prompts."""
    ref = _reference(TINY_L, eos_token_id=eos_token_id, seed=1)
    ours = _ours_from(ref, TINY_L)
    tokens = _tokens(seed=1)
    _close(ours(tokens)[1], ref(input_ids=tokens).pooler_output)


@torch.no_grad()
def test_pooled_without_eos_differs_from_transformers_eos_mode() -> None:
    """Documented discrepancy: a row with no EOS (e.g. cut by hand). transformers with eos_token_id=49407 then
    pools position 0; OpenAI, OpenCLIP, transformers with eos_token_id=2, and Sumie pool the largest id."""
    tokens = torch.randint(1, 1000, (1, 77), generator=torch.Generator().manual_seed(2))
    tokens[0, 30] = 5000
    for eos_token_id, position in ((EOS, 0), (2, 30)):
        ref = _reference(TINY_L, eos_token_id=eos_token_id, seed=2)
        ours = _ours_from(ref, TINY_L)
        normed = ours(tokens, layer=-1, final_norm=True)[0]
        _close(ref(input_ids=tokens).pooler_output, normed[:, position])
        _close(ours(tokens)[1], normed[:, 30])
    assert not torch.allclose(normed[:, 0], normed[:, 30])


# ---------------------------------------------------------------------------------------------- OpenCLIP


def _random_openclip_sd(cfg: TextEncoderConfig, seed: int = 0) -> dict[str, Tensor]:
    """A random OpenCLIP-layout text tower with the extra keys SD checkpoints carry."""
    g = torch.Generator().manual_seed(seed)
    w, n = cfg.width, cfg.layers

    def r(*shape: int, scale: float = 0.08, mean: float = 0.0) -> Tensor:
        return mean + scale * torch.randn(shape, generator=g)

    sd = {
        "token_embedding.weight": r(cfg.vocab_size, w, scale=0.5),
        "positional_embedding": r(cfg.max_positions, w, scale=0.5),
        "ln_final.weight": r(w, scale=0.2, mean=1.0),
        "ln_final.bias": r(w),
        "text_projection": r(w, cfg.projection_dim or w),
        "logit_scale": torch.tensor(4.6052),
        "attn_mask": torch.full((cfg.max_positions, cfg.max_positions), float("-inf")).triu(1),
        "visual.proj": r(8, 4),
    }
    for i in range(n):
        p = f"transformer.resblocks.{i}."
        sd |= {
            p + "ln_1.weight": r(w, scale=0.2, mean=1.0),
            p + "ln_1.bias": r(w),
            p + "attn.in_proj_weight": r(3 * w, w),
            p + "attn.in_proj_bias": r(3 * w),
            p + "attn.out_proj.weight": r(w, w),
            p + "attn.out_proj.bias": r(w),
            p + "ln_2.weight": r(w, scale=0.2, mean=1.0),
            p + "ln_2.bias": r(w),
            p + "mlp.c_fc.weight": r(cfg.intermediate, w),
            p + "mlp.c_fc.bias": r(cfg.intermediate),
            p + "mlp.c_proj.weight": r(w, cfg.intermediate),
            p + "mlp.c_proj.bias": r(w),
        }
    return sd


def _openclip_forward(
    sd: dict[str, Tensor], heads: int, tokens: Tensor
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Direct OpenCLIP ``encode_text`` (sequence-first nn.MultiheadAttention with a -inf upper mask, GELU MLP,
    ln_final, x[arange, argmax] @ text_projection): (per-layer outputs, ln_final applied to all, pooled)."""
    w = sd["token_embedding.weight"].shape[1]
    n = sum(1 for k in sd if k.endswith("attn.in_proj_weight"))
    t = tokens.shape[1]
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][:t]
    x = x.permute(1, 0, 2)  # NLD -> LND, as OpenCLIP's default (batch_first=False) transformer
    mask = torch.full((t, t), float("-inf")).triu(1)
    outputs = []
    for i in range(n):
        p = f"transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(w, heads)
        attn.load_state_dict(
            {
                "in_proj_weight": sd[p + "attn.in_proj_weight"],
                "in_proj_bias": sd[p + "attn.in_proj_bias"],
                "out_proj.weight": sd[p + "attn.out_proj.weight"],
                "out_proj.bias": sd[p + "attn.out_proj.bias"],
            }
        )
        h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        outputs.append(x.permute(1, 0, 2))
    final = F.layer_norm(outputs[-1], (w,), sd["ln_final.weight"], sd["ln_final.bias"])
    pooled = final[torch.arange(final.shape[0]), tokens.argmax(dim=-1)] @ sd["text_projection"]
    return outputs, final, pooled


def test_openclip_round_trip_exact() -> None:
    sd = _random_openclip_sd(TINY_G)
    hf, ignored = openclip_to_hf(sd)
    assert sorted(ignored) == ["attn_mask", "logit_scale", "visual.proj"]
    assert hf["text_projection.weight"].shape == (TINY_G.projection_dim, TINY_G.width)
    with torch.device("meta"):
        expected_keys = set(CLIPTextModel(TINY_G).state_dict())
    assert set(hf) == expected_keys
    back = hf_to_openclip(hf)
    kept = {k: v for k, v in sd.items() if k not in ignored}
    assert set(back) == set(kept)
    for k, v in kept.items():
        assert torch.equal(back[k], v), k
    assert all(v.is_contiguous() for v in back.values())


@torch.no_grad()
def test_openclip_math_matches() -> None:
    """SD2 / SDXL-G usage: penultimate layer with or without ln_final; pooled from the last layer."""
    sd = _random_openclip_sd(TINY_G, seed=3)
    hf, _ = openclip_to_hf(sd)
    with torch.device("meta"):
        ours = CLIPTextModel(TINY_G)
    ours.load_state_dict(hf, strict=True, assign=True)
    tokens = _tokens(seed=3)
    outputs, final, pooled_ref = _openclip_forward(sd, TINY_G.heads, tokens)
    norm = ours.text_model.final_layer_norm

    hidden, pooled = ours(tokens, layer=-1, final_norm=True)
    _close(hidden, final)
    _close(pooled, pooled_ref)
    _close(ours(tokens, layer=-2, final_norm=False)[0], outputs[-2])  # SDXL bigG
    _close(ours(tokens, layer=-2, final_norm=True)[0], norm(outputs[-2]))  # SD2 ViT-H
    _close(ours(tokens, layer=0, final_norm=False)[0], outputs[0])


def test_openclip_unknown_key_raises() -> None:
    sd = _random_openclip_sd(replace(TINY_G, layers=1))
    for bad in ("transformer.resblocks.0.ls_1.gamma", "token_embedding.bias", "text.foo", "ln_final.gamma"):
        with pytest.raises(CheckpointError, match=bad.replace(".", r"\.")):
            openclip_to_hf({**sd, bad: torch.zeros(1)})
    with pytest.raises(CheckpointError, match="mlp.bogus"):
        hf_to_openclip({"text_model.encoder.layers.0.mlp.bogus.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------------ config inference


@pytest.mark.parametrize("cfg", [CLIP_L, CLIP_H, CLIP_G, TINY_L, TINY_G], ids=lambda c: f"{c.name}_{c.width}")
def test_infer_text_config(cfg: TextEncoderConfig) -> None:
    with torch.device("meta"):
        sd = CLIPTextModel(cfg).state_dict()
    # Heads are always width // 64 (true for every SD encoder; the tiny configs use other head counts).
    assert infer_text_config(sd, cfg.name, base=cfg) == replace(cfg, heads=cfg.width // 64)
    inferred = infer_text_config(sd, cfg.name)
    for field in ("width", "layers", "intermediate", "projection_dim", "vocab_size", "max_positions"):
        assert getattr(inferred, field) == getattr(cfg, field)
    assert inferred.heads == cfg.width // 64


def test_infer_text_config_real_encoders_and_errors() -> None:
    with torch.device("meta"):
        sd = CLIPTextModel(CLIP_H).state_dict()
    assert infer_text_config(sd, "clip_h") == CLIP_H  # SD2: all 24 layers are kept
    sd = {k: v for k, v in sd.items() if ".layers.5." not in k}
    with pytest.raises(CheckpointError, match=r"\[5\]"):
        infer_text_config(sd, "clip_h")
    with pytest.raises(CheckpointError, match="unknown text encoder name"):
        infer_text_config(sd, "t5")
    with pytest.raises(CheckpointError, match="token_embedding"):
        infer_text_config({}, "clip_l")


# ------------------------------------------------------------------------------------ meta and dtypes


@torch.no_grad()
def test_meta_construction_has_no_buffers_and_loads_strictly() -> None:
    with torch.device("meta"):
        model = CLIPTextModel(TINY_G)
    assert list(model.buffers()) == []
    assert all(p.is_meta for p in model.parameters())
    sd = openclip_to_hf(_random_openclip_sd(TINY_G, seed=4))[0]
    model.load_state_dict(sd, strict=True, assign=True)
    assert not any(p.is_meta for p in model.parameters())
    hidden, pooled = model(_tokens())
    assert torch.isfinite(hidden).all() and torch.isfinite(pooled).all()
    with pytest.raises(RuntimeError, match="position_ids"):
        model.load_state_dict({**sd, "text_model.embeddings.position_ids": torch.arange(77)[None]})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cfg", [TINY_L, TINY_G], ids=["l", "g"])
@torch.no_grad()
def test_low_precision_close_to_fp32(cfg: TextEncoderConfig, dtype: torch.dtype) -> None:
    ref = _reference(cfg, seed=5)
    model = _ours_from(ref, cfg)
    tokens = _tokens(seed=5)
    hidden32, pooled32 = model(tokens, layer=-2, final_norm=False)
    model = model.to(dtype)
    hidden, pooled = model(tokens, layer=-2, final_norm=False)
    assert hidden.dtype == dtype and pooled.dtype == dtype
    assert torch.isfinite(hidden).all() and torch.isfinite(pooled).all()
    rel = 0.05 if dtype == torch.bfloat16 else 0.01
    _close(hidden, hidden32, rel=rel)
    _close(pooled, pooled32, rel=rel)


# ------------------------------------------------------------------------------------ full size (slow)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [CLIP_L, CLIP_G], ids=["clip_l_sd1", "clip_g_sdxl"])
@torch.no_grad()
def test_full_size_parity_with_transformers(cfg: TextEncoderConfig) -> None:
    """Real sizes, random weights; ours shares the reference's tensors (assign=True) to halve memory."""
    torch.manual_seed(0)
    ref = _reference(cfg, eos_token_id=2 if cfg.name == "clip_l" else EOS)
    ours = _ours_from(ref, cfg)
    tokens = _tokens(seed=6)[:2]
    hs, last, pooled_ref = _ref_run(ref, tokens)
    hidden, pooled = ours(tokens, layer=-1, final_norm=True)
    _close(hidden, last)
    _close(pooled, pooled_ref)
    _close(ours(tokens, layer=-2, final_norm=False)[0], hs[-2])
    _close(ours(tokens, layer=-2, final_norm=True)[0], ours.text_model.final_layer_norm(hs[-2]))
