"""ComfyUI's prompt parsing and chunking (``comfy/sd1_clip.py``: ``parse_parentheses``, ``token_weights``,
``escape_important``, ``SDTokenizer.tokenize_with_weights`` with ``max_word_length = 8``), where it differs from
A1111's: a ``(text:w)`` weight replaces the outer one, ``[ ]`` and ``BREAK`` are text, and words stay whole in a
chunk unless they are 8 tokens or longer."""

from __future__ import annotations

import pytest

from sumie.comfy.tokens import comfy_chunks, token_weights, tokenize_weighted
from sumie.prompts.parser import parse_prompt_attention
from sumie.prompts.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    """The CLIP tokenizer."""
    return CLIPTokenizer()


def test_token_weights() -> None:
    """Weights as ComfyUI parses them (and where A1111 differs)."""
    assert token_weights("a (b:1.5) c") == [("a ", 1.0), ("b", 1.5), (" c", 1.0)]
    assert token_weights("((x))") == [("x", 1.1 * 1.1)]
    assert token_weights("((x:1.5))") == [("x", 1.5)]  # set, not multiplied
    assert parse_prompt_attention("((x:1.5))")[0][1] == pytest.approx(1.65)  # A1111 multiplies
    assert token_weights("(x:abc)") == [("x:abc", 1.1)]
    assert token_weights("[x] BREAK y") == [("[x] BREAK y", 1.0)]
    assert token_weights("(open") == [("(open", 1.0)]


def test_escapes_and_words(tok: CLIPTokenizer) -> None:
    r"""``\(`` and ``\)`` are literal brackets at the outer weight; words are split at spaces and newlines."""
    words = tokenize_weighted("a \\(b\\) (c)\nd", tok)
    assert words == [[(t, 1.0) for t in tok.encode("a")], [(t, 1.0) for t in tok.encode("(b)")],
                     [(t, 1.1) for t in tok.encode("c")], [(t, 1.0) for t in tok.encode("d")]]


def test_chunks_keep_words_whole(tok: CLIPTokenizer) -> None:
    """A word that does not fit goes whole into the next chunk (the first is closed with EOS and padding); a word
    of 8+ tokens fills the chunk and continues; every chunk is 77 tokens, BOS first."""
    (cat,) = tok.encode("cat")
    word = "photosynthesised"
    pieces = tok.encode(word)
    assert 1 < len(pieces) < 8
    text = " ".join(["cat"] * (76 - len(pieces))) + " " + word  # one token too many for the first chunk
    first, second = comfy_chunks(text, tok)
    n = 76 - len(pieces)
    assert first.tokens == (tok.BOS, *[cat] * n, tok.EOS, *[tok.EOS] * (77 - n - 2))
    assert second.tokens[: len(pieces) + 2] == (tok.BOS, *pieces, tok.EOS)
    assert all(len(c.tokens) == 77 == len(c.multipliers) for c in (first, second))
    long_word = "-".join(["zq"] * 6)
    long_ids = tok.encode(long_word)
    assert len(long_ids) >= 8
    text = " ".join(["cat"] * 72) + " " + long_word
    first, second = comfy_chunks(text, tok)
    assert first.tokens == (tok.BOS, *[cat] * 72, *long_ids[:3], tok.EOS)
    assert second.tokens[1: len(long_ids) - 3 + 1] == tuple(long_ids[3:])
    (empty,) = comfy_chunks("", tok)
    assert empty.tokens == (tok.BOS, *[tok.EOS] * 76) and set(empty.multipliers) == {1.0}
    (weighted,) = comfy_chunks("a (cat:1.3)", tok)
    assert weighted.multipliers[:4] == (1.0, 1.0, 1.3, 1.0) and weighted.tokens[2] == cat
