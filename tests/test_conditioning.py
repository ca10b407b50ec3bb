"""A1111 text conditioning: chunking (commas, BREAK, embeddings), emphasis, clip skip, SD1/SD2/SDXL encoders.

Encoder outputs are checked against transformers' CLIP text models on random weights, following A1111's
``sd_hijack_clip`` path (``hidden_states[-n]`` + final norm for SD1 clip skip, penultimate un-normed states
for SDXL, pad 0 after EOS for OpenCLIP, bigG pooled output of the first chunk).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import Tensor, nn

from sumie.checkpoints.keymaps.clip import add_text_model_prefix
from sumie.configs import TINY, ModelConfig, TextEncoderConfig
from sumie.errors import CheckpointError, ConfigError
from sumie.models.clip import CLIPTextModel
from sumie.prompts.embeddings import Embedding, EmbeddingLibrary, load_embedding_file
from sumie.prompts.text_conditioning import (
    CHUNK_LENGTH,
    ConditioningOptions,
    TextConditioner,
    apply_emphasis,
    build_chunks,
    empty_chunk,
    encoder_layer,
    pad_conds,
    stack_contexts,
    tokenize_prompt,
)
from sumie.prompts.tokenizer import CLIPTokenizer

BOS, EOS, COMMA = 49406, 49407, 267
W = 1000  # an ordinary token id
TOK = CLIPTokenizer()


def _close(actual: Tensor, expected: Tensor, rel: float = 1e-4) -> float:
    """Assert max |actual - expected| <= rel * max(1, max |expected|); return the max difference."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual.float() - expected.float()).abs().max().item()
    bound = rel * max(1.0, expected.float().abs().max().item())
    assert diff <= bound, f"max diff {diff:.3g} > {bound:.3g}"
    return diff


def _body(chunk: object) -> list[int]:
    tokens = chunk.tokens  # type: ignore[attr-defined]
    assert len(tokens) == 77 and tokens[0] == BOS and tokens[-1] == EOS
    return list(tokens[1:-1])


# ------------------------------------------------------------------------------------------- chunking

def test_long_prompt_splits_at_75() -> None:
    chunks, count = build_chunks([([W] * 80, 1.0)], COMMA)
    assert len(chunks) == 2 and count == 80
    assert _body(chunks[0]) == [W] * 75
    assert _body(chunks[1]) == [W] * 5 + [EOS] * 70
    assert chunks[1].multipliers == (1.0,) * 77


def test_comma_backtrack_moves_the_words_after_the_last_comma() -> None:
    # 60 words, a comma, 20 words at weight 1.5: the chunk fills 14 words after the comma (75 - 61 = 14 <= 20)
    chunks, count = build_chunks([([W] * 60 + [COMMA], 1.0), ([W + 1] * 20, 1.5)], COMMA)
    assert len(chunks) == 2
    assert _body(chunks[0]) == [W] * 60 + [COMMA] + [EOS] * 14
    assert chunks[0].multipliers[1:62] == (1.0,) * 61 and chunks[0].multipliers[62:] == (1.0,) * 15
    assert _body(chunks[1]) == [W + 1] * 20 + [EOS] * 55
    assert chunks[1].multipliers[1:21] == (1.5,) * 20
    assert count == 75 + 20


def test_comma_too_far_back_or_backtrack_off() -> None:
    # the last comma is 25 tokens before the end of the chunk: more than 20, so no backtracking
    pieces = [([W] * 50 + [COMMA] + [W] * 30, 1.0)]
    chunks, count = build_chunks(pieces, COMMA)
    assert _body(chunks[0]) == [W] * 50 + [COMMA] + [W] * 24
    assert _body(chunks[1])[:7] == [W] * 6 + [EOS] and count == 81
    assert build_chunks(pieces, COMMA, comma_padding_backtrack=30)[0][0].tokens[52] == EOS  # 25 <= 30: cut
    off, _ = build_chunks([([W] * 60 + [COMMA] + [W] * 20, 1.0)], COMMA, comma_padding_backtrack=0)
    assert _body(off[0]) == [W] * 60 + [COMMA] + [W] * 14


def test_comma_backtrack_limit_is_inclusive() -> None:
    at_20, _ = build_chunks([([W] * 55 + [COMMA] + [W] * 25, 1.0)], COMMA)  # comma 20 slots before the end
    assert _body(at_20[0]) == [W] * 55 + [COMMA] + [EOS] * 19
    at_21, _ = build_chunks([([W] * 54 + [COMMA] + [W] * 25, 1.0)], COMMA)  # 21 slots: no move
    assert _body(at_21[0]) == [W] * 54 + [COMMA] + [W] * 20


def test_comma_arriving_on_a_full_chunk_starts_the_next_one() -> None:
    chunks, _ = build_chunks([([W] * 75 + [COMMA] + [W] * 3, 1.0)], COMMA)
    assert _body(chunks[0]) == [W] * 75
    assert _body(chunks[1])[:5] == [COMMA, W, W, W, EOS]


def test_break_pads_the_chunk() -> None:
    chunks, count = build_chunks([([W, W + 1], 1.0), (None, -1.0), ([W + 2], 1.2)], COMMA)
    assert [_body(c)[:3] for c in chunks] == [[W, W + 1, EOS], [W + 2, EOS, EOS]]
    assert chunks[1].multipliers[1] == 1.2 and count == 76
    lead, _ = build_chunks([(None, -1.0), ([W], 1.0)], COMMA)
    assert len(lead) == 2 and _body(lead[0]) == [EOS] * 75
    trail, _ = build_chunks([([W], 1.0), (None, -1.0)], COMMA)
    assert len(trail) == 1  # a trailing BREAK adds no empty chunk


def test_empty_prompt_is_one_empty_chunk() -> None:
    chunks, count = build_chunks([([], 1.0)], COMMA)
    assert len(chunks) == 1 and count == 0
    assert chunks[0].tokens == empty_chunk().tokens == (BOS,) + (EOS,) * 76


def test_tokenize_prompt_weights_and_break() -> None:
    chunks, count = tokenize_prompt("a (red:1.5) [cat] BREAK dog", TOK)
    a, red, cat, dog = (TOK.encode(w)[0] for w in ("a", "red", "cat", "dog"))
    assert len(chunks) == 2 and count == 75 + 1
    assert _body(chunks[0])[:4] == [a, red, cat, EOS]
    assert chunks[0].multipliers[1:4] == (1.0, 1.5, 1 / 1.1)
    assert _body(chunks[1])[:2] == [dog, EOS]
    # "None": brackets are text, BREAK is a word; "Ignore": parsed, weights kept in the chunk but unused
    raw, _ = tokenize_prompt("(red) BREAK", TOK, emphasis="None")
    assert len(raw) == 1 and _body(raw[0])[:4] == TOK.encode("(red) BREAK")[:4]
    assert set(raw[0].multipliers) == {1.0}


# --------------------------------------------------------------------------------------- embeddings

def _library(config: ModelConfig, **vectors: Tensor) -> EmbeddingLibrary:
    lib = EmbeddingLibrary(config, TOK)
    for name, vec in vectors.items():
        lib.add(Embedding(name, {"*": vec}))
    return lib


def test_embedding_slots_and_chunk_boundary() -> None:
    lib = _library(TINY["sd1"], myemb=torch.randn(3, 64))
    name = TOK.encode("myemb")
    assert len(name) >= 1
    chunks, _ = build_chunks([([W] * 10 + name + [W + 1], 1.3)], COMMA, lib)
    assert _body(chunks[0])[:15] == [W] * 10 + [0, 0, 0, W + 1, EOS]
    assert chunks[0].multipliers[11:14] == (1.3,) * 3
    assert [(off, e.name) for off, e in chunks[0].fixes] == [(10, "myemb")]
    # 73 tokens + 3 vectors do not fit in 75: the embedding opens the next chunk
    chunks, _ = build_chunks([([W] * 73 + name + [W + 1], 1.0)], COMMA, lib)
    assert _body(chunks[0]) == [W] * 73 + [EOS, EOS] and chunks[0].fixes == ()
    assert _body(chunks[1])[:5] == [0, 0, 0, W + 1, EOS]
    assert [off for off, _ in chunks[1].fixes] == [0]


def test_embedding_fixes_stay_behind_when_commas_move_tokens() -> None:
    # A1111 quirk kept on purpose: comma backtracking moves the slot tokens but not the fix
    lib = _library(TINY["sd1"], myemb=torch.randn(2, 64))
    name = TOK.encode("myemb")
    chunks, _ = build_chunks([([W] * 60 + [COMMA] + [W] * 5 + name + [W] * 20, 1.0)], COMMA, lib)
    assert [off for off, _ in chunks[0].fixes] == [66]
    assert _body(chunks[1])[5:7] == [0, 0] and chunks[1].fixes == ()


def test_longest_matching_name_wins() -> None:
    lib = _library(TINY["sd1"], cat=torch.randn(1, 64), **{"cat-girl": torch.randn(2, 64)})
    chunks, _ = tokenize_prompt("a cat-girl and a cat", TOK, lib)
    assert [(off, e.name) for off, e in chunks[0].fixes] == [(1, "cat-girl"), (5, "cat")]


def _save_pt(path: Path, vec: Tensor) -> None:
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": path.stem, "step": 100,
            "sd_checkpoint": None, "sd_checkpoint_name": None}
    torch.save(data, path)


class _NotAllowed:
    def __init__(self) -> None:
        self.x = 1


def test_embedding_files(tmp_path: Path) -> None:
    _save_pt(tmp_path / "pt_emb.pt", torch.randn(2, 64))
    _save_pt(tmp_path / "param_emb.pt", nn.Parameter(torch.randn(1, 64)))
    save_file({"emb_params": torch.randn(4, 64)}, str(tmp_path / "st_emb.safetensors"))
    torch.save({"<concept>": torch.randn(64)}, tmp_path / "learned_embeds.bin")
    save_file({"clip_l": torch.randn(2, 64), "clip_g": torch.randn(2, 64)}, str(tmp_path / "xl_emb.safetensors"))
    _save_pt(tmp_path / "wide.pt", torch.randn(2, 768))
    torch.save({"string_to_param": {"*": torch.randn(1, 64), "#": torch.randn(1, 64)}}, tmp_path / "two.pt")
    torch.save({"string_to_param": {"*": _NotAllowed()}}, tmp_path / "evil.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an embedding")

    lib = EmbeddingLibrary.from_folder(tmp_path, TINY["sd1"], TOK)
    assert sorted(lib) == ["learned_embeds", "param_emb", "pt_emb", "st_emb"]
    assert lib.embeddings["pt_emb"].num_vectors == 2 and lib.embeddings["pt_emb"].step == 100
    assert lib.embeddings["learned_embeds"].num_vectors == 1
    assert set(lib.skipped) == {"xl_emb", "wide", "two", "evil"}
    assert "768" in lib.skipped["wide"] and "2 terms" in lib.skipped["two"]
    assert "refused" in lib.skipped["evil"]

    xl = EmbeddingLibrary.from_folder(tmp_path, TINY["sdxl"], TOK)
    assert sorted(xl) == ["xl_emb"]  # 64 + 64 wide; single-tensor files do not fit a two-encoder model
    with pytest.raises(ConfigError, match="another model family"):
        EmbeddingLibrary(TINY["sd1"], TOK).load_file(tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_embedding_file(tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="no vectors for text encoder"):
        Embedding("x", {"clip_l": torch.randn(1, 64), "other": torch.randn(1, 64)}).check(TINY["sdxl"])
    with pytest.raises(ConfigError, match="at most 75"):
        Embedding("x", {"*": torch.randn(76, 64)}).check(TINY["sd1"])


# -------------------------------------------------------------------------------------------- emphasis

def test_emphasis_math() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 77, 8, generator=g) + 0.3
    w = 1 + 0.5 * torch.rand(2, 77, generator=g)
    scaled = z * w[..., None]
    expected = scaled * (z.mean() / scaled.mean())  # mean over the whole batch, as A1111
    print("emphasis Original max diff", _close(apply_emphasis(z, w, "Original"), expected, 1e-6))
    assert torch.equal(apply_emphasis(z, w, "No norm"), scaled)
    assert torch.equal(apply_emphasis(z, w, "None"), z) and torch.equal(apply_emphasis(z, w, "Ignore"), z)
    assert torch.equal(apply_emphasis(z, torch.ones(2, 77), "Original"), z)  # all-1 weights change nothing
    # hidden states with an exactly zero mean (a final LayerNorm still at its init: weight 1, bias 0): nothing to
    # restore; A1111's 0 / 0 made the conditioning NaN (the NaN image of a 2-step trained model, test_training)
    z0 = torch.tensor([1.5, -1.5]).repeat(2, 77, 4)  # [2, 77, 8]: every partial sum is a multiple of 1.5, the mean 0
    assert z0.mean() == 0
    assert torch.equal(apply_emphasis(z0, torch.ones(2, 77), "Original"), z0)
    # half precision: the mean of the fp16 states, the product promoted to float32 (A1111's type promotion)
    zh = z.half()
    out = apply_emphasis(zh, w, "Original")
    prod = zh.float() * w[..., None]
    assert out.dtype == torch.float32
    assert torch.equal(out, prod * (zh.mean().float() / prod.mean()))
    with pytest.raises(ConfigError):
        apply_emphasis(z, w, "Loud")


def test_options_validation_and_clip_skip_layers() -> None:
    with pytest.raises(ConfigError):
        ConditioningOptions(emphasis="loud")
    with pytest.raises(ConfigError):
        ConditioningOptions(clip_skip=0)
    sd1_l, = TINY["sd1"].text_encoders
    xl_l, xl_g = TINY["sdxl"].text_encoders
    sd2_h, = TINY["sd2"].text_encoders
    skip2 = ConditioningOptions(clip_skip=2)
    assert encoder_layer(sd1_l, ConditioningOptions()) == (-1, True)
    assert encoder_layer(sd1_l, skip2) == (-2, True)
    assert encoder_layer(sd2_h, skip2) == (-2, True)  # OpenCLIP: clip skip is ignored
    assert encoder_layer(xl_l, skip2) == (-2, False) and encoder_layer(xl_g, skip2) == (-2, False)
    assert encoder_layer(xl_l, ConditioningOptions(sdxl_clip_l_skip=True)) == (-1, False)
    assert encoder_layer(xl_l, ConditioningOptions(clip_skip=2, sdxl_clip_l_skip=True)) == (-2, False)


# ---------------------------------------------------------------------------- encoders vs transformers

def _randomize(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embedding" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g) + 0.01)


def _pair(cfg: TextEncoderConfig, seed: int) -> tuple[nn.Module, CLIPTextModel]:
    """(transformers reference, Sumie model) with the same random weights."""
    import transformers  # test oracle (dev extra): missing is an error, never a skip
    hf_cfg = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.activation, projection_dim=cfg.projection_dim or cfg.width, layer_norm_eps=1e-5,
        bos_token_id=BOS, eos_token_id=EOS,
    )
    cls = transformers.CLIPTextModel if cfg.projection_dim is None else transformers.CLIPTextModelWithProjection
    ref = cls(hf_cfg).eval()
    _randomize(ref, seed)
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict(add_text_model_prefix(ref.state_dict()), strict=True)
    return ref, ours


def _ids(chunk: object, pad: int) -> Tensor:
    row = list(chunk.tokens)  # type: ignore[attr-defined]
    if pad != EOS:
        k = row.index(EOS)
        row[k + 1 :] = [pad] * (76 - k)
    return torch.tensor([row])


def _ref_hidden(ref: nn.Module, ids: Tensor, layer: int, norm: bool) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        h = out.hidden_states[layer]
        if norm:  # transformers 5 flattens CLIPTextModel (no .text_model); ...WithProjection keeps it
            h = getattr(ref, "text_model", ref).final_layer_norm(h)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return h, pooled


def _emphasized(h: Tensor, chunk: object) -> Tensor:
    w = torch.tensor([chunk.multipliers])  # type: ignore[attr-defined]
    z = h * w[..., None]
    return z * (h.mean() / z.mean())


LONG = "a photo of a (red:1.3) cat, [sitting] on a ((wooden)) chair, " * 6 + "BREAK (sky:0.8)"


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd1_matches_a1111_path(clip_skip: int) -> None:
    cfg = TINY["sd1"]
    ref, ours = _pair(cfg.text_encoders[0], seed=1)
    cond = TextConditioner(cfg, [ours], options=ConditioningOptions(clip_skip=clip_skip), tokenizer=TOK)
    out = cond([LONG])
    chunks, _ = cond.tokenize(LONG)
    assert len(chunks) == 3 and out.pooled is None
    assert chunks[0].tokens[-2] == EOS  # the comma backtracking left padding at the end of chunk 0
    expected = torch.cat([_emphasized(_ref_hidden(ref, _ids(c, EOS), -clip_skip, True)[0], c) for c in chunks], 1)
    print(f"sd1 clip skip {clip_skip} max diff", _close(out.context, expected))


def test_sd2_pads_with_zero_and_ignores_clip_skip() -> None:
    cfg = TINY["sd2"]
    ref, ours = _pair(cfg.text_encoders[0], seed=2)
    chunks, _ = TextConditioner(cfg, [ours], tokenizer=TOK).tokenize("a (cat:1.2) on a mat")
    expected = _emphasized(_ref_hidden(ref, _ids(chunks[0], 0), -2, True)[0], chunks[0])
    for skip in (1, 3):
        out = TextConditioner(cfg, [ours], options=ConditioningOptions(clip_skip=skip), tokenizer=TOK)(
            ["a (cat:1.2) on a mat"]
        )
        print("sd2 max diff", _close(out.context, expected))


def test_sdxl_matches_a1111_path() -> None:
    cfg = TINY["sdxl"]
    ref_l, l_enc = _pair(cfg.text_encoders[0], seed=3)
    ref_g, g_enc = _pair(cfg.text_encoders[1], seed=4)
    cond = TextConditioner(cfg, [l_enc, g_enc], tokenizer=TOK)
    prompts = [LONG, "a (dog:0.7)"]
    out = cond(prompts)
    per_prompt = [cond.tokenize(p)[0] for p in prompts]
    assert out.context.shape == (2, 77 * 3, 128) and out.pooled is not None and out.pooled.shape == (2, 64)
    for k in range(3):
        batch = [c[k] if k < len(c) else empty_chunk() for c in per_prompt]
        hl = torch.cat([_ref_hidden(ref_l, _ids(c, EOS), -2, False)[0] for c in batch])
        hg = torch.cat([_ref_hidden(ref_g, _ids(c, 0), -2, False)[0] for c in batch])
        w = torch.tensor([c.multipliers for c in batch])[..., None]
        zl, zg = hl * w, hg * w
        zl, zg = zl * (hl.mean() / zl.mean()), zg * (hg.mean() / zg.mean())  # each encoder on its own
        got = out.context[:, 77 * k : 77 * (k + 1)]
        print(f"sdxl chunk {k} max diff", _close(got, torch.cat([zl, zg], dim=-1)))
    pooled = torch.cat([_ref_hidden(ref_g, _ids(c[0], 0), -2, False)[1] for c in per_prompt])
    print("sdxl pooled (first chunk) max diff", _close(out.pooled, pooled))

    neg = cond([""], is_negative=True)  # A1111 zeroes an empty SDXL negative prompt
    assert neg.context.shape == (1, 77, 128) and not neg.context.any() and not neg.pooled.any()
    assert cond([""]).context.any()
    skip = TextConditioner(cfg, [l_enc, g_enc], options=ConditioningOptions(clip_skip=2), tokenizer=TOK)
    assert torch.equal(skip(prompts).context, out.context)  # without sdxl_clip_l_skip, clip skip does nothing


def test_embeddings_replace_token_vectors() -> None:
    # an embedding made of the token vectors of "red dog" must condition exactly like the words
    cfg = TINY["sdxl"]
    _, l_enc = _pair(cfg.text_encoders[0], seed=5)
    _, g_enc = _pair(cfg.text_encoders[1], seed=6)
    ids = TOK.encode("red dog")
    rows = {name: enc.text_model.embeddings.token_embedding.weight[ids].detach().clone()
            for name, enc in (("clip_l", l_enc), ("clip_g", g_enc))}
    lib = EmbeddingLibrary(cfg, TOK)
    lib.add(Embedding("redog", rows))
    cond = TextConditioner(cfg, [l_enc, g_enc], embeddings=lib)
    a = cond(["a (redog:1.2), grass"])
    b = cond(["a (red dog:1.2), grass"])
    print("embedding vs words max diff", _close(a.context, b.context, 1e-6))
    assert a.pooled is not None and b.pooled is not None
    print("embedding vs words pooled max diff", _close(a.pooled, b.pooled, 1e-6))
    assert not torch.allclose(a.context, cond(["a (blue cat:1.2), grass"]).context)


def test_ignore_mode_equals_unbracketed_text() -> None:
    cfg = TINY["sd1"]
    _, enc = _pair(cfg.text_encoders[0], seed=7)
    ignore = TextConditioner(cfg, [enc], options=ConditioningOptions(emphasis="Ignore"), tokenizer=TOK)
    plain = TextConditioner(cfg, [enc], tokenizer=TOK)
    assert torch.equal(ignore(["a (cat:1.5) [dog]"]).context, plain(["a cat dog"]).context)
    none = TextConditioner(cfg, [enc], options=ConditioningOptions(emphasis="None"), tokenizer=TOK)
    assert not torch.equal(none(["a (cat)"]).context, plain(["a cat"]).context)


def test_loaded_checkpoint_shapes(tmp_path: Path) -> None:
    from sumie.checkpoints.loader import load_models
    from sumie.checkpoints.save import random_single_file

    path = tmp_path / "tiny_sdxl.safetensors"
    save_file(random_single_file(TINY["sdxl"]), str(path))
    models = load_models(path)
    cond = TextConditioner(models.config, models.text_encoders, tokenizer=TOK)
    out = cond(["a cat", "a long prompt, " * 30])
    assert out.context.shape == (2, 154, 128) and out.pooled is not None and out.pooled.shape == (2, 64)
    refiner_cfg = TINY["sdxl_refiner"]
    _, g_enc = _pair(refiner_cfg.text_encoders[0], seed=8)
    r = TextConditioner(refiner_cfg, [g_enc], tokenizer=TOK)(["a cat"])
    assert r.context.shape == (1, 77, 64) and r.pooled is not None and r.pooled.shape == (1, 64)
    with pytest.raises(ConfigError):
        TextConditioner(TINY["sdxl"], [g_enc])


# ---------------------------------------------------------------------------------- padding helpers

def test_pad_conds() -> None:
    g = torch.Generator().manual_seed(0)
    empty = torch.randn(1, 77, 4, generator=g)
    cond = torch.randn(2, 231, 4, generator=g)
    uncond = torch.randn(2, 77, 4, generator=g)
    c, u = pad_conds(cond, uncond, empty)
    assert c is cond and u.shape == (2, 231, 4)
    assert torch.equal(u[:, :77], uncond)
    assert torch.equal(u[1, 77:154], empty[0]) and torch.equal(u[0, 154:], empty[0])
    u2, c2 = pad_conds(uncond, cond, empty)
    assert u2.shape == (2, 231, 4) and c2 is cond

    s = stack_contexts([torch.ones(77, 4), 2 * torch.ones(154, 4)])
    assert s.shape == (2, 154, 4) and torch.equal(s[0, 100], torch.ones(4))


# ------------------------------------------------------------------------------------------- totality

_SD1_ENCODER: list[TextConditioner] = []


def _sd1_conditioner() -> TextConditioner:
    if not _SD1_ENCODER:
        enc = CLIPTextModel(TINY["sd1"].text_encoders[0]).eval()
        _randomize(enc, 9)
        lib = _library(TINY["sd1"], cat=torch.randn(2, 64), **{"x-y": torch.randn(74, 64)})
        _SD1_ENCODER.append(TextConditioner(TINY["sd1"], [enc], embeddings=lib))
    return _SD1_ENCODER[0]


PROMPTISH = st.lists(
    st.sampled_from(["a", "cat", "x-y", ",", " ", "(", ")", "[", "]", ":", "1.5", "|", "\\", "BREAK", "AND", "\u00e9"]),
    max_size=120,
).map("".join)


@settings(max_examples=25, deadline=None)
@given(st.one_of(st.text(max_size=200), PROMPTISH))
def test_no_string_crashes_the_encoder(text: str) -> None:
    cond = _sd1_conditioner()
    chunks, count = cond.tokenize(text)
    assert all(len(c.tokens) == 77 and len(c.multipliers) == 77 for c in chunks)
    assert count <= CHUNK_LENGTH * len(chunks)
    out = cond([text])
    assert out.context.shape == (1, 77 * len(chunks), 64) and out.context.dtype == torch.float32
