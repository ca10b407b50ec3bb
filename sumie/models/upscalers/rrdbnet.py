"""ESRGAN's RRDBNet (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution GAN", arXiv:1809.00219), as Real-ESRGAN
uses it (Wang et al. 2021, arXiv:2107.10833): x4 SR, and x2 / x1 by a pixel-unshuffle of the input first.

Parameter names follow BasicSR's layout (``conv_first``, ``body.N.rdb{1,2,3}.conv{1..5}``, ``conv_body``,
``conv_up{1..}``, ``conv_hr``, ``conv_last``); :mod:`sumie.models.upscalers.detect` renames the old ESRGAN layout
(``model.0``, ``model.1.sub.N.RDB1.conv1.0``...) and BSRGAN's (``RRDB_trunk``, ``trunk_conv``, ``upconv1``,
``HRconv``) to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RRDBNet"]

_SLOPE = 0.2  # LeakyReLU slope throughout
_RES = 0.2  # residual scaling of dense blocks and of RRDBs


def _conv(n_in: int, n_out: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1)


class DenseBlock(nn.Module):
    """Residual dense block: five 3x3 convs, conv k sees the input and every earlier output (paper Fig. 4)."""

    def __init__(self, feat: int, grow: int) -> None:
        super().__init__()
        for k in range(5):
            setattr(self, f"conv{k + 1}", _conv(feat + k * grow, feat if k == 4 else grow))

    def forward(self, x: Tensor) -> Tensor:
        """[B, feat, H, W] -> same shape; x + 0.2 * conv5(...)."""
        seen = [x]
        for k in range(1, 5):
            seen.append(F.leaky_relu(getattr(self, f"conv{k}")(torch.cat(seen, dim=1)), _SLOPE))
        return x + _RES * self.conv5(torch.cat(seen, dim=1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks, residual scaled by 0.2."""

    def __init__(self, feat: int, grow: int) -> None:
        super().__init__()
        self.rdb1 = DenseBlock(feat, grow)
        self.rdb2 = DenseBlock(feat, grow)
        self.rdb3 = DenseBlock(feat, grow)

    def forward(self, x: Tensor) -> Tensor:
        """[B, feat, H, W] -> same shape."""
        return x + _RES * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """RRDBNet: ``in_ch`` -> ``out_ch`` channels, ``2**num_up // unshuffle`` times larger.

    ``unshuffle``: pixel-unshuffle factor of the input (Real-ESRGAN x2plus: 2, x1: 4; 1: none); ``num_up``: nearest
    x2 upsampling steps, each followed by a conv and LeakyReLU (ESRGAN x4: 2).
    """

    def __init__(self, in_ch: int = 3, out_ch: int = 3, feat: int = 64, blocks: int = 23, grow: int = 32,
                 num_up: int = 2, unshuffle: int = 1) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.unshuffle, self.num_up = in_ch, out_ch, unshuffle, num_up
        self.scale = 2**num_up // unshuffle
        self.conv_first = _conv(in_ch * unshuffle**2, feat)
        self.body = nn.Sequential(*(RRDB(feat, grow) for _ in range(blocks)))
        self.conv_body = _conv(feat, feat)
        for k in range(num_up):
            setattr(self, f"conv_up{k + 1}", _conv(feat, feat))
        self.conv_hr = _conv(feat, feat)
        self.conv_last = _conv(feat, out_ch)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_ch, H, W] -> [B, out_ch, H * scale, W * scale] (reflect-padded to whole unshuffle cells, then
        cropped, as Real-ESRGAN's inference does)."""
        h, w = x.shape[2:]
        if self.unshuffle > 1:
            s = self.unshuffle
            x = F.pixel_unshuffle(F.pad(x, (0, (-w) % s, 0, (-h) % s), mode="reflect"), s)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for k in range(self.num_up):
            up = F.interpolate(feat, scale_factor=2, mode="nearest")
            feat = F.leaky_relu(getattr(self, f"conv_up{k + 1}")(up), _SLOPE)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), _SLOPE))
        return out[:, :, : h * self.scale, : w * self.scale]
