"""CLIP BPE tokenizer parity with transformers' CLIPTokenizer (built from local vocab/merges files only).

transformers 5.x only ships the tokenizers-backed CLIPTokenizer, whose normaliser is NFC + whitespace + per-char
lowercase and skips ftfy. The python CLIPTokenizer of transformers 4.x (used by A1111, ComfyUI and diffusers) ran
``ftfy.fix_text`` and Python's ``str.lower`` (which, unlike per-char lowercasing, turns a word-final Greek sigma
into "ς"), so the reference here is ``reference(ftfy.fix_text(text).lower())``. On text where both are no-ops
the two are compared directly too.
"""

from __future__ import annotations

import gzip
import html
import json
import random
from importlib import resources
from pathlib import Path

import ftfy
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sumie.prompts.tokenizer import CLIPTokenizer, normalize

N_PROMPTS = 2000


def _write_reference_files(directory: Path) -> None:
    """vocab.json + merges.txt from the packaged gz, following OpenAI's ``simple_tokenizer`` recipe."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in keep}
    extra = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(extra)})
    byte_chars = list(chars.values())  # order: kept bytes first, then the remapped ones
    raw = resources.files("sumie").joinpath("data", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408 and len(set(tokens)) == 49408
    vocab = {t: i for i, t in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Every transformers CLIPTokenizer variant available (5.x: the fast one, via two constructors)."""
    import transformers  # test oracle (dev extra): missing is an error, never a skip
    directory = tmp_path_factory.mktemp("clip_vocab")
    _write_reference_files(directory)
    found: dict[str, object] = {
        "from_pretrained": transformers.CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
    }
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(m.split(" ")) for m in (directory / "merges.txt").read_text("utf-8").split("\n")[1:] if m]
    found["vocab+merges"] = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    slow = getattr(transformers, "CLIPTokenizerSlow", None)  # absent in 5.x; 4.x's CLIPTokenizer is slow
    if slow is not None:
        found["slow"] = slow(vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt"))
    for name, tok in found.items():
        assert len(tok) == 49408, f"{name}: reference did not load the vocab"
        assert tok.bos_token_id == CLIPTokenizer.BOS and tok.eos_token_id == CLIPTokenizer.EOS, name
    return found


def _slow_normalize(tok: object, text: str) -> str:
    """What transformers 4.x's python CLIPTokenizer did in Python before the shared steps (4.x: nothing to do)."""
    return text if getattr(tok, "fix_text", None) else ftfy.fix_text(text).lower()


def _ref_ids(tok: object, text: str) -> list[int]:
    """Reference ids without special tokens."""
    fixed = _slow_normalize(tok, text)
    return tok(fixed, add_special_tokens=False)["input_ids"]


def _ref_padded(tok: object, texts: list[str], pad_token: str) -> torch.Tensor:
    """Reference ``[BOS] + ids[:75] + [EOS] + pads`` rows of length 77 (diffusers' tokenizer call)."""
    old = tok.pad_token
    tok.pad_token = pad_token
    try:
        fixed = [_slow_normalize(tok, t) for t in texts]
        return torch.tensor(tok(fixed, padding="max_length", max_length=77, truncation=True)["input_ids"])
    finally:
        tok.pad_token = old


# ---------------------------------------------------------------------------------------------- prompt pools
SUBJECTS = [
    "a photo of a cat", "portrait of a woman", "1girl, solo, long hair", "cyberpunk city at night",
    "an astronaut riding a horse on mars", "still life with fruit", "Mount Fuji, sunrise", "dragon",
    "oil painting of a lighthouse", "Greg Rutkowski", "a corgi wearing sunglasses", "the Eiffel Tower",
]
SD_SYNTAX = [
    "(masterpiece:1.2)", "best quality", "[cat|dog]", "((ultra detailed))", "[[blurry]]", "(red hair:0.8)",
    "[forest:city:0.5]", "<lora:add_detail:0.7>", "<hypernet:foo:1>", "{blue|green} eyes", "AND",
    "BREAK", "(photorealistic:1.4), 8k uhd, dslr", "\\(cosplay\\)", "score_9, score_8_up", "masterpiece++",
    "(worst quality, low quality:1.4)", "trending on artstation", "by Alphonse Mucha and Hokusai",
]
PUNCT = ["!", "!!!", "...", "?!", "—", "–", "~~", "///", "###", "***", ":)", ";-)", "\"", "'", "`", "$$", "@",
         "^_^", "<", ">", "</w>", "|", "\\", "(", ")", "[", "]", "{", "}", "%", "+-", "=", "_", "…", "•", "©", "®"]
ACCENTS = ["café", "naïve", "Ångström", "cafe\u0301", "Ærøskøbing", "Straße", "İstanbul", "ΟΔΟΣ ΣΊΣΥΦΟΣ",
           "Ελληνικά", "Москва", "Dvořák", "Łódź", "São Paulo", "crème brûlée", "jalapeño", "Ⅻ", "ǅemal"]
SCRIPTS = ["猫", "山水画", "東京の夜景", "中国风", "ねこ", "カタカナ", "ｶﾀｶﾅ", "고양이", "한국어 그림", "قطة",
           "مرحبا بالعالم", "שלום", "ภาษาไทย", "नमस्ते", "தமிழ்", "ᚠᚢᚦ", "𝔉𝔯𝔞𝔨𝔱𝔲𝔯", "𝐛𝐨𝐥𝐝", "ｈｅｌｌｏ"]
EMOJI = ["🐱", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇯🇵", "🔥🔥🔥", "👩🏿‍🚀", "✨", "☕", "🤖", "😀😃", "🧑‍🎨"]
LIGATURES_WIDTH = ["ﬁsh", "ﬂower", "ﬀ", "oﬃce", "ＡＢＣ", "ｃａｔ", "１２３", "！？", "Ｈｅｌｌｏ　Ｗｏｒｌｄ", "Ꜳ"]
ENTITIES = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&nbsp;", "&amp;amp;", "&hellip;", "&eacute;", "&#x2019;",
            "AT&T", "R&D", "a &lt;b&gt;", "&copy;", "&unknown;"]
WHITESPACE = ["\t", "\u3000", "\u00a0", "\n", "\r\n", "\u200b", "\u2009", "\u202f", "\u2028", "  ", "\u200d",
              "\ufeff", "\x0b", "\x0c", "\u2003", " \n\t ", "\u205f", "\u1680"]
NUMBERS = ["1024", "3.14", "1,000,000", "2x", "4k", "8k", "1girl", "1990s", "½", "²", "①", "٣٤", "x1.5",
           "-0.5", "1e-4", "7/10", "v2.1", "#ff00aa", "12:30", "５０"]
CONTRACTIONS = ["it's", "don't", "we're", "I've", "I'm", "you'll", "he'd", "IT'S", "it\u2019s", "rock'n'roll",
                "'s", "''", "o'clock", "y'all'd've", "Don\u2019t"]
ODD = ["cafÃ©", "â€™", "\x00", "\x7f", "\x1b[0m", "\ufffd", "Ã¼ber", "\x85", "\x9d", "\U0001f600\ufe0f"]
POOLS = [SUBJECTS, SD_SYNTAX, PUNCT, ACCENTS, SCRIPTS, EMOJI, LIGATURES_WIDTH, ENTITIES, WHITESPACE, NUMBERS,
         CONTRACTIONS, ODD]
SEPARATORS = [", ", " ", "", ",", " | ", "\n", ". ", ":", "\t"]


def make_prompts(n: int = N_PROMPTS, seed: int = 1234) -> list[str]:
    """Deterministic varied prompts: fragments of every pool, 10% of them long (> 77 tokens)."""
    rng = random.Random(seed)
    prompts = list(dict.fromkeys(frag for pool in POOLS for frag in pool))  # every fragment alone first
    seen = set(prompts)
    while len(prompts) < n:
        k = rng.randint(40, 90) if rng.random() < 0.1 else rng.randint(1, 12)
        parts = []
        for _ in range(k):
            pool = SUBJECTS + SD_SYNTAX if rng.random() < 0.4 else rng.choice(POOLS)
            frag = rng.choice(pool)
            if rng.random() < 0.15:
                frag = frag.upper()
            parts.append(frag)
            parts.append(rng.choice(SEPARATORS))
        prompt = "".join(parts[:-1]) if rng.random() < 0.8 else "".join(parts)
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
    return prompts[:n]


PROMPTS = make_prompts()


# ---------------------------------------------------------------------------------------------- parity
def test_prompt_pool_is_varied(ours: CLIPTokenizer) -> None:
    lengths = [len(ours.encode(p)) for p in PROMPTS]
    assert len(PROMPTS) == N_PROMPTS and len(set(PROMPTS)) == N_PROMPTS
    assert sum(n > 75 for n in lengths) >= 100  # plenty of prompts that get truncated
    assert sum(ftfy.fix_text(p) != p for p in PROMPTS) >= 200  # and plenty that ftfy changes


def test_ids_match_transformers(ours: CLIPTokenizer, refs: dict[str, object]) -> None:
    for name, ref in refs.items():
        bad = [p for p in PROMPTS if ours.encode(p) != _ref_ids(ref, p)]
        assert not bad, f"{name}: {len(bad)} prompts differ, e.g. {bad[:3]!r}"


def test_padded_match_transformers(ours: CLIPTokenizer, refs: dict[str, object]) -> None:
    """77-token sequences, pad = EOS (SD1 / CLIP-L) and pad = '!' = id 0 (OpenCLIP: SD2, SDXL tokenizer 2)."""
    for name, ref in refs.items():
        for pad_id, pad_token in ((CLIPTokenizer.EOS, "<|endoftext|>"), (0, "!")):
            got = ours(PROMPTS, pad_id=pad_id)
            assert got.dtype == torch.long and got.shape == (N_PROMPTS, 77)
            want = _ref_padded(ref, PROMPTS, pad_token)
            bad = (got != want).any(dim=1).nonzero().flatten().tolist()
            assert not bad, f"{name} pad={pad_id}: {len(bad)} differ, e.g. {[PROMPTS[i] for i in bad[:3]]!r}"


def test_ftfy_unchanged_text_matches_reference_directly(ours: CLIPTokenizer, refs: dict[str, object]) -> None:
    """Where ftfy and str.lower add nothing the reference needs no help, incl. literal special tokens."""
    clean = [p for p in PROMPTS if ftfy.fix_text(p) == p and p.lower() == "".join(c.lower() for c in p)]
    clean += ["a cat<|endoftext|>dog", "<|startoftext|>x!<|endoftext|>", "wow!<|endoftext|>!!"]
    assert len(clean) > 500
    for name, ref in refs.items():
        bad = [p for p in clean if ours.encode(p) != ref(p, add_special_tokens=False)["input_ids"]]
        assert not bad, f"{name}: {bad[:3]!r}"


def test_ftfy_is_applied(ours: CLIPTokenizer) -> None:
    """The ftfy path: ligatures, full width, curly quotes, mojibake are fixed before BPE."""
    assert ours.encode("ﬁsh ﬂower") == ours.encode("fish flower")
    assert ours.encode("ＣＡＴ　ＤＯＧ") == ours.encode("cat dog")
    assert ours.encode("it\u2019s") == ours.encode("it's")
    assert ours.encode("cafÃ©") == ours.encode("café")
    assert ours.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]  # well-known CLIP ids


def test_python_lowercase_final_sigma(ours: CLIPTokenizer, refs: dict[str, object]) -> None:
    """str.lower (transformers 4.x, OpenAI) gives a final "ς"; the tokenizers-backed 5.x lowercases per char."""
    assert ours.encode("ΟΔΟΣ") == ours.encode("οδος") != ours.encode("οδοσ")
    for ref in refs.values():
        if not getattr(ref, "fix_text", None):
            assert ref("ΟΔΟΣ", add_special_tokens=False)["input_ids"] == ours.encode("οδοσ")  # the 5.x gap


def test_html_entities_differ_from_openai(ours: CLIPTokenizer, refs: dict[str, object]) -> None:
    """OpenAI's SimpleTokenizer html-unescapes twice after ftfy; transformers does not. ftfy itself unescapes
    entities (even nested ones) unless the line holds a literal '<', e.g. A1111's <lora:...> syntax."""
    assert ours.encode("cats &amp; dogs") == ours.encode("cats & dogs")  # ftfy unescapes here
    for text in ["<lora:x:1> cats &amp; dogs", "a < b &amp;&amp; c &gt; d", "1 &lt; 2 <3"]:
        openai_text = html.unescape(html.unescape(ftfy.fix_text(text)))  # OpenAI's basic_clean
        for ref in refs.values():
            assert ours.encode(text) == _ref_ids(ref, text)
        assert ours.encode(text) != ours.encode(openai_text)


def test_word_regex_ignores_case(ours: CLIPTokenizer, refs: dict[str, object]) -> None:
    """transformers 4.x and OpenAI compile the word regex with IGNORECASE: "'ſ" (long s folds to s) is one
    "'s"-style piece, so "'" gets no word end. The 5.x tokenizers regex is case-sensitive and splits it."""
    apostrophe_word_end = ours.encode("'")
    assert len(apostrophe_word_end) == 1
    assert ours.encode("'ſt")[0] != apostrophe_word_end[0]
    for ref in refs.values():
        if not getattr(ref, "fix_text", None):
            assert ref("'ſt", add_special_tokens=False)["input_ids"][0] == apostrophe_word_end[0]


# ---------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("text", ["wow!", "wow!!!", "!", "!!", "hi !", "! ! !"])
def test_bang_padding_never_merges(ours: CLIPTokenizer, text: str) -> None:
    """SDXL's second tokenizer pads with '!' (id 0): the prompt's own '!' tokens are untouched."""
    ids = ours.encode(text)
    padded = ours.pad_sequence(ids, pad_id=0)
    assert len(padded) == 77
    assert padded[: len(ids) + 2] == [CLIPTokenizer.BOS, *ids, CLIPTokenizer.EOS]
    assert padded[len(ids) + 2 :] == [0] * (75 - len(ids))
    assert ours.decode(ids) == ours.decode(ours.encode(ours.decode(ids)))
    assert ours.decode(padded).startswith("<|startoftext|>") and ours.decode(padded).count("<|endoftext|>") == 1
    assert ours.decode(padded).endswith("<|endoftext|>" + "!" * (75 - len(ids)))
    if text.startswith("wow"):
        assert ours.decode(ids) == "wow " + text[3:]


def test_wow_bang_ids(ours: CLIPTokenizer) -> None:
    one, three = ours.encode("wow!"), ours.encode("wow!!!")
    assert one[0] == three[0] and len(one) == len(three) == 2 and one[1] != three[1]
    assert 0 not in one + three  # "!</w>" (256), "!!!</w>" (995): never the bare "!" pad token
    assert ours("wow!", pad_id=0)[0, :5].tolist() == [CLIPTokenizer.BOS, *one, CLIPTokenizer.EOS, 0]


def test_truncation_keeps_first_75(ours: CLIPTokenizer) -> None:
    text = ", ".join(f"word{i}" for i in range(60))
    ids = ours.encode(text)
    assert len(ids) > 75
    for pad_id in (CLIPTokenizer.EOS, 0):
        row = ours(text, pad_id=pad_id)[0].tolist()
        assert row == [CLIPTokenizer.BOS, *ids[:75], CLIPTokenizer.EOS]
    short = ours.pad_sequence(ids[:3], pad_id=7, length=10)
    assert short == [CLIPTokenizer.BOS, *ids[:3], CLIPTokenizer.EOS, 7, 7, 7, 7, 7]
    assert ours.pad_sequence(ids, pad_id=7, length=10) == [CLIPTokenizer.BOS, *ids[:8], CLIPTokenizer.EOS]


def test_call_batches(ours: CLIPTokenizer) -> None:
    out = ours(["a cat", "a dog"], pad_id=0, length=8)
    assert out.shape == (2, 8) and out.dtype == torch.long
    assert ours("a cat").shape == (1, 77)
    assert ours([]).shape == (0, 77)


def test_decode_roundtrip_ascii(ours: CLIPTokenizer, refs: dict[str, object]) -> None:
    rng = random.Random(7)
    words = ["a", "photo", "of", "cat", "dog", "masterpiece", "quality", "highly", "detailed", "xyzzy", "qwfp"]
    for _ in range(200):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))
        assert ours.decode(ours.encode(text)) == text
    for ref in refs.values():
        ids = ours.encode("a photo of a cat, best quality!")
        assert ours.decode(ids) == ref.decode(ids)


def test_bpe_cache_bounded() -> None:
    tok = CLIPTokenizer()
    tok.cache_size = 16
    first = tok.encode(" ".join(PROMPTS[:200]))
    assert len(tok._cache) <= 16
    assert tok.encode(" ".join(PROMPTS[:200])) == first == CLIPTokenizer().encode(" ".join(PROMPTS[:200]))


_SHARED = CLIPTokenizer()


@settings(max_examples=500, deadline=None)
@given(st.lists(st.characters(max_codepoint=127) | st.sampled_from(["&amp;", "&lt;", "&#39;", "\x1b[1m"])))
def test_ascii_shortcut_equals_ftfy(parts: list[str]) -> None:
    """normalize() skips ftfy on plain printable ASCII: the result must be what ftfy would have given."""
    import regex

    text = "".join(parts)
    assert normalize(text) == regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_encode_never_raises(text: str) -> None:
    ids = _SHARED.encode(text)
    assert all(0 <= i <= 49407 for i in ids)
    assert len(_SHARED.pad_sequence(ids, pad_id=0)) == 77
