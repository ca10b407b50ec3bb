"""A random-weight UNet of TINY["sd1"]'s shape and inputs for it, shared by the UNet tests."""

from __future__ import annotations

import torch
from torch import Tensor

from sumie.configs import TINY, UNetConfig
from sumie.models.unet import UNetModel

CFG = TINY["sd1"].unet  # 2 levels, attention on both, SD1 key layout (1x1 conv proj_in/out)


def random_unet(cfg: UNetConfig = CFG, seed: int = 0) -> UNetModel:
    """A UNet in eval mode with N(0, 0.2²) weights drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    m = UNetModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def unet_inputs(cfg: UNetConfig = CFG, batch: int = 2, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """x [batch, in, 8, 8], t (900, 20), context [batch, 5, context_dim]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, 8, 8, generator=g)
    t = torch.tensor([900.0, 20.0][:batch])
    ctx = torch.randn(batch, 5, cfg.context_dim, generator=g)
    return x, t, ctx
