"""IP-Adapter image projections (Ye et al. 2023): CLIP image features -> image prompt tokens [B, n, cross_dim].

* :class:`ImageProjection` (``ip-adapter_sd15``, ``ip-adapter_sdxl[_vit-h]``): the projected image embedding through
  ``proj`` (Linear to n x cross_dim) and ``norm`` (LayerNorm); keys ``proj.*``, ``norm.*``.
* :class:`Resampler` (``ip-adapter-plus[-face]_*``): a Perceiver resampler (Jaegle et al. 2021, as in Flamingo,
  Alayrac et al. 2022) whose learned ``latents`` attend to the penultimate CLIP hidden states; keys ``latents``,
  ``proj_in``, ``proj_out``, ``norm_out``, ``layers.N.0`` (PerceiverAttention: ``norm1``, ``norm2``, ``to_q``,
  ``to_kv``, ``to_out``) and ``layers.N.1`` (FeedForward: LayerNorm ``0``, Linear ``1``, GELU, Linear ``3``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class ImageProjection(nn.Module):
    """image_embeds [B, embed_dim] -> tokens [B, n, cross_dim] (``proj`` then per-token LayerNorm ``norm``)."""

    def __init__(self, embed_dim: int, cross_dim: int, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, x: Tensor) -> Tensor:
        """[B, embed_dim] -> [B, tokens, cross_dim]."""
        x = self.proj(x.to(self.proj.weight.dtype))
        return self.norm(x.reshape(x.shape[0], self.tokens, -1))


class PerceiverAttention(nn.Module):
    """Latents attend to [features; latents]: x [B, N, dim], latents [B, L, dim] -> [B, L, dim]."""

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        """softmax((q s)(k s)^T) v with s = dim_head^-1/4 (the reference's split scaling), then ``to_out``."""
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)

        def heads(t: Tensor) -> Tensor:
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        return self.to_out((weight @ v).transpose(1, 2).reshape(b, n, -1))


class Resampler(nn.Module):
    """hidden states [B, T, embed_dim] -> [B, queries, cross_dim] (IP-Adapter-Plus's Perceiver resampler)."""

    def __init__(self, embed_dim: int, dim: int, cross_dim: int, queries: int, depth: int, heads: int,
                 dim_head: int = 64, ff_mult: int = 4) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, cross_dim)
        self.norm_out = nn.LayerNorm(cross_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, dim_head, heads),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                              nn.Linear(dim * ff_mult, dim, bias=False)),
            ])
            for _ in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, embed_dim] -> [B, queries, cross_dim]."""
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x.to(self.proj_in.weight.dtype))
        for attn, ff in self.layers:  # type: ignore[misc]
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))

