"""ComfyUI's prompt tokenization (``comfy/sd1_clip.py`` ``SDTokenizer.tokenize_with_weights``), as Sumie chunks.

* weights: ``(text)`` multiplies by 1.1, ``(text:w)`` sets the weight to w (it does not multiply the outer
  weight, unlike A1111), ``\\(`` / ``\\)`` are literal brackets; ``[ ]`` and ``BREAK`` are plain text;
* words (split at spaces and newlines) are tokenized one by one and never split across 77-token chunks, except
  words of 8 tokens or more, which fill the chunk and go on in the next;
* every chunk is BOS, its tokens, EOS, then padding (the encoder's pad id is applied by the text conditioner);
* textual inversion (``tokenize_with_weights`` / ``_try_get_embedding``): a weighted piece is cut before every
  `` embedding:`` / ``\nembedding:``; a part starting with ``embedding:`` names a file in the embeddings folders by
  its first word (``name``, ``sub/name`` or ``name.pt``; trailing commas dropped when only that finds it); its vectors
  are one word of the piece's weight (an 8-vector or longer one may span chunks) and the rest of the part is text.
  An unknown name leaves the part as text (ComfyUI warns and goes on).
"""

from __future__ import annotations

from collections.abc import Callable

from sumie.prompts.embeddings import Embedding
from sumie.prompts.text_conditioning import CHUNK_LENGTH, PromptChunk
from sumie.prompts.tokenizer import CLIPTokenizer

MAX_WORD_LENGTH = 8  # SDTokenizer.max_word_length
IDENTIFIER = "embedding:"  # SDTokenizer.embedding_identifier
_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))
EmbeddingLookup = Callable[[str], Embedding | None]  # a name after "embedding:" -> the embedding, or None
Slot = int | tuple[Embedding, int]  # a token id, or vector i of an embedding


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


def _embedding_part(part: str, lookup: EmbeddingLookup) -> tuple[Embedding | None, str]:
    """(embedding, text left over) of a part ``embedding:name rest`` (ComfyUI ``_try_get_embedding``)."""
    words = part[len(IDENTIFIER):].strip("\n").split()
    if not words:
        return None, part
    name, rest = words[0], " ".join(words[1:])
    found = lookup(name)
    if found is None:
        stripped = name.strip(",")
        if len(stripped) < len(name) and stripped:
            found = lookup(stripped)
            rest = f"{name[len(stripped):]} {rest}"
    return found, rest


def _parts(piece: str) -> list[str]:
    """A weighted piece cut before every " embedding:" / "\nembedding:" (the separator's space dropped)."""
    out = [piece]
    for sep in (" " + IDENTIFIER, "\n" + IDENTIFIER):
        out = [q if i == 0 else IDENTIFIER + q for p in out for i, q in enumerate(p.split(sep))]
    return [p for p in out if p]


def tokenize_weighted(text: str, tokenizer: CLIPTokenizer,
                      embeddings: EmbeddingLookup | None = None) -> list[list[tuple[Slot, float]]]:
    """The prompt's words as lists of (token id or embedding vector, weight)."""
    for plain, code in _ESCAPES:
        text = text.replace(plain, code)
    words: list[list[tuple[Slot, float]]] = []
    for piece, weight in token_weights(text):
        for plain, code in _ESCAPES:
            piece = piece.replace(code, plain[1])
        for part in _parts(piece) if embeddings is not None else [piece]:
            if embeddings is not None and part.startswith(IDENTIFIER):
                found, rest = _embedding_part(part, embeddings)
                if found is not None:
                    words.append([((found, i), weight) for i in range(found.num_vectors)])
                    if not rest.strip():
                        continue
                    part = rest
            for word in part.replace("\n", " ").split(" "):
                if word:
                    words.append([(t, weight) for t in tokenizer.encode(word)])
    return words


def _chunk(batch: list[tuple[Slot, float]]) -> PromptChunk:
    """A chunk's token ids (0 in embedding slots), weights and embedding fixes (one per run of one embedding)."""
    tokens = tuple(t if isinstance(t, int) else 0 for t, _ in batch)
    fixes: list[tuple[int, Embedding]] = []
    i = 0
    while i < len(batch):
        slot = batch[i][0]
        if isinstance(slot, int):
            i += 1
            continue
        emb, first = slot
        j = i
        while j + 1 < len(batch) and batch[j + 1][0] == (emb, first + j + 1 - i):  # the run's next vector
            j += 1
        n = j - i + 1
        if (first, n) != (0, emb.num_vectors):  # a part of a long embedding: its own vectors only
            emb = Embedding(emb.name, {k: v[first:first + n] for k, v in emb.vectors.items()}, emb.path, emb.step)
        fixes.append((i - 1, emb))  # offsets count from the slot after BOS
        i = j + 1
    return PromptChunk(tokens, tuple(w for _, w in batch), tuple(fixes))


def comfy_chunks(text: str, tokenizer: CLIPTokenizer, embeddings: EmbeddingLookup | None = None) -> list[PromptChunk]:
    """The 77-token chunks ComfyUI builds for a prompt (see the module docstring)."""
    bos, eos = tokenizer.BOS, tokenizer.EOS
    size = CHUNK_LENGTH + 2
    chunks: list[list[tuple[Slot, float]]] = [[(bos, 1.0)]]
    for word in tokenize_weighted(text, tokenizer, embeddings):
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
    return [_chunk(batch + [(eos, 1.0)] * (size - len(batch))) for batch in chunks]
