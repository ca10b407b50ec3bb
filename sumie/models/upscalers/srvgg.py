"""Real-ESRGAN's compact SRVGGNetCompact (Wang et al. 2021, arXiv:2107.10833; realesr-general-x4v3,
realesr-animevideov3): a plain stack of 3x3 convs with PReLU, a pixel shuffle, plus the nearest-upsampled input.

Keys: ``body.0`` (first conv), ``body.1`` (its PReLU), then ``num_conv`` pairs (conv, PReLU), then the last conv
``body.{2 * num_conv + 2}`` giving ``out_ch * scale**2`` channels.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SRVGGNetCompact"]


class SRVGGNetCompact(nn.Module):
    """[B, in_ch, H, W] -> [B, out_ch, H * scale, W * scale] (out_ch == in_ch: the base image is added)."""

    def __init__(self, in_ch: int = 3, out_ch: int = 3, feat: int = 64, num_conv: int = 16, scale: int = 4) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.scale = in_ch, out_ch, scale
        layers: list[nn.Module] = [nn.Conv2d(in_ch, feat, 3, padding=1), nn.PReLU(feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(feat, feat, 3, padding=1), nn.PReLU(feat)]
        layers.append(nn.Conv2d(feat, out_ch * scale * scale, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Residual on the nearest-upsampled input: pixel_shuffle(body(x)) + nearest(x)."""
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")
