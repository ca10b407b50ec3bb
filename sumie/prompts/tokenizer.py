"""OpenAI CLIP byte-level BPE tokenizer (Radford et al. 2021), as transformers' ``CLIPTokenizer`` with ftfy.

Text path (what A1111, ComfyUI and diffusers get from transformers' python CLIPTokenizer with ftfy
installed): split on the literal special tokens, then per chunk ``ftfy.fix_text`` -> collapse whitespace runs
to one space and strip -> ``str.lower`` -> CLIP's word regex -> UTF-8 bytes mapped to printable unicode -> BPE
with ``</w>`` marking the end of each word. Unlike OpenAI's ``SimpleTokenizer`` there is no extra
``html.unescape`` pass (ftfy alone decodes HTML entities, and skips that for a line holding a literal ``<``).
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass
from importlib import resources

import regex
import torch

_VOCAB_RESOURCE = ("data", "bpe_simple_vocab_16e6.txt.gz")
_NUM_MERGES = 49152 - 256 - 2  # merge lines 1..48894 of the file (line 0 is a version header)
_SOT, _EOT = "<|startoftext|>", "<|endoftext|>"
_END_OF_WORD = "</w>"

# CLIP's word pattern, with the flags transformers uses (IGNORECASE matters for e.g. "'ſ" ~ "'s").
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
# Special tokens typed literally in a prompt are cut out before any normalisation (case-sensitive).
_SPECIAL_SPLIT = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
# Printable ASCII without "&" plus tab/newline/CR: ftfy has nothing to fix there (besides \r -> \n, and all
# whitespace becomes one space next anyway), so the common plain prompt skips its cost.
_FTFY_NOOP = regex.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")


def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode char (GPT-2/CLIP table); printable latin-1 bytes map to themselves."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


@dataclass(frozen=True)
class _Vocab:
    """Immutable CLIP vocabulary: token -> id, merge ranks, byte table (id -> bytes: :func:`_decoder_bytes`)."""

    encoder: dict[str, int]
    tokens: tuple[str, ...]
    ranks: dict[tuple[str, str], int]
    byte_encoder: tuple[str, ...]

    @functools.cached_property
    def decoder_bytes(self) -> tuple[bytes, ...]:
        """id -> the token's bytes (a space after end-of-word tokens); built on the first decode only."""
        byte_decoder = {c: b for b, c in enumerate(self.byte_encoder)}
        decoded: list[bytes] = []
        for tok in self.tokens:
            if tok in (_SOT, _EOT):
                decoded.append(tok.encode("ascii"))
            elif tok.endswith(_END_OF_WORD):
                decoded.append(bytes(byte_decoder[c] for c in tok[: -len(_END_OF_WORD)]) + b" ")
            else:
                decoded.append(bytes(byte_decoder[c] for c in tok))
        return tuple(decoded)


@functools.cache
def load_vocab() -> _Vocab:
    """Build the 49408-token CLIP vocab from the packaged merges file, following OpenAI's recipe."""
    data = resources.files("sumie").joinpath(*_VOCAB_RESOURCE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_table = _bytes_to_unicode()
    base = list(byte_table.values())
    tokens = base + [t + _END_OF_WORD for t in base] + ["".join(m) for m in merges] + [_SOT, _EOT]
    encoder = {tok: i for i, tok in enumerate(tokens)}
    if len(encoder) != 49408:
        raise ValueError(f"corrupt CLIP vocab: {len(encoder)} unique tokens, expected 49408")
    ranks = {(a, b): i for i, (a, b) in enumerate(merges)}
    return _Vocab(encoder, tuple(tokens), ranks, tuple(byte_table[b] for b in range(256)))


def normalize(text: str) -> str:
    """ftfy.fix_text, whitespace runs -> one space, strip, lowercase (transformers' CLIP ``_tokenize``)."""
    if not _FTFY_NOOP.fullmatch(text):
        import ftfy  # ~0.2 s to import: only for text it may change

        text = ftfy.fix_text(text)
    return _WHITESPACE.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """CLIP BPE tokenizer: text -> ids in [0, 49407]; BOS 49406, EOS 49407, 77-token context."""

    BOS = 49406
    EOS = 49407
    cache_size = 1 << 16

    def __init__(self) -> None:
        self._vocab = load_vocab()
        self._cache: dict[str, tuple[int, ...]] = {}

    def _bpe(self, piece: str) -> tuple[int, ...]:
        """One regex piece -> ids: its UTF-8 bytes as vocab chars, then merge the lowest-ranked adjacent
        pair (every occurrence) until no ranked pair is left."""
        ids = self._cache.get(piece)
        if ids is not None:
            return ids
        if piece in (_SOT, _EOT):  # kept whole by the word regex, also from e.g. "<|EndOfText|>" lowercased
            return (self.BOS,) if piece == _SOT else (self.EOS,)
        byte_encoder = self._vocab.byte_encoder
        word = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
        ranks = self._vocab.ranks
        parts = [*word[:-1], word[-1] + _END_OF_WORD]
        while len(parts) > 1:
            best, best_rank = None, _NUM_MERGES
            for pair in zip(parts, parts[1:], strict=False):
                r = ranks.get(pair, _NUM_MERGES)
                if r < best_rank:
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(parts)
            while i < n:
                if i < n - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        encoder = self._vocab.encoder
        ids = tuple(encoder[p] for p in parts)
        if len(self._cache) >= self.cache_size:
            del self._cache[next(iter(self._cache))]  # bounded: evict the oldest entry
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Text -> token ids without BOS/EOS, untruncated."""
        out: list[int] = []
        for k, chunk in enumerate(_SPECIAL_SPLIT.split(text)):
            if k % 2 == 1:  # a literal special token
                out.append(self.BOS if chunk == _SOT else self.EOS)
                continue
            if not chunk:
                continue
            for piece in _WORD_PATTERN.findall(normalize(chunk)):
                out.extend(self._bpe(piece))
        return out

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text: bytes joined, word ends become spaces, invalid UTF-8 replaced, stripped."""
        table = self._vocab.decoder_bytes
        return b"".join(table[i] for i in ids).decode("utf-8", errors="replace").strip()

    def pad_sequence(self, ids: list[int], pad_id: int, length: int = 77) -> list[int]:
        """``[BOS] + ids[:length-2] + [EOS]`` right-padded with ``pad_id`` to exactly ``length``."""
        if length < 2:
            raise ValueError(f"length must be >= 2, got {length}")
        seq = [self.BOS, *ids[: length - 2], self.EOS]
        return seq + [pad_id] * (length - len(seq))

    def __call__(self, texts: str | list[str], pad_id: int = 49407, length: int = 77) -> torch.Tensor:
        """Texts -> LongTensor [B, length] of BOS + ids + EOS + padding (truncated to ``length``)."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        rows = [self.pad_sequence(self.encode(t), pad_id, length) for t in batch]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)
