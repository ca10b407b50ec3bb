"""Cross-attention transformer blocks of the LDM UNet (Rombach et al. 2022, sec. 3.3), LDM key layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least fp32 and cast back (LDM ``GroupNorm32``): stable fp16/bf16 statistics."""

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, ...] -> [B, C, ...] in x's dtype."""
        dt = torch.promote_types(x.dtype, torch.float32)
        w = None if self.weight is None else self.weight.to(dt)
        b = None if self.bias is None else self.bias.to(dt)
        return F.group_norm(x.to(dt), self.num_groups, w, b, self.eps).to(x.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None (Vaswani et al. 2017)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # LDM: to_out.0 (index 1 was dropout)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x [B, N, query_dim], context [B, L, context_dim] -> [B, N, query_dim]."""
        ctx = x if context is None else context
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.to_k(ctx).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(ctx).view(b, ctx.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU projection dim -> inner (Shazeer 2020): ``a * gelu(g)`` with [a, g] = proj(x)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        """[..., dim] -> [..., inner]."""
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x expansion; keys ``net.0.proj``, ``net.2`` (index 1 is LDM's dropout slot)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, dim] -> [B, N, dim]."""
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x [B, N, dim], context [B, L, context_dim] -> [B, N, dim]."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image-to-tokens transformer with residual: GroupNorm, proj_in, ``depth`` blocks, proj_out.

    ``use_linear``: Linear projections after flattening (SD2/SDXL) instead of 1x1 convs before it (SD1).
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, use_linear: bool,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(norm_groups, channels, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(channels, inner)
            self.proj_out: nn.Module = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, kernel_size=1)
            self.proj_out = nn.Conv2d(inner, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x [B, C, H, W], context [B, L, context_dim] -> [B, C, H, W]."""
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if self.use_linear:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, -1))
        else:
            x = self.proj_in(x).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x).transpose(1, 2).reshape(b, -1, h, w).contiguous()  # not channels-last
        else:
            x = self.proj_out(x.transpose(1, 2).reshape(b, -1, h, w))
        return x + x_in
