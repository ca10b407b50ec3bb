"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models"), original TencentARC key layout.

State-dict keys are those of the original files (``t2iadapter_canny_sd14v1.pth``, ``ldm/modules/encoders/adapter.py``):

* ``Adapter`` (full): ``conv_in`` after a pixel unshuffle (8 for SD1, 16 for SDXL), then ``body.k`` for k = level *
  nums_rb + r, each ``block1`` (3x3) - ReLU - ``block2`` (ksize) plus the input, with ``in_conv`` (ksize) where the
  width changes and ``down_opt`` (2x2 average pooling, or ``down_opt.op``, a stride-2 3x3 conv) where the level halves
  the size. The SDXL adapters (``full_adapter_xl``) have the same keys in the flat layout; only the unshuffle (16) and
  which levels halve the size differ.
* ``Adapter_light`` (the color adapter): ``body.i`` per level, each ``in_conv`` (1x1 to width/4), ``body.j`` residual
  blocks of two 3x3 convs, ``out_conv`` (1x1 to the width).

The StyleAdapter (CLIP-vision tokens appended to the text context) is not a residual adapter and is not covered.
One feature map per level comes out; :func:`unet_sites` says which UNet input block's output each is added to (where
diffusers' ``UNet2DConditionModel`` adds ``down_intrablock_additional_residuals``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sumie.configs import UNetConfig
from sumie.models.hooks import Residuals
from sumie.models.unet import Downsample

__all__ = ["GreyMode", "Site", "T2IAdapterConfig", "T2IAdapterModel", "grey", "unet_sites"]

Site = int | Literal["middle"]
GreyMode = Literal["first", "luma", "mean"]

# ITU-R BT.601 luma, what PIL's convert("L") and OpenCV's COLOR_RGB2GRAY compute
_LUMA = (0.299, 0.587, 0.114)


def grey(hint: Tensor, mode: GreyMode = "first") -> Tensor:
    """RGB [B, 3, H, W] -> one channel [B, 1, H, W] for an adapter trained on grey images (canny, sketch).

    ``first``: the red channel, what A1111's ControlNet extension feeds (``PlugableAdapter.forward``:
    ``hint_in[:, 0:1]`` when ``conv_in`` takes 64 or 256 channels); ``luma``: BT.601 luma, what diffusers'
    ``StableDiffusionAdapterPipeline`` gets from a PIL "L" image and what TencentARC's scripts compute with OpenCV;
    ``mean``: the channel mean (ComfyUI's ``T2IAdapter.get_control``). All three agree on grey images (R = G = B),
    which is what the canny / sketch preprocessors produce.
    """
    if mode == "first":
        return hint[:, :1]
    if mode == "mean":
        return hint.mean(dim=1, keepdim=True)
    if mode == "luma":
        w = torch.tensor(_LUMA, dtype=hint.dtype, device=hint.device)
        return (hint * w[None, :, None, None]).sum(dim=1, keepdim=True)
    raise ValueError(f"unknown grey mode {mode!r}: use 'first', 'luma' or 'mean'")


def unet_sites(cfg: UNetConfig, n: int) -> tuple[Site, ...]:
    """The UNet input-block index (or ``"middle"``) each of ``n`` adapter features is added to, in LDM order.

    diffusers' rule (``UNet2DConditionModel.forward``): a level with cross-attention (``CrossAttnDownBlock2D``) adds
    its feature after its last resnet + attention, before the downsampler; a level without (``DownBlock2D``) adds it
    after the whole block, i.e. after the downsampler where there is one; features left over go to the middle block's
    output. SD1: (2, 5, 8, 11); SDXL (3 levels): (3, 5, 8, "middle").
    """
    per = cfg.num_res_blocks + 1  # input blocks per level: the resnets and a downsampler (none at the last level)
    levels = len(cfg.channel_mult)
    sites: list[Site] = []
    for level in range(min(n, levels)):
        last_res = level * per + cfg.num_res_blocks
        after_down = cfg.transformer_depth[level] == 0 and level < levels - 1
        sites.append(last_res + 1 if after_down else last_res)
    if n > levels + 1:
        raise ValueError(f"{n} adapter features for a UNet with {levels} levels and a middle block")
    if n == levels + 1:
        sites.append("middle")
    return tuple(sites)


@dataclass(frozen=True)
class T2IAdapterConfig:
    """Hyper-parameters of one adapter (TencentARC ``Adapter`` / ``Adapter_light`` arguments) and its UNet sites."""

    kind: Literal["full", "light"] = "full"
    cin: int = 64  # channels after the pixel unshuffle: hint channels * unshuffle ** 2
    unshuffle: int = 8  # 8: SD1 (features at the latent size), 16: SDXL (half the latent size)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    nums_rb: int = 2  # residual blocks per level (2 for full adapters, 4 for the light one)
    ksize: int = 1  # kernel of in_conv and block2 (full)
    conv_down: bool = False  # ``use_conv``: down_opt.op is a stride-2 3x3 conv, else 2x2 average pooling
    downs: tuple[bool, ...] = (False, True, True, True)  # which levels halve the size (SDXL: F, F, T, F)
    sites: tuple[Site, ...] = (2, 5, 8, 11)

    def __post_init__(self) -> None:
        if not len(self.channels) == len(self.downs) == len(self.sites):
            raise ValueError(f"channels {self.channels}, downs {self.downs} and sites {self.sites} need one entry "
                             "per level")
        if self.cin % self.unshuffle**2:
            raise ValueError(f"cin {self.cin} is not a multiple of unshuffle**2 = {self.unshuffle ** 2}")

    @property
    def hint_channels(self) -> int:
        """Channels of the image the adapter was trained on: 1 (grey: canny, sketch) or 3."""
        return self.cin // self.unshuffle**2


def _pool() -> nn.AvgPool2d:
    # ceil_mode as diffusers' AdapterBlock: odd sizes round up like the UNet's stride-2 conv, so the shapes match
    return nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)


class ResnetBlock(nn.Module):
    """Full adapter block: optional down_opt, optional in_conv (width change), x + block2(ReLU(block1(x)))."""

    def __init__(self, in_ch: int, out_ch: int, down: bool, ksize: int, conv_down: bool) -> None:
        super().__init__()
        self.down_opt: nn.Module | None = (Downsample(in_ch) if conv_down else _pool()) if down else None
        self.in_conv = nn.Conv2d(in_ch, out_ch, ksize, padding=ksize // 2) if in_ch != out_ch else None
        self.block1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.block2 = nn.Conv2d(out_ch, out_ch, ksize, padding=ksize // 2)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_ch, H, W] -> [B, out_ch, H', W']."""
        if self.down_opt is not None:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(F.relu(self.block1(x)))


class LightResBlock(nn.Module):
    """Light adapter residual block: x + block2(ReLU(block1(x))), both 3x3."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.block1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.block2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        return x + self.block2(F.relu(self.block1(x)))


class Extractor(nn.Module):
    """Light adapter level: optional 2x2 average pooling, in_conv (1x1 to width/4), residual blocks, out_conv."""

    def __init__(self, in_ch: int, out_ch: int, nums_rb: int, down: bool) -> None:
        super().__init__()
        mid = out_ch // 4
        self.down_opt = _pool() if down else None
        self.in_conv = nn.Conv2d(in_ch, mid, 1)
        self.body = nn.Sequential(*[LightResBlock(mid) for _ in range(nums_rb)])
        self.out_conv = nn.Conv2d(mid, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_ch, H, W] -> [B, out_ch, H', W']."""
        if self.down_opt is not None:
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


class T2IAdapterModel(nn.Module):
    """Adapter features F_c = Adapter(hint) (Mou et al. 2023, eq. 1), returned as UNet encoder residuals."""

    def __init__(self, cfg: T2IAdapterConfig, grey_mode: GreyMode = "first") -> None:
        super().__init__()
        self.config = cfg
        self.grey_mode: GreyMode = grey_mode
        self.conv_in: nn.Conv2d | None = None
        body: list[nn.Module] = []
        if cfg.kind == "full":
            self.conv_in = nn.Conv2d(cfg.cin, cfg.channels[0], 3, padding=1)
            cur = cfg.channels[0]
            for width, down in zip(cfg.channels, cfg.downs, strict=True):
                for r in range(cfg.nums_rb):
                    body.append(ResnetBlock(cur, width, down and r == 0, cfg.ksize, cfg.conv_down))
                    cur = width
        elif cfg.kind == "light":
            cur = cfg.cin
            for width, down in zip(cfg.channels, cfg.downs, strict=True):
                body.append(Extractor(cur, width, cfg.nums_rb, down))
                cur = width
        else:
            raise ValueError(f"unknown T2I-Adapter kind {cfg.kind!r}: use 'full' or 'light'")
        self.body = nn.ModuleList(body)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters; the hint is cast to it."""
        return next(self.parameters()).dtype

    def features(self, hint: Tensor) -> list[Tensor]:
        """hint [B, 3, H, W] RGB in [0, 1], H and W multiples of ``unshuffle`` -> one [B, C_l, h_l, w_l] per level."""
        cfg = self.config
        if hint.ndim != 4 or hint.shape[1] != 3:
            raise ValueError(f"T2I-Adapter hint must be [B, 3, H, W] RGB; got {tuple(hint.shape)}")
        h, w = hint.shape[-2:]
        if h % cfg.unshuffle or w % cfg.unshuffle:
            raise ValueError(f"T2I-Adapter hint {w}x{h} must be a multiple of {cfg.unshuffle} per side (the image "
                             f"size of an {'SDXL' if cfg.unshuffle == 16 else 'SD1'} adapter)")
        x = hint.to(self.dtype)
        if cfg.hint_channels == 1:
            x = grey(x, self.grey_mode)
        x = F.pixel_unshuffle(x, cfg.unshuffle)
        if self.conv_in is not None:
            x = self.conv_in(x)
        out: list[Tensor] = []
        per_level = cfg.nums_rb if cfg.kind == "full" else 1
        for level in range(len(cfg.channels)):
            for block in self.body[level * per_level:(level + 1) * per_level]:
                x = block(x)
            out.append(x)
        return out

    def forward(self, hint: Tensor) -> Residuals:
        """hint [B, 3, H, W] RGB in [0, 1] at the image size -> ``Residuals(encoder=...)`` (plus ``middle`` for the
        SDXL adapters' last feature), unweighted, at the UNet input-block indices in ``config.sites``."""
        feats = self.features(hint)
        blocks = [s for s in self.config.sites if s != "middle"]
        encoder: list[Tensor | None] = [None] * (max(blocks) + 1 if blocks else 0)
        middle: Tensor | None = None
        for site, f in zip(self.config.sites, feats, strict=True):
            if site == "middle":
                middle = f
            else:
                encoder[site] = f
        return Residuals(encoder=encoder, middle=middle)
