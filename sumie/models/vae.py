"""AutoencoderKL: the KL-regularised image autoencoder of LDM (Rombach et al. 2022, ``first_stage_model``).

State-dict keys are the original LDM layout with ``first_stage_model.`` stripped
(``encoder.down.0.block.0.conv1.weight``, ``decoder.mid.attn_1.q.weight``, ``quant_conv.weight`` ...).
The module does not apply ``scaling_factor``: :meth:`AutoencoderKL.scale_latents` and
:meth:`AutoencoderKL.unscale_latents` do that for the pipeline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sumie.configs import VAEConfig
from sumie.models.packed import Conv2d

__all__ = ["AutoencoderKL", "DiagonalGaussian"]

_EPS = 1e-6


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with LDM's epsilon (1e-6)."""
    return nn.GroupNorm(groups, channels, eps=_EPS, affine=True)


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)) per latent element (Kingma & Welling 2014)."""

    def __init__(self, moments: Tensor) -> None:
        """moments: [B, 2*C, h, w], mean then log-variance along channels."""
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)

    @property
    def std(self) -> Tensor:
        """exp(logvar / 2): [B, C, h, w]."""
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        """exp(logvar): [B, C, h, w]."""
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * eps with eps drawn in fp32 on the generator's device (device-independent results)."""
        device = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        eps = eps.to(device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The mean: [B, C, h, w]."""
        return self.mean


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual (1x1 ``nin_shortcut`` when channels change); no time input."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        """[B, Cin, H, W] -> [B, Cout, H, W]."""
        inplace = not torch.is_grad_enabled()  # no autograd: SiLU and the residual reuse their input's memory
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.norm2(h)  # conv1's output goes before conv2's comes
        h = self.conv2(F.silu(h, inplace=inplace))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return h.add_(x) if inplace else x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head of width C.
        q, k, v = (p(h).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.squeeze(1).transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1) then 3x3 stride-2 conv: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H/2, W/2]."""
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, 2H, 2W]."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks) then optional ``downsample`` / ``upsample``."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, groups: int, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(n_blocks)
        )
        self.downsample = Downsample(out_channels) if resample == "down" else None
        self.upsample = Upsample(out_channels) if resample == "up" else None

    def stages(self) -> list[nn.Module]:
        """The blocks, then the resampling if any, in the order they run."""
        resample = [m for m in (self.downsample, self.upsample) if m is not None]
        return [*self.block, *resample]

    def forward(self, x: Tensor) -> Tensor:
        """[B, Cin, H, W] -> [B, Cout, H', W'] (H' = H/2, H or 2H)."""
        for stage in self.stages():
            x = stage(x)
        return x


class MidBlock(nn.Module):
    """ResnetBlock, self-attention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, h, w] -> [B, C, h, w]."""
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image [B, 3, H, W] -> moments [B, 2*z_channels, H/f, W/f], f = 2**(len(ch_mult)-1)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        chans = [cfg.ch * m for m in cfg.ch_mult]
        last = len(chans) - 1
        self.down = nn.ModuleList(
            Level(cfg.ch if i == 0 else chans[i - 1], c, cfg.num_res_blocks, g, "down" if i != last else None)
            for i, c in enumerate(chans)
        )
        self.mid = MidBlock(chans[-1], g)
        self.norm_out = _norm(chans[-1], g)
        self.conv_out = Conv2d(chans[-1], 2 * cfg.z_channels, 3, padding=1)

    def features(self, x: Tensor) -> Tensor:
        """The convolutional part (conv_in, down levels): [B, 3, H, W] -> [B, C_top, h, w]; local, so it can tile."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return h

    def head(self, h: Tensor) -> Tensor:
        """The global part (mid block with attention, output): [B, C_top, h, w] -> [B, 2*z_channels, h, w]."""
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, 2*z_channels, h, w]."""
        return self.head(self.features(x))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, 3, h*f, w*f]; ``up[i]`` is level i (``up[0]`` full res)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_groups
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = Conv2d(cfg.z_channels, chans[-1], 3, padding=1)
        self.mid = MidBlock(chans[-1], g)
        # Level i takes the channels of level i+1 (or of the mid block) and upsamples unless i == 0.
        self.up = nn.ModuleList(
            Level(chans[min(i + 1, len(chans) - 1)], c, cfg.num_res_blocks + 1, g, "up" if i != 0 else None)
            for i, c in enumerate(chans)
        )
        self.norm_out = _norm(chans[0], g)
        self.conv_out = Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def head(self, z: Tensor) -> Tensor:
        """The global part (conv_in, mid block with attention) at latent size: [B, z, h, w] -> [B, C_top, h, w]."""
        return self.mid(self.conv_in(z))

    def upsample(self, h: Tensor) -> Tensor:
        """The convolutional part (up levels, output): [B, C_top, h, w] -> [B, 3, H, W]; local, so it can tile."""
        for level in reversed(self.up):
            for stage in level.stages():  # stage by stage: a level's input is let go after its first block
                h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, z: Tensor) -> Tensor:
        """[B, z_channels, h, w] -> [B, 3, H, W]."""
        return self.upsample(self.head(z))


class AutoencoderKL(nn.Module):
    """LDM ``first_stage_model``: images in [-1, 1] <-> unscaled latents (multiply by scaling_factor outside)."""

    def __init__(self, cfg: VAEConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or VAEConfig()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        for m in self.modules():  # Winograd: SD1.5's decoder at 256² took 0.97x the time at +143 MB; not worth it
            if isinstance(m, Conv2d):
                m.winograd = False

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters (inputs are cast to it)."""
        return self.quant_conv.weight.dtype

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.config.ch_mult) - 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Images [B, 3, H, W] in [-1, 1] -> posterior over latents [B, embed_dim, H/8, W/8]."""
        moments = self.quant_conv(self.encoder(x.to(self.dtype)))
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents [B, embed_dim, h, w] -> images [B, 3, 8h, 8w], roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Reconstruction: decode(sample of encode(x)), [B, 3, H, W] -> [B, 3, H, W]."""
        return self.decode(self.encode(x).sample(generator))

    def scale_latents(self, z: Tensor) -> Tensor:
        """VAE latents -> diffusion latents: (z - shift_factor) * scaling_factor."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        """Diffusion latents -> VAE latents: z / scaling_factor + shift_factor."""
        return z / self.config.scaling_factor + self.config.shift_factor
