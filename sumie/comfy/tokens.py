"""ComfyUI's prompt tokenization (``comfy/sd1_clip.py`` ``SDTokenizer.tokenize_with_weights``), as Sumie chunks.

* weights: ``(text)`` multiplies by 1.1, ``(text:w)`` sets the weight to w (it does not multiply the outer
  weight, unlike A1111), ``\\(`` / ``\\)`` are literal brackets; ``[ ]`` and ``BREAK`` are plain text;
* words (split at spaces and newlines) are tokenized one by one and never split across 77-token chunks, except
  words of 8 tokens or more, which fill the chunk and go on in the next;
* every chunk is BOS, its tokens, EOS, then padding (the encoder's pad id is applied by the text conditioner).
"""

from __future__ import annotations

from sumie.prompts.text_conditioning import CHUNK_LENGTH, PromptChunk
from sumie.prompts.tokenizer import CLIPTokenizer

MAX_WORD_LENGTH = 8  # SDTokenizer.max_word_length
_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))


def _split_parentheses(text: str) -> list[str]:
    """Top-level pieces: plain runs and whole ``( ... )`` groups (unbalanced ones run to the end)."""
    out: list[str] = []
    current, depth = "", 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if current:
                    out.append(current)
                current = "("
            else:
                current += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                out.append(current + ")")
                current = ""
            else:
                current += ch
        else:
            current += ch
    if current:
        out.append(current)
    return out


def token_weights(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """(piece, weight) pairs of a prompt with escapes already replaced (ComfyUI ``token_weights``)."""
    out: list[tuple[str, float]] = []
    for piece in _split_parentheses(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            inner, w = piece[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    w = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += token_weights(inner, w)
        else:
            out.append((piece, weight))
    return out


def tokenize_weighted(text: str, tokenizer: CLIPTokenizer) -> list[list[tuple[int, float]]]:
    """The prompt's words as lists of (token id, weight)."""
    for plain, code in _ESCAPES:
        text = text.replace(plain, code)
    words: list[list[tuple[int, float]]] = []
    for piece, weight in token_weights(text):
        for plain, code in _ESCAPES:
            piece = piece.replace(code, plain[1])
        for word in piece.replace("\n", " ").split(" "):
            if word:
                words.append([(t, weight) for t in tokenizer.encode(word)])
    return words


def comfy_chunks(text: str, tokenizer: CLIPTokenizer) -> list[PromptChunk]:
    """The 77-token chunks ComfyUI builds for a prompt (see the module docstring)."""
    bos, eos = tokenizer.BOS, tokenizer.EOS
    size = CHUNK_LENGTH + 2
    chunks: list[list[tuple[int, float]]] = [[(bos, 1.0)]]
    for word in tokenize_weighted(text, tokenizer):
        large = len(word) >= MAX_WORD_LENGTH
        while word:
            batch = chunks[-1]
            if len(word) + len(batch) > size - 1:
                room = size - len(batch) - 1
                if large:
                    batch.extend(word[:room])
                    word = word[room:]
                batch.append((eos, 1.0))
                chunks.append([(bos, 1.0)])
            else:
                batch.extend(word)
                word = []
    chunks[-1].append((eos, 1.0))
    out = []
    for batch in chunks:
        batch = batch + [(eos, 1.0)] * (size - len(batch))
        out.append(PromptChunk(tuple(t for t, _ in batch), tuple(w for _, w in batch)))
    return out
