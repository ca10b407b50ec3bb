"""Plug points of the UNet: options carried through UNet -> blocks -> transformer -> attention, and residuals.

What ComfyUI's ``transformer_options`` does, as typed objects. A :class:`UNetOptions` goes with one UNet call
(``unet(x, t, context, options=...)``) and reaches every attention layer together with the :class:`AttnSite` that
says where the layer is. Extensions plug in at four kinds of points:

* **extra key/value tokens** for cross-attention with their own scale (IP-Adapter's decoupled cross-attention,
  Ye et al. 2023): ``out = attn(q, k, v) + scale * attn(q, k_extra, v_extra)`` before ``to_out``
  (:attr:`UNetOptions.extra_kv`);
* **replaceable attention**: a function that computes ``attn(q, k, v)`` instead of scaled dot-product attention
  (regional prompts, attention couples) (:attr:`UNetOptions.attention`), and **attention-input patches** that change
  the tokens keys and values are made from before the projections (reference-only appends the reference image's
  tokens to self-attention) (:attr:`UNetOptions.attn_inputs`);
* **residuals** (:class:`Residuals`): added to an encoder block's output (T2I-Adapter: the change runs on through
  the encoder), to the middle block's output, or to a skip connection where the decoder reads it (ControlNet);
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
    "AttentionFn", "AttnInputPatch", "AttnSite", "BlockKind", "CallInfo", "ExtraKV", "ExtraTokens", "Residuals",
    "UNetOptions",
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
class UNetOptions:
    """Hooks and per-call facts carried through one UNet call (see the module docstring)."""

    extra_kv: list[ExtraKV] = field(default_factory=list)
    attention: AttentionFn | None = None
    attn_inputs: list[AttnInputPatch] = field(default_factory=list)
    call: CallInfo | None = None

    @property
    def empty(self) -> bool:
        """Whether no attention hook is set (the UNet then takes its plain path)."""
        return not self.extra_kv and self.attention is None and not self.attn_inputs
