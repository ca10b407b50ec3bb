"""Cross-attention transformer blocks of the LDM UNet (Rombach et al. 2022, sec. 3.3), LDM key layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sumie.models.hooks import AttnSite, BlockKind, UNetOptions
from sumie.models.packed import Conv2d, Linear


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least fp32 and cast back (LDM ``GroupNorm32``): stable fp16/bf16 statistics."""

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, ...] -> [B, C, ...] in x's dtype."""
        dt = torch.promote_types(x.dtype, torch.float32)
        w = None if self.weight is None else self.weight.to(dt)
        b = None if self.bias is None else self.bias.to(dt)
        return F.group_norm(x.to(dt), self.num_groups, w, b, self.eps).to(x.dtype)


def _weight_state(linear: nn.Module) -> tuple[object, ...] | None:
    """What identifies a plain Linear's current weight (object, version, storage, dtype); None: do not cache.

    A LoRA patch installs a new tensor (another object), an in-place change (optimizer step, ``load_state_dict``)
    bumps the version, ``module.to()`` moves the storage. Wrapped layers (training adapters) and inference-mode
    weights (no version counter) are not cached.
    """
    if type(linear) not in (nn.Linear, Linear):
        return None
    w = linear.weight
    if w.is_inference():
        return None
    return (w, w._version, w.data_ptr(), w.dtype, w.device)


def _same_state(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    """Two :func:`_weight_state` results name the same weight object in the same version and storage."""
    return a[0] is b[0] and a[1:] == b[1:]


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None (Vaswani et al. 2017).

    Cross-attention keys and values depend only on the text context, which is the same at every step of a pass: they
    are computed once and reused while the context (compared by value) and the to_k / to_v weights are unchanged and
    no gradient is recorded - the same computation on the same inputs, so the output is bit for bit the same.
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, query_dim))  # LDM: to_out.0 (index 1 was dropout)
        # (context copy, to_k state, to_v state, k, v) of the last cross-attention call; not part of the state dict
        self._kv_cache: tuple[Tensor, tuple[object, ...], tuple[object, ...], Tensor, Tensor] | None = None

    def context_kv(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, heads, L, d] of a context [B, L, context_dim], reused across calls (class docstring)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # a compiled graph holds no Python cache
            return self._heads(self.to_k(ctx)), self._heads(self.to_v(ctx))
        ks, vs = _weight_state(self.to_k), _weight_state(self.to_v)
        cached = self._kv_cache
        if (cached is not None and ks is not None and vs is not None and _same_state(cached[1], ks)
                and _same_state(cached[2], vs) and _same_tensor(cached[0], ctx)):
            return cached[3], cached[4]
        k, v = self._heads(self.to_k(ctx)), self._heads(self.to_v(ctx))
        self._kv_cache = None if ks is None or vs is None else (ctx.clone(), ks, vs, k, v)
        return k, v

    def _heads(self, t: Tensor) -> Tensor:
        """[B, L, heads * d] -> [B, heads, L, d]."""
        return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None, options: UNetOptions | None = None,
                site: AttnSite | None = None) -> Tensor:
        """x [B, N, query_dim], context [B, L, context_dim] -> [B, N, query_dim]; hooks from ``options`` at ``site``."""
        ctx = x if context is None else context
        b, n, _ = x.shape
        hooked = not (options is None or site is None or options.empty)
        if hooked:
            for patch in options.attn_inputs:  # type: ignore[union-attr]
                ctx = patch(x, ctx, site, options)  # type: ignore[arg-type]
        q = self._heads(self.to_q(x))
        if context is None:
            k, v = self._heads(self.to_k(ctx)), self._heads(self.to_v(ctx))
        else:  # the text context (or what an input patch made of it): the same at every step of a pass
            k, v = self.context_kv(ctx)
        if not hooked:
            out = F.scaled_dot_product_attention(q, k, v)
            return self.to_out(out.transpose(1, 2).reshape(b, n, -1))
        assert options is not None and site is not None
        if options.attention is not None:
            out = options.attention(q, k, v, site, options)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        for extra_kv in options.extra_kv if site.kind == "cross" else ():
            extra = extra_kv(site, options)
            if extra is None:
                continue
            ek = self._heads(extra.k.to(q.dtype).expand(b, -1, -1))
            ev = self._heads(extra.v.to(q.dtype).expand(b, -1, -1))
            scale = extra.scale
            if isinstance(scale, Tensor):
                scale = scale.to(q.dtype).view(-1, 1, 1, 1)
            out = out + F.scaled_dot_product_attention(q, ek, ev) * scale
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """Same shape, dtype, device and values (a NaN never matches: the keys are then recomputed)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return bool(torch.equal(a, b))


class GEGLU(nn.Module):
    """Gated GELU projection dim -> inner (Shazeer 2020): ``a * gelu(g)`` with [a, g] = proj(x)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        """[..., dim] -> [..., inner]."""
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x expansion; keys ``net.0.proj``, ``net.2`` (index 1 is LDM's dropout slot)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim))

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

    def forward(self, x: Tensor, context: Tensor, options: UNetOptions | None = None,
                sites: tuple[AttnSite, AttnSite] | None = None) -> Tensor:
        """x [B, N, dim], context [B, L, context_dim] -> [B, N, dim]; ``sites`` = (self, cross) for the hooks."""
        s_self, s_cross = sites if sites is not None else (None, None)
        merge = None
        if options is not None and options.token_merge is not None and s_self is not None:
            merge = options.token_merge(x, s_self, options)  # ToMe: self-attention on merged tokens
        if merge is None:
            x = x + self.attn1(self.norm1(x), None, options, s_self)
        else:
            x = x + merge[1](self.attn1(merge[0](self.norm1(x)), None, options, s_self))
        x = x + self.attn2(self.norm2(x), context, options, s_cross)
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
            self.proj_in: nn.Module = Linear(channels, inner)
            self.proj_out: nn.Module = Linear(inner, channels)
        else:
            self.proj_in = Conv2d(channels, inner, kernel_size=1)
            self.proj_out = Conv2d(inner, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor, options: UNetOptions | None = None,
                block: tuple[BlockKind, int] | None = None) -> Tensor:
        """x [B, C, H, W], context [B, L, context_dim] -> [B, C, H, W]; ``block`` locates it for the hooks."""
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if self.use_linear:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, -1))
        else:
            x = self.proj_in(x).flatten(2).transpose(1, 2)
        hooked = options is not None and block is not None and not options.empty
        for i, layer in enumerate(self.transformer_blocks):
            sites = None
            if hooked:
                sites = (AttnSite(block, i, "self", (h, w)), AttnSite(block, i, "cross", (h, w)))  # type: ignore[arg-type]
            x = layer(x, context, options, sites)
        if self.use_linear:
            x = self.proj_out(x).transpose(1, 2).reshape(b, -1, h, w).contiguous()  # not channels-last
        else:
            x = self.proj_out(x.transpose(1, 2).reshape(b, -1, h, w))
        return x + x_in
