"""SwinIR (Liang et al. 2021, "SwinIR: Image Restoration Using Swin Transformer", arXiv:2108.10257): shallow conv,
residual Swin transformer blocks (RSTB), and one of the paper's reconstruction heads.

Heads (``upsampler``): ``pixelshuffle`` (classical SR: conv + LeakyReLU, then conv + PixelShuffle(2) per factor of 2,
or one PixelShuffle(3)), ``pixelshuffledirect`` (lightweight SR: one conv + PixelShuffle), ``nearest+conv``
(real-world SR: nearest x2 + conv + LeakyReLU per factor of 2, ``conv_hr``, ``conv_last``), ``""`` (scale 1:
restoration, the output is the input plus a residual). Key names follow the authors' ``network_swinir.py``
(``conv_first``, ``patch_embed.norm``, ``layers.N.residual_group.blocks.M.attn.relative_position_bias_table``,
``layers.N.conv``, ``norm``, ``conv_after_body``, ``conv_before_upsample.0``, ``upsample.K``...). The relative
position index and the shifted-window masks are computed here, not loaded (their stored copies are dropped by the
detector). Attention runs through ``F.scaled_dot_product_attention`` with the bias and mask as an additive mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SwinIR"]

_MEAN_RGB = (0.4488, 0.4371, 0.4040)  # DIV2K mean the authors subtract from 3-channel inputs
_MASKED = -100.0  # the authors' additive value between pixels of different regions of a shifted window


def _windows(x: Tensor, ws: int) -> Tensor:
    """[B, H, W, C] -> [B * H/ws * W/ws, ws * ws, C] (row-major windows)."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def _unwindows(x: Tensor, ws: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`_windows`: [B * nW, ws * ws, C] -> [B, H, W, C]."""
    c = x.shape[-1]
    x = x.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def _relative_index(ws: int) -> Tensor:
    """[ws*ws, ws*ws] index into the ((2ws-1)^2)-row bias table: (dy + ws - 1) * (2ws - 1) + (dx + ws - 1)."""
    ys, xs = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + ws - 1
    dx = xs[:, None] - xs[None, :] + ws - 1
    return dy * (2 * ws - 1) + dx


def _shift_mask(h: int, w: int, ws: int, shift: int, device: torch.device) -> Tensor:
    """[nW, ws*ws, ws*ws] additive mask of a cyclically shifted window partition: 0 within a region, -100 across."""
    region = torch.zeros(h, w, device=device)
    cuts = ((0, -ws), (-ws, -shift), (-shift, None))
    n = 0
    for y0, y1 in cuts:
        for x0, x1 in cuts:
            region[y0:y1, x0:x1] = n
            n += 1
    ids = _windows(region[None, :, :, None], ws).squeeze(-1)  # [nW, ws*ws]
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, _MASKED)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window with a learned relative position bias."""

    def __init__(self, dim: int, heads: int, ws: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads, self.ws = heads, ws
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, heads))
        self.register_buffer("relative_position_index", _relative_index(ws), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """x: [B * nW, N, C]; mask: [nW, N, N] additive or None -> [B * nW, N, C]."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        idx = self.relative_position_index.view(-1)
        bias = self.relative_position_bias_table[idx].view(n, n, self.heads).permute(2, 0, 1)  # [heads, N, N]
        add = bias.unsqueeze(0).to(q.dtype)
        if mask is not None:
            nw = mask.shape[0]
            add = (add + mask[:, None].to(q.dtype)).unsqueeze(0).expand(bw // nw, -1, -1, -1, -1)
            add = add.reshape(bw, self.heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=add)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """[..., dim] -> [..., dim]."""
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Swin transformer block: (shifted) window attention and an MLP, each pre-norm with a residual."""

    def __init__(self, dim: int, heads: int, ws: int, shift: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, ws, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """[B, H*W, C] -> same; H, W multiples of the window size."""
        h, w = size
        b, _, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        mask = None
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = _shift_mask(h, w, self.ws, self.shift, x.device)
        y = _unwindows(self.attn(_windows(y, self.ws), mask), self.ws, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    """``depth`` Swin blocks, every second one shifted by half a window."""

    def __init__(self, dim: int, depth: int, heads: int, ws: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SwinBlock(dim, heads, ws, 0 if i % 2 == 0 else ws // 2, mlp_ratio, qkv_bias)
                                    for i in range(depth))

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """[B, H*W, C] -> same."""
        for blk in self.blocks:
            x = blk(x, size)
        return x


def _resi_conv(dim: int, kind: str) -> nn.Module:
    """The conv closing an RSTB and the body: ``1conv`` (3x3) or ``3conv`` (3x3 to dim/4, 1x1, 3x3 back)."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, padding=1)
    q = dim // 4
    return nn.Sequential(nn.Conv2d(dim, q, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(q, q, 1),
                         nn.LeakyReLU(0.2), nn.Conv2d(q, dim, 3, padding=1))


def _tokens(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H*W, C]."""
    return x.flatten(2).transpose(1, 2)


def _image(x: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, H*W, C] -> [B, C, H, W]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size)


class RSTB(nn.Module):
    """Residual Swin transformer block: Swin layer, conv, and a residual over both."""

    def __init__(self, dim: int, depth: int, heads: int, ws: int, mlp_ratio: float, qkv_bias: bool,
                 resi: str) -> None:
        super().__init__()
        self.residual_group = BasicLayer(dim, depth, heads, ws, mlp_ratio, qkv_bias)
        self.conv = _resi_conv(dim, resi)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        """[B, H*W, C] -> same."""
        return _tokens(self.conv(_image(self.residual_group(x, size), size))) + x


class _PatchEmbed(nn.Module):
    """The optional LayerNorm after the first conv's tokens (``patch_embed.norm``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)


class SwinIR(nn.Module):
    """SwinIR for SR / restoration: [B, in_ch, H, W] -> [B, out_ch, H * scale, W * scale] (padded internally)."""

    def __init__(self, in_ch: int = 3, out_ch: int = 3, embed_dim: int = 180, depths: Sequence[int] = (6,) * 6,
                 num_heads: Sequence[int] = (6,) * 6, window_size: int = 8, mlp_ratio: float = 2.0,
                 scale: int = 4, upsampler: str = "pixelshuffle", resi_connection: str = "1conv",
                 patch_norm: bool = True, qkv_bias: bool = True, num_feat: int = 64, img_range: float = 1.0) -> None:
        super().__init__()
        if upsampler not in ("pixelshuffle", "pixelshuffledirect", "nearest+conv", ""):
            raise ValueError(f"unknown SwinIR upsampler {upsampler!r}")
        self.in_ch, self.out_ch, self.window_size, self.img_range = in_ch, out_ch, window_size, img_range
        self.scale = scale if upsampler else 1
        self.upsampler = upsampler
        mean = torch.tensor(_MEAN_RGB if in_ch == 3 else (0.0,) * in_ch).view(1, in_ch, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.conv_first = nn.Conv2d(in_ch, embed_dim, 3, padding=1)
        self.patch_embed = _PatchEmbed(embed_dim) if patch_norm else None
        self.layers = nn.ModuleList(RSTB(embed_dim, d, h, window_size, mlp_ratio, qkv_bias, resi_connection)
                                    for d, h in zip(depths, num_heads, strict=True))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = _resi_conv(embed_dim, resi_connection)
        if upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, padding=1), nn.LeakyReLU())
            steps: list[nn.Module] = []
            for f in ([3] if scale == 3 else [2] * int(math.log2(scale))):
                steps += [nn.Conv2d(num_feat, f * f * num_feat, 3, padding=1), nn.PixelShuffle(f)]
            self.upsample = nn.Sequential(*steps)
            self.conv_last = nn.Conv2d(num_feat, out_ch, 3, padding=1)
        elif upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(embed_dim, scale * scale * out_ch, 3, padding=1),
                                          nn.PixelShuffle(scale))
        elif upsampler == "nearest+conv":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, padding=1), nn.LeakyReLU())
            self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
            if scale == 4:
                self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
            self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, padding=1)
            self.conv_last = nn.Conv2d(num_feat, out_ch, 3, padding=1)
        else:
            self.conv_last = nn.Conv2d(embed_dim, out_ch, 3, padding=1)

    def features(self, x: Tensor) -> Tensor:
        """The deep feature extraction: [B, C, H, W] -> [B, C, H, W]."""
        size = (x.shape[2], x.shape[3])
        t = _tokens(x)
        if self.patch_embed is not None:
            t = self.patch_embed.norm(t)
        for layer in self.layers:
            t = layer(t, size)
        return _image(self.norm(t), size)

    def forward(self, x: Tensor) -> Tensor:
        """Reflect-pad to whole windows, normalise by the mean, run, crop to H * scale x W * scale."""
        h, w = x.shape[2:]
        ws = self.window_size
        x = F.pad(x, (0, (-w) % ws, 0, (-h) % ws), mode="reflect")
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        first = self.conv_first(x)
        feat = self.conv_after_body(self.features(first)) + first
        if self.upsampler == "pixelshuffle":
            out = self.conv_last(self.upsample(self.conv_before_upsample(feat)))
        elif self.upsampler == "pixelshuffledirect":
            out = self.upsample(feat)
        elif self.upsampler == "nearest+conv":
            y = self.conv_before_upsample(feat)
            for conv in (self.conv_up1, getattr(self, "conv_up2", None)):
                if conv is not None:
                    y = F.leaky_relu(conv(F.interpolate(y, scale_factor=2, mode="nearest")), 0.2)
            out = self.conv_last(F.leaky_relu(self.conv_hr(y), 0.2))
        else:
            out = x + self.conv_last(feat)
        out = out / self.img_range + mean
        return out[:, :, : h * self.scale, : w * self.scale]
