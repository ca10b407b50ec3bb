"""Prompt text -> UNet conditioning, as AUTOMATIC1111 webui 1.10 computes it (``sd_hijack_clip``).

A prompt is split into weighted pieces (:func:`~sumie.prompts.parser.parse_prompt_attention`), tokenized,
and packed into chunks of 75 tokens (:func:`build_chunks`): ``BREAK`` starts a new chunk, a full chunk moves
the words after its last comma (within 20 tokens) to the next one, textual-inversion embeddings take
``num_vectors`` slots and never straddle two chunks. Each chunk becomes ``BOS + 75 + EOS`` = 77 tokens and is
encoded on its own; the token weights then scale the hidden states (emphasis) and the chunks are concatenated
along the token axis: ``[B, 77 * chunks, D]``. SDXL concatenates CLIP-L and OpenCLIP bigG features
(``D = 768 + 1280``) and takes bigG's pooled output of the first chunk for the ADM vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sumie.configs import ModelConfig, TextEncoderConfig
from sumie.errors import ConfigError
from sumie.models.clip import CLIPTextModel
from sumie.prompts.embeddings import Embedding, EmbeddingLibrary
from sumie.prompts.parser import BREAK_WEIGHT, parse_prompt_attention
from sumie.prompts.tokenizer import CLIPTokenizer

__all__ = [
    "CHUNK_LENGTH",
    "EMPHASIS_MODES",
    "Conditioning",
    "ConditioningOptions",
    "PromptChunk",
    "TextConditioner",
    "apply_emphasis",
    "build_chunks",
    "empty_chunk",
    "encoder_layer",
    "pad_conds",
    "stack_contexts",
    "tokenize_prompt",
]

CHUNK_LENGTH = 75  # prompt tokens per chunk; + BOS + EOS = the encoders' 77 positions
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


@dataclass(frozen=True)
class ConditioningOptions:
    """A1111 settings that change the conditioning (names as in its settings page).

    ``emphasis``: "Original" (scale by weights, restore the mean), "No norm" (scale only), "Ignore" (parse
    brackets, ignore weights), "None" (brackets are plain text). ``clip_skip`` is "Clip skip" (1 = off);
    ``sdxl_clip_l_skip`` lets it act on SDXL's CLIP-L; ``comma_padding_backtrack`` is "Prompt word wrap length
    limit" (0 = off).
    """

    emphasis: str = "Original"
    clip_skip: int = 1
    sdxl_clip_l_skip: bool = False
    comma_padding_backtrack: int = 20

    def __post_init__(self) -> None:
        if self.emphasis not in EMPHASIS_MODES:
            raise ConfigError(f"unknown emphasis mode {self.emphasis!r}; use one of {', '.join(EMPHASIS_MODES)}")
        if self.clip_skip < 1:
            raise ConfigError(f"clip skip must be 1 (off) or more, got {self.clip_skip}")
        if not 0 <= self.comma_padding_backtrack <= CHUNK_LENGTH:
            raise ConfigError(f"comma padding backtrack must be in [0, {CHUNK_LENGTH}], got "
                              f"{self.comma_padding_backtrack}")


@dataclass(frozen=True, eq=False)
class Conditioning:
    """Text conditioning of a batch: ``context`` [B, 77k, D] for cross-attention, ``pooled`` [B, P] (SDXL) or None."""

    context: Tensor
    pooled: Tensor | None = None


@dataclass(frozen=True, eq=False)
class PromptChunk:
    """77 token ids (BOS, 75 prompt/padding slots, EOS), their weights, and embeddings at body offsets.

    Embedding slots hold token id 0; ``fixes`` are ``(offset, embedding)`` with offset counted from the first
    slot after BOS, as A1111's ``PromptChunkFix``.
    """

    tokens: tuple[int, ...]
    multipliers: tuple[float, ...]
    fixes: tuple[tuple[int, Embedding], ...] = ()


def empty_chunk(bos: int = CLIPTokenizer.BOS, eos: int = CLIPTokenizer.EOS) -> PromptChunk:
    """The chunk of an empty prompt: BOS, then EOS in all 76 other slots, weights 1."""
    return PromptChunk((bos,) + (eos,) * (CHUNK_LENGTH + 1), (1.0,) * (CHUNK_LENGTH + 2))


class _ChunkBuilder:
    """Mutable state of :func:`build_chunks` (A1111 ``tokenize_line``'s locals)."""

    def __init__(self, bos: int, eos: int) -> None:
        self.bos, self.eos = bos, eos
        self.chunks: list[PromptChunk] = []
        self.tokens: list[int] = []
        self.mults: list[float] = []
        self.fixes: list[tuple[int, Embedding]] = []
        self.last_comma = -1
        self.token_count = 0

    def next_chunk(self, is_last: bool = False) -> None:
        """Pad the current chunk with EOS to 75, wrap it in BOS/EOS, start an empty one."""
        self.token_count += len(self.tokens) if is_last else CHUNK_LENGTH
        missing = CHUNK_LENGTH - len(self.tokens)
        if missing > 0:
            self.tokens += [self.eos] * missing
            self.mults += [1.0] * missing
        self.chunks.append(
            PromptChunk((self.bos, *self.tokens, self.eos), (1.0, *self.mults, 1.0), tuple(self.fixes))
        )
        self.tokens, self.mults, self.fixes = [], [], []
        self.last_comma = -1


def build_chunks(
    pieces: Sequence[tuple[Sequence[int] | None, float]],
    comma_id: int,
    embeddings: EmbeddingLibrary | None = None,
    comma_padding_backtrack: int = 20,
    bos: int = CLIPTokenizer.BOS,
    eos: int = CLIPTokenizer.EOS,
) -> tuple[list[PromptChunk], int]:
    """Pack weighted token pieces (``None`` tokens = BREAK) into 77-token chunks: (chunks, token count).

    Rules of A1111's ``tokenize_line``: when a chunk is full and a comma lies within its last
    ``comma_padding_backtrack`` tokens, the tokens after that comma move to the next chunk (a comma itself
    never triggers this); an embedding that does not fit the current chunk starts the next one. The token
    count is 75 per chunk before the last plus the last chunk's real tokens.
    """
    b = _ChunkBuilder(bos, eos)
    for ids, weight in pieces:
        if ids is None:
            b.next_chunk()
            continue
        ids = list(ids)
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma_id:
                b.last_comma = len(b.tokens)
            elif (
                comma_padding_backtrack != 0
                and len(b.tokens) == CHUNK_LENGTH
                and b.last_comma != -1
                and len(b.tokens) - b.last_comma <= comma_padding_backtrack
            ):
                cut = b.last_comma + 1
                moved_tokens, moved_mults = b.tokens[cut:], b.mults[cut:]
                b.tokens, b.mults = b.tokens[:cut], b.mults[:cut]
                # A1111 leaves the chunk's embedding fixes where they were, also those of the moved tokens.
                b.next_chunk()
                b.tokens, b.mults = moved_tokens, moved_mults
            if len(b.tokens) == CHUNK_LENGTH:
                b.next_chunk()

            found = embeddings.find_at(ids, position) if embeddings is not None else None
            if found is None:
                b.tokens.append(token)
                b.mults.append(weight)
                position += 1
                continue
            embedding, name_tokens = found
            n = embedding.num_vectors
            if len(b.tokens) + n > CHUNK_LENGTH:
                b.next_chunk()
            b.fixes.append((len(b.tokens), embedding))
            b.tokens += [0] * n
            b.mults += [weight] * n
            position += name_tokens
    if b.tokens or not b.chunks:
        b.next_chunk(is_last=True)
    return b.chunks, b.token_count


def tokenize_prompt(
    text: str,
    tokenizer: CLIPTokenizer,
    embeddings: EmbeddingLibrary | None = None,
    emphasis: str = "Original",
    comma_padding_backtrack: int = 20,
) -> tuple[list[PromptChunk], int]:
    """One prompt (after scheduling and AND) -> its chunks and token count (emphasis "None": no parsing)."""
    parsed = parse_prompt_attention(text) if emphasis != "None" else [(text, 1.0)]
    pieces = [(None if piece == "BREAK" and w == BREAK_WEIGHT else tokenizer.encode(piece), w) for piece, w in parsed]
    comma_id = tokenizer.encode(",")[0]
    return build_chunks(pieces, comma_id, embeddings, comma_padding_backtrack, tokenizer.BOS, tokenizer.EOS)


def apply_emphasis(z: Tensor, multipliers: Tensor, mode: str = "Original") -> Tensor:
    """Scale hidden states z [B, T, D] by token weights [B, T]; "Original" then restores z's mean over the batch.

    The mean is over the whole [B, T, D] tensor, as A1111 computes it for the texts it encodes together.
    Weights are float32, so a half-precision z comes back float32 (A1111's type promotion).
    """
    if mode in ("None", "Ignore"):
        return z
    weights = multipliers.to(device=z.device, dtype=torch.float32).unsqueeze(-1)
    if mode == "No norm":
        return z * weights
    if mode != "Original":
        raise ConfigError(f"unknown emphasis mode {mode!r}; use one of {', '.join(EMPHASIS_MODES)}")
    original_mean = z.mean()
    z = z * weights
    new_mean = z.mean()
    # A1111 divides by the new mean. Exactly 0 (e.g. a final LayerNorm still at its init, weight 1 and bias 0: every
    # token vector has mean 0) leaves no mean to restore, and 0 / 0 would make the whole conditioning NaN.
    return z * torch.where(new_mean == 0, 1.0, original_mean / new_mean)


def encoder_layer(encoder: TextEncoderConfig, options: ConditioningOptions) -> tuple[int, bool]:
    """(hidden layer, final norm) of one text encoder under A1111's clip skip.

    SD1's CLIP-L (last layer, final norm): clip skip n -> layer -n, still final-normed. SDXL's CLIP-L
    (penultimate hidden state, no norm): only with ``sdxl_clip_l_skip``, then layer -n without norm.
    OpenCLIP encoders (SD2 ViT-H, bigG) ignore clip skip in A1111.
    """
    if encoder.name != "clip_l":
        return encoder.layer, encoder.final_norm
    if encoder.final_norm:
        return (-options.clip_skip, True) if options.clip_skip > 1 else (encoder.layer, True)
    if options.sdxl_clip_l_skip:
        return -options.clip_skip, False
    return encoder.layer, encoder.final_norm


def _encode(
    model: CLIPTextModel,
    tokens: Tensor,
    fixes: list[list[tuple[int, Tensor]]],
    layer: int,
    final_norm: bool,
    need_pooled: bool,
) -> tuple[Tensor, Tensor | None]:
    """``model(tokens)`` with embedding vectors written over the token embeddings at ``offset + 1``."""
    if not any(fixes):
        return model(tokens, layer=layer, final_norm=final_norm, need_pooled=need_pooled)
    tm = model.text_model
    x = tm.embeddings.token_embedding(tokens)
    t = tokens.shape[1]
    for row, row_fixes in enumerate(fixes):
        for offset, vec in row_fixes:
            n = min(t - offset - 1, vec.shape[0])
            x[row, offset + 1 : offset + 1 + n] = vec[:n].to(device=x.device, dtype=x.dtype)
    return model(tokens, layer=layer, final_norm=final_norm, need_pooled=need_pooled, token_embeds=x)


def _pad_after_eos(rows: list[tuple[int, ...]], eos: int, pad_id: int) -> list[list[int]]:
    """OpenCLIP encoders see ``pad_id`` after the first EOS of each row (A1111 ``process_tokens``)."""
    out = []
    for row in rows:
        r = list(row)
        if pad_id != eos and eos in r:
            k = r.index(eos)
            r[k + 1 :] = [pad_id] * (len(r) - k - 1)
        out.append(r)
    return out


class TextConditioner:
    """A model's text encoders + A1111's prompt handling: ``conditioner(["a (cat:1.2)"]) -> Conditioning``."""

    def __init__(
        self,
        config: ModelConfig,
        encoders: Sequence[CLIPTextModel],
        embeddings: EmbeddingLibrary | None = None,
        options: ConditioningOptions | None = None,
        tokenizer: CLIPTokenizer | None = None,
    ) -> None:
        if len(encoders) != len(config.text_encoders):
            raise ConfigError(
                f"{config.family} has {len(config.text_encoders)} text encoder(s), got {len(encoders)} modules"
            )
        self.config = config
        self.encoders = list(encoders)
        self.embeddings = embeddings
        self.options = options or ConditioningOptions()
        self.tokenizer = tokenizer or (embeddings.tokenizer if embeddings is not None else CLIPTokenizer())
        # SDXL-type models (an ADM input) take the last encoder's pooled output.
        self.pooled_encoder = len(self.encoders) - 1 if config.unet.adm_in_channels is not None else None

    def tokenize(self, text: str) -> tuple[list[PromptChunk], int]:
        """One prompt -> (chunks, token count)."""
        o = self.options
        return tokenize_prompt(text, self.tokenizer, self.embeddings, o.emphasis, o.comma_padding_backtrack)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], is_negative: bool = False) -> Conditioning:
        """Encode texts together: context [B, 77 * max chunks, D] float32, pooled [B, P] float32 or None.

        Shorter prompts are padded with empty chunks. A1111 encodes the texts of one prompt's schedule in one
        call, and "Original" emphasis restores the mean over that whole batch. For SDXL-type models an
        all-empty negative prompt gives zeros (A1111's ``force_zero_embeddings``).
        """
        texts = list(texts)
        if not texts:
            raise ConfigError("no prompts to encode")
        cache: dict[str, list[PromptChunk]] = {}
        for text in texts:
            if text not in cache:
                cache[text] = self.tokenize(text)[0]
        per_text = [cache[t] for t in texts]
        n_chunks = max(len(c) for c in per_text)
        blank = empty_chunk(self.tokenizer.BOS, self.tokenizer.EOS)

        contexts: list[list[Tensor]] = [[] for _ in self.encoders]
        pooled: Tensor | None = None
        for i in range(n_chunks):
            batch = [chunks[i] if i < len(chunks) else blank for chunks in per_text]
            weights = torch.tensor([c.multipliers for c in batch], dtype=torch.float32)
            for j, (model, enc_cfg) in enumerate(zip(self.encoders, self.config.text_encoders, strict=True)):
                device = model.text_model.embeddings.token_embedding.weight.device
                ids = _pad_after_eos([c.tokens for c in batch], self.tokenizer.EOS, enc_cfg.pad_id)
                tokens = torch.tensor(ids, dtype=torch.long, device=device)
                fixes = [[(off, emb.for_encoder(enc_cfg)) for off, emb in c.fixes] for c in batch]
                layer, final_norm = encoder_layer(enc_cfg, self.options)
                want_pooled = i == 0 and j == self.pooled_encoder
                hidden, pool = _encode(model, tokens, fixes, layer, final_norm, want_pooled)
                contexts[j].append(apply_emphasis(hidden, weights, self.options.emphasis).float())
                if want_pooled and pool is not None:
                    pooled = pool.float()

        context = torch.cat([torch.cat(chunks, dim=1) for chunks in contexts], dim=-1)
        if is_negative and self.pooled_encoder is not None and all(t == "" for t in texts):
            context = torch.zeros_like(context)
            pooled = torch.zeros_like(pooled) if pooled is not None else None
        return Conditioning(context, pooled)

    def empty(self) -> Conditioning:
        """The empty prompt's conditioning (A1111 ``cond_stage_model_empty_prompt``), for :func:`pad_conds`."""
        return self([""])


def pad_conds(cond: Tensor, uncond: Tensor, empty: Tensor) -> tuple[Tensor, Tensor]:
    """Contexts [N, L, D] made the same length by appending empty-prompt chunks ``empty`` [1, 77, D] to the shorter.

    A1111's "Pad prompt/negative prompt" (``pad_cond_uncond``): the padded tokens take part in attention, so the
    image changes slightly (unlike :func:`sumie.sampling.guidance.repeat_to_common_length`, which changes nothing).
    """
    chunk = empty[:1]
    repeats = (cond.shape[1] - uncond.shape[1]) // chunk.shape[1]

    def pad(c: Tensor, k: int) -> Tensor:
        return torch.cat([c, chunk.to(c).repeat(c.shape[0], k, 1)], dim=1)

    if repeats < 0:
        return pad(cond, -repeats), uncond
    if repeats > 0:
        return cond, pad(uncond, repeats)
    return cond, uncond


def stack_contexts(contexts: Sequence[Tensor]) -> Tensor:
    """[T_i, D] tensors -> [N, max T, D]; shorter ones repeat their last vector (A1111 ``stack_conds``, for AND)."""
    n = max(c.shape[0] for c in contexts)
    rows = [c if c.shape[0] == n else torch.cat([c, c[-1:].repeat(n - c.shape[0], 1)]) for c in contexts]
    return torch.stack(rows)
