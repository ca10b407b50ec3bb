"""Plug points of the UNet: options carried through UNet -> blocks -> transformer -> attention, and residuals.

What ComfyUI's ``transformer_options`` does, as typed objects. A :class:`UNetOptions` goes with one UNet call
(``unet(x, t, context, options=...)``) and reaches every attention layer together with the :class:`AttnSite` that
says where the layer is. Extensions plug in at these kinds of points:

* **extra key/value tokens** for cross-attention with their own scale (IP-Adapter's decoupled cross-attention,
  Ye et al. 2023): ``out = attn(q, k, v) + scale * attn(q, k_extra, v_extra)`` before ``to_out``
  (:attr:`UNetOptions.extra_kv`);
* **replaceable attention**: a function that computes ``attn(q, k, v)`` instead of scaled dot-product attention
  (regional prompts, attention couples) (:attr:`UNetOptions.attention`), and **attention-input patches** that change
  the tokens keys and values are made from before the projections (reference-only appends the reference image's
  tokens to self-attention) (:attr:`UNetOptions.attn_inputs`);
* **residuals** (:class:`Residuals`): added to an encoder block's output (T2I-Adapter: the change runs on through
  the encoder), to the middle block's output, or to a skip connection where the decoder reads it (ControlNet);
* **speed options that change the image**: token merging around self-attention (ToMe, :attr:`UNetOptions.token_merge`;
  the self-attention hooks then see the merged tokens) and DeepCache's reuse of the deep blocks' output
  (:class:`DeepCache`, :attr:`UNetOptions.deep_cache`);
* **per-call facts** (:class:`CallInfo`): the sampling step, sigma and which batch rows are cond / uncond, for hooks
  whose effect differs between the rows (an IP-Adapter's negative image embedding goes with the uncond rows).

Every hook receives the options object, so hooks can share per-call state through it. With no options the UNet runs
its plain path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

BlockKind = Literal["input", "middle", "output"]
AttnKind = Literal["self", "cross"]

__all__ = [
    "AttentionFn", "AttnInputPatch", "AttnSite", "BlockKind", "CallInfo", "DeepCache", "ExtraKV", "ExtraTokens",
    "Residuals", "TokenFn", "TokenMerge", "UNetOptions",
]


@dataclass(frozen=True)
class AttnSite:
    """Where an attention layer sits: ``("input", 4)`` block, transformer block ``index``, self or cross, h x w."""

    block: tuple[BlockKind, int]
    index: int
    kind: AttnKind
    size: tuple[int, int]  # (h, w) of the image tokens at this resolution


@dataclass(frozen=True)
class CallInfo:
    """One UNet call within sampling: the model call number ``step``, ``sigma`` [B] and ``rows`` [B].

    ``rows[i]`` is 0 for an uncond row and k >= 1 for a row of the k-th cond (``AND`` sub-prompt k; 1 for a plain
    prompt), ComfyUI's ``cond_or_uncond`` per row.
    """

    step: int
    sigma: Tensor
    rows: Tensor

    @property
    def uncond(self) -> Tensor:
        """Bool mask [B] of the uncond rows."""
        return self.rows == 0


@dataclass(frozen=True)
class ExtraTokens:
    """Extra keys and values for one cross-attention layer: k, v [B or 1, L, heads * dim_head], scale per row."""

    k: Tensor
    v: Tensor
    scale: float | Tensor = 1.0  # a float, or [B] per row (e.g. 0 for rows that must not see the tokens)


# fn(site, options) -> extra tokens for the layer at ``site`` (None: nothing there)
ExtraKV = Callable[[AttnSite, "UNetOptions"], ExtraTokens | None]
# fn(q, k, v, site, options) -> out; q [B, H, N, d], k and v [B, H, L, d] -> [B, H, N, d]
AttentionFn = Callable[[Tensor, Tensor, Tensor, AttnSite, "UNetOptions"], Tensor]
# fn(x, context, site, options) -> the tokens keys and values are made from; x [B, N, C] (normed), context [B, L, C']
AttnInputPatch = Callable[[Tensor, Tensor, AttnSite, "UNetOptions"], Tensor]
# fn(x, site, options) -> (merge, unmerge) around the self-attention at ``site`` (None: none there); x [B, N, C] is
# the transformer block's input, merge [B, N, C] -> [B, N', C], unmerge back (ToMe, sumie.models.tome)
TokenFn = Callable[[Tensor], Tensor]
TokenMerge = Callable[[Tensor, AttnSite, "UNetOptions"], "tuple[TokenFn, TokenFn] | None"]


@dataclass
class Residuals:
    """Additive residuals of one UNet call, each [B, C, h, w] or None, one entry per block (ControlNet, T2I).

    ``encoder[i]`` is added to input block i's output (the encoder runs on with it, and the skip carries it);
    ``skips[i]`` only to the skip connection of input block i where the decoder reads it; ``middle`` to the middle
    block's output. Lists may be shorter than the block count.
    """

    encoder: list[Tensor | None] = field(default_factory=list)
    skips: list[Tensor | None] = field(default_factory=list)
    middle: Tensor | None = None

    def add(self, other: Residuals) -> Residuals:
        """Sum of two residual sets (several ControlNets add their outputs)."""

        def merge(a: Sequence[Tensor | None], b: Sequence[Tensor | None]) -> list[Tensor | None]:
            out: list[Tensor | None] = []
            for i in range(max(len(a), len(b))):
                x = a[i] if i < len(a) else None
                y = b[i] if i < len(b) else None
                out.append(y if x is None else x if y is None else x + y)
            return out

        middle = other.middle if self.middle is None else self.middle if other.middle is None else (
            self.middle + other.middle)
        return Residuals(merge(self.encoder, other.encoder), merge(self.skips, other.skips), middle)


@dataclass
class DeepCache:
    """DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): reuse the UNet's deep features.

    Every ``interval``-th UNet call (0, N, 2N, ...) runs in full and keeps the decoder's input at skip branch
    ``depth`` (the output of the deeper decoder blocks); the calls between run only input blocks 0..depth, then the
    cached features, then the last depth + 1 output blocks. One object per sampling pass; a call with another UNet
    or another batch / latent shape than the cached one (a refiner, an NGMS call without the uncond rows) runs in
    full and refreshes the cache.
    """

    interval: int
    depth: int = 0
    calls: int = 0
    feature: Tensor | None = None
    key: tuple[object, ...] | None = None  # (UNet id, input shape) the feature belongs to

    def reuse(self, key: tuple[object, ...]) -> bool:
        """Whether this call may skip the deep blocks (counts the call)."""
        due = self.calls % self.interval == 0
        self.calls += 1
        return not due and self.feature is not None and self.key == key

    def store(self, key: tuple[object, ...], feature: Tensor) -> None:
        """Keep the decoder input at the branch [B, C, h, w] of a full call."""
        self.key, self.feature = key, feature


@dataclass
class UNetOptions:
    """Hooks and per-call facts carried through one UNet call (see the module docstring)."""

    extra_kv: list[ExtraKV] = field(default_factory=list)
    attention: AttentionFn | None = None
    attn_inputs: list[AttnInputPatch] = field(default_factory=list)
    call: CallInfo | None = None
    token_merge: TokenMerge | None = None  # ToMe around self-attention (a speed option that changes the image)
    deep_cache: DeepCache | None = None  # DeepCache feature reuse (a speed option that changes the image)

    @property
    def empty(self) -> bool:
        """Whether no hook is set (the UNet then takes its plain path)."""
        return (not self.extra_kv and self.attention is None and not self.attn_inputs and self.token_merge is None
                and self.deep_cache is None)
