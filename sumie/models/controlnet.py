"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"), original keys.

State-dict keys are those under ``control_model.`` in the original single files (``control_v11p_sd15_canny.pth``):
a trainable copy of the UNet's encoder (``time_embed``, ``label_emb`` for SDXL, ``input_blocks``, ``middle_block``),
``input_hint_block`` (the control image -> latent-resolution features, added after the copy's ``conv_in``),
``zero_convs.i.0`` (one 1x1 conv per input block) and ``middle_block_out.0``. Its outputs are added, times the
unit's weight, to the UNet's skip connections and middle-block output (:class:`~sumie.models.hooks.Residuals`).
"""

from __future__ import annotations

from torch import Tensor, nn

from sumie.configs import UNetConfig
from sumie.models.hooks import Residuals
from sumie.models.packed import Conv2d
from sumie.models.unet import UNetEncoder

__all__ = ["HINT_CHANNELS", "ControlNetModel", "hint_block"]

# widths of the hint block's eight 3x3 convs before the last one (which goes to model_channels)
HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)


def hint_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """``input_hint_block``: eight 3x3 convs, stride 2 at the 3rd, 5th and 7th, SiLU between them:
    [B, 3, 8h, 8w] -> [B, model_channels, h, w] (keys 0, 2, ..., 14)."""
    layers: list[nn.Module] = []
    cur = in_channels
    for i, width in enumerate(HINT_CHANNELS):
        layers += [Conv2d(cur, width, 3, padding=1, stride=2 if i in (2, 4, 6) else 1), nn.SiLU()]
        cur = width
    layers.append(Conv2d(cur, out_channels, 3, padding=1))
    return nn.Sequential(*layers)


class ControlNetModel(UNetEncoder):
    """Residuals r = ControlNet(x_t, hint, t, c) for the UNet's skips and middle block, from the UNet's config."""

    def __init__(self, cfg: UNetConfig, hint_channels: int = 3) -> None:
        super().__init__(cfg)
        self.input_hint_block = hint_block(hint_channels, cfg.model_channels)
        self.zero_convs = nn.ModuleList([nn.Sequential(Conv2d(c, c, 1)) for c in self.skip_channels])
        mid = self.skip_channels[-1]
        self.middle_block_out = nn.Sequential(Conv2d(mid, mid, 1))

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                guidance: Tensor | None = None) -> Residuals:
        """x [B, in_ch, h, w] (the UNet's scaled input), hint [B, 3, 8h, 8w] RGB in [0, 1], t [B], context
        [B, L, ctx], y [B, adm] -> unweighted residuals: ``skips`` [B, C_i, h_i, w_i] per input block, ``middle``."""
        dtype = self.dtype
        emb = self.embed(timesteps, x.shape[0], y, guidance)
        context = context.to(dtype)
        guided_hint = self.input_hint_block(hint.to(dtype))
        h = x.to(dtype)
        skips: list[Tensor | None] = []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided_hint
            skips.append(zero(h))
        h = self.middle_block(h, emb, context)
        return Residuals(skips=skips, middle=self.middle_block_out(h))
