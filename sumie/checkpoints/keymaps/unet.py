"""UNet key maps: diffusers ``UNet2DConditionModel`` <-> LDM/sgm ``model.diffusion_model.*`` (prefix gone).

Also ``infer_unet_config``: read a UNetConfig off an LDM-layout state dict's keys and shapes. LCM-distilled UNets
add ``time_embedding.cond_proj.weight`` (the guidance-scale embedding); LCM single files keep that diffusers name
under ``model.diffusion_model.`` (diffusers' conversion script passes unknown keys through), so it maps to itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

from torch import Tensor

from sumie.checkpoints.keymaps.common import Entry, count_indices, rename_keys
from sumie.configs import UNetConfig
from sumie.errors import CheckpointError

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_DOWNSAMPLE = {"conv": "op"}
_UPSAMPLE = {"conv": "conv"}
_SAME: dict[str, str] = {}  # transformer internals are named identically in both layouts

_HINT = "; is this an SD1/SD2/SDXL UNet?"


def module_map(cfg: UNetConfig) -> list[Entry]:
    """Module-level correspondence for one UNet configuration."""
    nrb = cfg.num_res_blocks
    levels = len(cfg.channel_mult)
    m: list[Entry] = [
        ("conv_in", "input_blocks.0.0", None),
        ("time_embedding.linear_1", "time_embed.0", None),
        ("time_embedding.linear_2", "time_embed.2", None),
        ("add_embedding.linear_1", "label_emb.0.0", None),
        ("add_embedding.linear_2", "label_emb.0.2", None),
        # LCM's guidance embedding: single files keep the diffusers name under model.diffusion_model.
        ("time_embedding.cond_proj", "time_embedding.cond_proj", None),
        ("mid_block.resnets.0", "middle_block.0", _RESNET),
        ("mid_block.attentions.0", "middle_block.1", _SAME),
        ("mid_block.resnets.1", "middle_block.2", _RESNET),
        ("conv_norm_out", "out.0", None),
        ("conv_out", "out.2", None),
    ]
    for level in range(levels):
        for j in range(nrb):
            i = 1 + level * (nrb + 1) + j
            m.append((f"down_blocks.{level}.resnets.{j}", f"input_blocks.{i}.0", _RESNET))
            m.append((f"down_blocks.{level}.attentions.{j}", f"input_blocks.{i}.1", _SAME))
        if level != levels - 1:
            i = (level + 1) * (nrb + 1)
            m.append((f"down_blocks.{level}.downsamplers.0", f"input_blocks.{i}.0", _DOWNSAMPLE))
    for b in range(levels):
        level = levels - 1 - b
        for j in range(nrb + 1):
            i = b * (nrb + 1) + j
            m.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{i}.0", _RESNET))
            m.append((f"up_blocks.{b}.attentions.{j}", f"output_blocks.{i}.1", _SAME))
        if level != 0:
            i = b * (nrb + 1) + nrb
            idx = 2 if cfg.attends(level) else 1
            m.append((f"up_blocks.{b}.upsamplers.0", f"output_blocks.{i}.{idx}", _UPSAMPLE))
    return m


def diffusers_to_ldm_unet(sd: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Rename diffusers ``unet/`` keys to LDM keys; the tensors are the same objects (no copy)."""
    return rename_keys(sd, module_map(cfg), "diffusers UNet", hint=_HINT)


def ldm_to_diffusers_unet(sd: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Rename LDM keys (``model.diffusion_model.`` stripped) to diffusers keys; same tensor objects."""
    return rename_keys(sd, module_map(cfg), "LDM UNet", reverse=True, hint=_HINT)


def infer_encoder_config(sd: Mapping[str, Tensor]) -> UNetConfig:
    """Read the encoder half of a UNetConfig (embeddings, input blocks, middle block: what a UNet and a ControlNet
    share) from LDM-layout keys and shapes. ``out_channels`` is ``in_channels`` and ``context_dim`` 0 when the
    state dict has no output conv or no cross-attention (diffusers' SDXL "small" ControlNet); heads as in
    :func:`infer_unet_config`."""
    conv_in = sd.get("input_blocks.0.0.weight")
    if conv_in is None:
        raise CheckpointError("not an LDM UNet state dict: missing input_blocks.0.0.weight")
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    n_in = count_indices(sd, r"input_blocks\.(\d+)\.")
    downs = sorted(int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    num_res_blocks = (downs[0] - 1) if downs else n_in - 1
    levels = len(downs) + 1
    if num_res_blocks < 1 or n_in != 1 + levels * num_res_blocks + len(downs):
        raise CheckpointError(
            f"UNet input_blocks layout not understood ({n_in} blocks, downsamplers at {downs})"
        )
    channel_mult: list[int] = []
    transformer_depth: list[int] = []
    attends: list[bool] = []
    for level in range(levels):
        blocks = [1 + level * (num_res_blocks + 1) + j for j in range(num_res_blocks)]
        try:
            widths = {int(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]) for i in blocks}
        except KeyError as e:
            raise CheckpointError(f"not an LDM UNet state dict: missing {e.args[0]}") from None
        depths = {transformer_depth_of(sd, f"input_blocks.{i}.1") for i in blocks}
        has_attn = {f"input_blocks.{i}.1.norm.weight" in sd for i in blocks}
        if len(widths) != 1 or len(depths) != 1 or len(has_attn) != 1 or next(iter(widths)) % model_channels:
            raise CheckpointError(
                f"UNet level {level} has mixed widths {sorted(widths)} or transformer depths "
                f"{sorted(depths)}; only uniform per-level layouts (SD1/SD2/SDXL) are supported"
            )
        channel_mult.append(next(iter(widths)) // model_channels)
        transformer_depth.append(next(iter(depths)))
        attends.append(next(iter(has_attn)))

    attn2 = sorted(k for k in sd if k.endswith("attn2.to_k.weight"))
    proj_in = sorted(k for k in sd if k.endswith(".proj_in.weight"))
    context_dim = int(sd[attn2[0]].shape[1]) if attn2 else 0
    label = sd.get("label_emb.0.0.weight")
    cond_proj = sd.get("time_embedding.cond_proj.weight")  # [model_channels, guidance_embed_dim] (LCM)
    heads = {"num_heads": 8, "num_head_channels": -1} if context_dim == 768 else {"num_head_channels": 64}
    plain = all(a == (d > 0) for a, d in zip(attends, transformer_depth, strict=True))
    return UNetConfig(
        in_channels=in_channels,
        out_channels=in_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        transformer_depth=tuple(transformer_depth),
        transformer_depth_middle=transformer_depth_of(sd, "middle_block.1"),
        context_dim=context_dim,
        use_linear_in_transformer=bool(proj_in) and sd[proj_in[0]].ndim == 2,
        adm_in_channels=None if label is None else int(label.shape[1]),
        guidance_embed_dim=None if cond_proj is None else int(cond_proj.shape[1]),
        attention_levels=None if plain else tuple(attends),
        **heads,  # type: ignore[arg-type]
    )


def transformer_depth_of(sd: Mapping[str, Tensor], prefix: str) -> int:
    """Number of transformer blocks of the SpatialTransformer at ``prefix`` (0 when it has none or is absent)."""
    return count_indices(sd, re.escape(prefix) + r"\.transformer_blocks\.(\d+)\.")


def infer_unet_config(sd: Mapping[str, Tensor]) -> UNetConfig:
    """Read a UNetConfig from an LDM-layout state dict (``model.diffusion_model.`` stripped).

    Heads cannot be read from shapes (q/k/v are [heads*dim_head, C] either way), so they follow the families:
    context_dim 768 (SD1, CLIP-L) -> ``num_heads=8``; anything else (SD2, SDXL, refiner) ->
    ``num_head_channels=64``. ``norm_groups`` is not visible in shapes either and is taken as 32.
    """
    out_conv = sd.get("out.2.weight")
    if out_conv is None or "input_blocks.0.0.weight" not in sd:
        missing = "out.2.weight" if out_conv is None else "input_blocks.0.0.weight"
        raise CheckpointError(f"not an LDM UNet state dict: missing {missing}")
    cfg = infer_encoder_config(sd)
    nrb, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    for level in range(levels):
        first_out = (levels - 1 - level) * (nrb + 1)
        depths = {transformer_depth_of(sd, f"output_blocks.{first_out + j}.1") for j in range(nrb + 1)}
        if depths != {cfg.transformer_depth[level]}:
            raise CheckpointError(
                f"UNet level {level} has mixed transformer depths {sorted(depths | {cfg.transformer_depth[level]})}; "
                "only uniform per-level layouts (SD1/SD2/SDXL) are supported"
            )
    if not cfg.context_dim or not any(k.endswith(".proj_in.weight") for k in sd):
        raise CheckpointError("UNet has no cross-attention (attn2.to_k, proj_in): not an SD text-to-image UNet")
    return replace(cfg, out_channels=int(out_conv.shape[0]))
