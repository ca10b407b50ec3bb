"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for
Convolutional Neural Networks"): 16 multiplications per 2x2 output tile and channel pair instead of 36.

Each 4x4 input tile d becomes V = Bᵀ d B and each 3x3 kernel g becomes U = G g Gᵀ (once, kept by the layer); the
16 positions of the 4x4 tiles are then 16 matrix products [tiles, C_in] x [C_in, C_out], and Aᵀ M A turns each
product tile back into 2x2 outputs. The transforms only add, subtract and halve, so the result is the convolution
within fp32 rounding (measured closer to a float64 convolution than oneDNN's direct one). The tiles are taken in
bands of rows (at most :data:`BAND_TILES` tiles per image) so that the transformed inputs and products stay in the
cache, and each image of a batch is computed alone, so an image's result does not depend on the batch it is in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BAND_TILES", "winograd_conv3x3", "winograd_weight"]

BAND_TILES = 128  # tiles per band: [16, 128, C] transformed inputs stay in L2 / L3 for the UNet's channel counts

_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
_AT = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]])
_KA = torch.kron(_AT, _AT)  # [4, 16]


def winograd_weight(weight: Tensor) -> Tensor:
    """[C_out, C_in, 3, 3] -> U = G g Gᵀ as [16, C_in, C_out] (computed in float64, returned in the weight's dtype)."""
    u = torch.einsum("ij,ocjk,lk->ilco", _G, weight.detach().to(torch.float64), _G)
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def winograd_conv3x3(x: Tensor, u: Tensor, bias: Tensor | None) -> Tensor:
    """[B, C_in, H, W] (H, W even) with U from :func:`winograd_weight` -> [B, C_out, H, W], stride 1, padding 1;
    the result is channels-last in memory."""
    b, c, h, w = x.shape
    o = u.shape[2]
    nh, nw = h // 2, w // 2
    ka = _KA.to(x.dtype)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1)).contiguous()  # [B, H+2, W+2, C]
    out = torch.empty(b, nh, 2, nw, 2, o, dtype=x.dtype)
    rows = max(1, BAND_TILES // nw)
    t = torch.empty(4, rows, w + 2, c, dtype=x.dtype)  # Bᵀ d: the band's rows transformed
    v = torch.empty(4, 4, rows, nw, c, dtype=x.dtype)  # Bᵀ d B: [4, 4, tiles of the band, C]
    for i in range(b):
        for r0 in range(0, nh, rows):
            r = min(rows, nh - r0)
            _input_transform(xp[i, 2 * r0 : 2 * r0 + 2 * r + 2], t[:, :r], v[:, :, :r])
            m = torch.bmm(v[:, :, :r].reshape(16, r * nw, c), u)  # [16, tiles, C_out]
            y = torch.mm(ka, m.view(16, -1)).view(2, 2, r, nw, o).permute(2, 0, 3, 1, 4)  # [r, 2, nw, 2, C_out]
            if bias is None:
                out[i, r0:r0 + r].copy_(y)
            else:
                torch.add(y, bias, out=out[i, r0:r0 + r])
    return out.view(b, h, w, o).permute(0, 3, 1, 2)


def _input_transform(band: Tensor, t: Tensor, v: Tensor) -> None:
    """Padded rows [2r+2, W+2, C] of one image -> V = Bᵀ d B of its r x W/2 tiles into ``v`` [4, 4, r, W/2, C],
    separably: Bᵀ on the rows into ``t`` [4, r, W+2, C], then B on the columns (additions and subtractions only;
    a [16x16] product on the gathered tiles took 1.7x as long)."""
    r, nw = v.shape[2], v.shape[3]
    _bt(*(band[k : k + 2 * r : 2] for k in range(4)), t)
    _bt(*(t[:, :, k : k + 2 * nw : 2] for k in range(4)), v.transpose(0, 1))


def _bt(d0: Tensor, d1: Tensor, d2: Tensor, d3: Tensor, out: Tensor) -> None:
    """Bᵀ along one axis: out[0..3] = d0 - d2, d1 + d2, d2 - d1, d1 - d3."""
    torch.sub(d0, d2, out=out[0])
    torch.add(d1, d2, out=out[1])
    torch.sub(d2, d1, out=out[2])
    torch.sub(d1, d3, out=out[3])
