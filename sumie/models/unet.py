"""LDM / sgm ``UNetModel`` (Rombach et al. 2022; Podell et al. 2023) with the original checkpoint key layout.

State-dict keys are those under ``model.diffusion_model.`` in SD1/SD2/SDXL single-file checkpoints:
``time_embed``, ``label_emb`` (SDXL), ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sumie.configs import UNetConfig
from sumie.models.attention import GroupNorm32, SpatialTransformer
from sumie.models.hooks import BlockKind, Residuals, UNetOptions
from sumie.models.packed import Conv2d, Linear


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [N] -> [N, dim] in fp32, cos half first (LDM ``timestep_embedding``)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def guidance_scale_embedding(w: Tensor, dim: int) -> Tensor:
    """LCM's guidance-scale embedding [N] -> [N, dim] in fp32: sinusoids of 1000 w, sin half first (VDM's
    ``get_timestep_embedding`` as diffusers' ``get_guidance_scale_embedding``; w = CFG scale - 1)."""
    half = dim // 2
    # float32 in diffusers' order: at w * 1000 ~ 1e4 radians a last-bit change of a frequency moves sin by ~1e-3
    step = torch.tensor(10000.0, device=w.device).log() / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -step)
    args = (w.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sdxl_adm_vector(pooled: Tensor, time_ids: Tensor, embed_dim: int = 256) -> Tensor:
    """SDXL ADM input y [B, P + 6*embed_dim]: pooled text [B, P] then each size/crop id embedded [B, 6].

    time_ids per row: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) for the base model,
    (orig_h, orig_w, crop_top, crop_left, aesthetic_score) for the refiner (Podell et al. 2023, sec. 2.2).
    """
    b = pooled.shape[0]
    ids = timestep_embedding(time_ids.reshape(-1), embed_dim).reshape(b, -1)
    return torch.cat([pooled, ids.to(pooled.dtype)], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with an additive timestep embedding and a 1x1 skip when widths differ."""

    def __init__(self, in_ch: int, emb_ch: int, out_ch: int, norm_groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(norm_groups, in_ch), nn.SiLU(), Conv2d(in_ch, out_ch, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_ch, out_ch))
        # Index 2 is LDM's dropout slot, kept so the conv stays at out_layers.3.
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_groups, out_ch), nn.SiLU(), nn.Identity(),
            Conv2d(out_ch, out_ch, 3, padding=1),
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if in_ch == out_ch else Conv2d(in_ch, out_ch, kernel_size=1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x [B, in_ch, H, W], emb [B, emb_ch] -> [B, out_ch, H, W]."""
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (key ``op``): [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.op = Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H', W']."""
        return self.op(x)


class Upsample(nn.Module):
    """Nearest upsampling to ``size`` (2x by default) then 3x3 conv (key ``conv``)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """[B, C, H, W] -> [B, C, *size] (size defaults to 2H, 2W, which is what LDM does)."""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


class GuidanceProjection(nn.Module):
    """LCM's ``cond_proj``: the guidance-scale embedding [B, dim] -> [B, model_channels], no bias (Luo et al. 2023)."""

    def __init__(self, dim: int, channels: int) -> None:
        super().__init__()
        self.cond_proj = Linear(dim, channels, bias=False)

    def forward(self, w: Tensor, dtype: torch.dtype) -> Tensor:
        """Guidance w [B] -> [B, channels] in ``dtype``, added to the sinusoidal timestep embedding."""
        return self.cond_proj(guidance_scale_embedding(w, self.cond_proj.in_features).to(dtype))


class UNetBlock(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks (LDM ``TimestepEmbedSequential``)."""

    def forward(
        self, x: Tensor, emb: Tensor, context: Tensor, size: Sequence[int] | None = None,
        options: UNetOptions | None = None, where: tuple[BlockKind, int] | None = None,
    ) -> Tensor:
        """x [B, C, H, W] -> [B, C', H', W']; ``size`` is the target size of a trailing Upsample, ``where`` the
        block's place for the attention hooks in ``options``."""
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, options, where)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetEncoder(nn.Module):
    """The timestep / label embeddings, input blocks and middle block of LDM's ``UNetModel``: the part a ControlNet
    copies (Zhang et al. 2023), built once here for both."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.config = cfg
        ch = cfg.model_channels
        emb_ch = ch * 4
        groups = cfg.norm_groups
        levels = len(cfg.channel_mult)
        if len(cfg.transformer_depth) != levels:
            raise ValueError(f"transformer_depth {cfg.transformer_depth} needs one entry per level")

        self.time_embed = nn.Sequential(Linear(ch, emb_ch), nn.SiLU(), Linear(emb_ch, emb_ch))
        self.label_emb: nn.Sequential | None = None
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(), Linear(emb_ch, emb_ch))
            )
        # LCM single files keep diffusers' name for it: model.diffusion_model.time_embedding.cond_proj.weight
        self.time_embedding: GuidanceProjection | None = None
        if cfg.guidance_embed_dim is not None:
            self.time_embedding = GuidanceProjection(cfg.guidance_embed_dim, ch)

        self.input_blocks = nn.ModuleList([UNetBlock([Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        self.skip_channels = [ch]  # width of each input block's output
        cur = ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(cur, emb_ch, mult * ch, groups)]
                cur = mult * ch
                if cfg.attends(level):
                    layers.append(self._attn(cur, cfg.transformer_depth[level]))
                self.input_blocks.append(UNetBlock(layers))
                self.skip_channels.append(cur)
            if level != levels - 1:
                self.input_blocks.append(UNetBlock([Downsample(cur)]))
                self.skip_channels.append(cur)

        self.middle_block = UNetBlock(
            [
                ResBlock(cur, emb_ch, cur, groups),
                self._attn(cur, cfg.transformer_depth_middle),
                ResBlock(cur, emb_ch, cur, groups),
            ]
        )

    def _attn(self, width: int, depth: int) -> SpatialTransformer:
        cfg = self.config
        if cfg.num_head_channels != -1:
            heads, dim_head = width // cfg.num_head_channels, cfg.num_head_channels
        else:
            heads, dim_head = cfg.num_heads, width // cfg.num_heads
        return SpatialTransformer(width, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer,
                                  cfg.norm_groups)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the parameters; inputs are cast to it."""
        return self.time_embed[0].weight.dtype

    def embed(self, timesteps: Tensor, batch: int, y: Tensor | None = None,
              guidance: Tensor | None = None) -> Tensor:
        """The block input emb [B, 4 * model_channels] from t [B] (or scalar), y [B, adm] (SDXL) and the LCM
        guidance w [B] (or scalar; None adds nothing, as diffusers' UNet)."""
        dtype = self.dtype
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(batch)
        t_emb = timestep_embedding(timesteps, self.config.model_channels).to(dtype)
        if guidance is not None:
            if self.time_embedding is None:
                raise ValueError("this UNet has no guidance embedding (not LCM-distilled): pass guidance=None")
            t_emb = t_emb + self.time_embedding(guidance.expand(batch) if guidance.ndim == 0 else guidance, dtype)
        emb = self.time_embed(t_emb)
        if self.label_emb is not None:
            if y is None:
                raise ValueError("this UNet has an ADM label embedding (SDXL): pass y [B, adm_in_channels]")
            emb = emb + self.label_emb(y.to(dtype))
        return emb


class UNetModel(UNetEncoder):
    """Noise/velocity predictor eps(x_t, t, c) of SD1, SD2, SDXL and the SDXL refiner, from a UNetConfig."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__(cfg)
        ch = cfg.model_channels
        emb_ch = ch * 4
        groups = cfg.norm_groups
        levels = len(cfg.channel_mult)
        skip_chs = list(self.skip_channels)
        cur = skip_chs[-1]

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            mult = cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(cur + skip_chs.pop(), emb_ch, mult * ch, groups)]
                cur = mult * ch
                if cfg.attends(level):
                    layers.append(self._attn(cur, cfg.transformer_depth[level]))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(cur))
                self.output_blocks.append(UNetBlock(layers))

        self.out = nn.Sequential(
            GroupNorm32(groups, ch), nn.SiLU(), Conv2d(ch, cfg.out_channels, 3, padding=1)
        )
        # training: recompute each block's activations in the backward pass instead of keeping them (Chen et al.
        # 2016, torch.utils.checkpoint); only while autograd records, so sampling is unchanged
        self.gradient_checkpointing = False

    def _block(self, block: UNetBlock, h: Tensor, emb: Tensor, context: Tensor, size: Sequence[int] | None,
               options: UNetOptions | None, where: tuple[BlockKind, int]) -> Tensor:
        """One block's forward, under gradient checkpointing when it is on and autograd records."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, size, options, where, use_reentrant=False)
        return block(h, emb, context, size, options, where)

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        y: Tensor | None = None,
        control: Residuals | None = None,
        options: UNetOptions | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """x [B, in_ch, H, W], t [B] (or scalar), context [B, L, ctx], y [B, adm] -> [B, out_ch, H, W].

        The output has x's dtype; the network runs in the parameters' dtype. ``control``: residuals added at the
        encoder, middle and skip connections (:class:`~sumie.models.hooks.Residuals`: ControlNet, T2I-Adapter);
        ``options``: attention hooks and per-call facts (:class:`~sumie.models.hooks.UNetOptions`);
        ``guidance``: w [B] (or scalar) for UNets with a guidance embedding (LCM; w = CFG scale - 1), added to the
        timestep embedding through ``time_embedding.cond_proj`` (None adds nothing, as diffusers' UNet).
        """
        dtype = self.dtype
        emb = self.embed(timesteps, x.shape[0], y, guidance)
        context = context.to(dtype)
        n_blocks = len(self.input_blocks)
        if control is not None and max(len(control.encoder), len(control.skips)) > n_blocks:
            raise ValueError(f"control residuals for {max(len(control.encoder), len(control.skips))} input blocks; "
                             f"this UNet has {n_blocks}")

        cache = options.deep_cache if options is not None else None
        branch = n_blocks  # DeepCache: the decoder input of output block n_blocks - 1 - depth is cached / reused
        reuse = False
        if cache is not None:
            branch = min(cache.depth, n_blocks - 1)
            key = (id(self), tuple(x.shape))
            reuse = cache.reuse(key)

        h = x.to(dtype)
        skips: list[Tensor] = []
        for i, block in enumerate(self.input_blocks):
            if reuse and i > branch:
                break
            h = self._block(block, h, emb, context, None, options, ("input", i))
            if control is not None and i < len(control.encoder) and control.encoder[i] is not None:
                h = h + control.encoder[i].to(dtype)  # type: ignore[union-attr]
            skips.append(h)
        if reuse:
            h = cache.feature  # type: ignore[union-attr, assignment]
        else:
            h = self._block(self.middle_block, h, emb, context, None, options, ("middle", 0))
            if control is not None and control.middle is not None:
                h = h + control.middle.to(dtype)

        first = n_blocks - 1 - branch if reuse else 0
        for j, block in enumerate(self.output_blocks):
            if j < first:
                continue
            if cache is not None and not reuse and j == n_blocks - 1 - branch:
                cache.store(key, h)
            skip = skips.pop()
            i = len(skips)
            if control is not None and i < len(control.skips) and control.skips[i] is not None:
                skip = skip + control.skips[i].to(dtype)  # type: ignore[union-attr]
            h = torch.cat([h, skip], dim=1)
            h = self._block(block, h, emb, context, skips[-1].shape[-2:] if skips else None, options, ("output", j))
        return self.out(h).to(x.dtype)
