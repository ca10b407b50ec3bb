"""UNet key maps: diffusers ``UNet2DConditionModel`` <-> LDM/sgm ``model.diffusion_model.*`` (prefix gone).

Also ``infer_unet_config``: read a UNetConfig off an LDM-layout state dict's keys and shapes. LCM-distilled UNets
add ``time_embedding.cond_proj.weight`` (the guidance-scale embedding); LCM single files keep that diffusers name
under ``model.diffusion_model.`` (diffusers' conversion script passes unknown keys through), so it maps to itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

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


def _module_map(cfg: UNetConfig) -> list[Entry]:
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
            idx = 2 if cfg.transformer_depth[level] > 0 else 1
            m.append((f"up_blocks.{b}.upsamplers.0", f"output_blocks.{i}.{idx}", _UPSAMPLE))
    return m


def diffusers_to_ldm_unet(sd: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Rename diffusers ``unet/`` keys to LDM keys; the tensors are the same objects (no copy)."""
    return rename_keys(sd, _module_map(cfg), "diffusers UNet", hint=_HINT)


def ldm_to_diffusers_unet(sd: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Rename LDM keys (``model.diffusion_model.`` stripped) to diffusers keys; same tensor objects."""
    return rename_keys(sd, _module_map(cfg), "LDM UNet", reverse=True, hint=_HINT)


def infer_unet_config(sd: Mapping[str, Tensor]) -> UNetConfig:
    """Read a UNetConfig from an LDM-layout state dict (``model.diffusion_model.`` stripped).

    Heads cannot be read from shapes (q/k/v are [heads*dim_head, C] either way), so they follow the families:
    context_dim 768 (SD1, CLIP-L) -> ``num_heads=8``; anything else (SD2, SDXL, refiner) ->
    ``num_head_channels=64``. ``norm_groups`` is not visible in shapes either and is taken as 32.
    """
    try:
        conv_in = sd["input_blocks.0.0.weight"]
        out_conv = sd["out.2.weight"]
    except KeyError as e:
        raise CheckpointError(f"not an LDM UNet state dict: missing {e.args[0]}") from None
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    n_in = count_indices(sd, r"input_blocks\.(\d+)\.")
    downs = sorted(int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    num_res_blocks = (downs[0] - 1) if downs else n_in - 1
    levels = len(downs) + 1
    if num_res_blocks < 1 or n_in != 1 + levels * num_res_blocks + len(downs):
        raise CheckpointError(
            f"UNet input_blocks layout not understood ({n_in} blocks, downsamplers at {downs})"
        )

    def depth(prefix: str) -> int:
        return count_indices(sd, re.escape(prefix) + r"\.transformer_blocks\.(\d+)\.")

    channel_mult: list[int] = []
    transformer_depth: list[int] = []
    for level in range(levels):
        blocks = [1 + level * (num_res_blocks + 1) + j for j in range(num_res_blocks)]
        widths = {int(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]) for i in blocks}
        depths = {depth(f"input_blocks.{i}.1") for i in blocks}
        first_out = (levels - 1 - level) * (num_res_blocks + 1)
        depths |= {depth(f"output_blocks.{first_out + j}.1") for j in range(num_res_blocks + 1)}
        if len(widths) != 1 or len(depths) != 1 or next(iter(widths)) % model_channels:
            raise CheckpointError(
                f"UNet level {level} has mixed widths {sorted(widths)} or transformer depths "
                f"{sorted(depths)}; only uniform per-level layouts (SD1/SD2/SDXL) are supported"
            )
        channel_mult.append(next(iter(widths)) // model_channels)
        transformer_depth.append(next(iter(depths)))

    attn2 = sorted(k for k in sd if k.endswith("attn2.to_k.weight"))
    proj_in = sorted(k for k in sd if k.endswith(".proj_in.weight"))
    if not attn2 or not proj_in:
        raise CheckpointError("UNet has no cross-attention (attn2.to_k, proj_in): not an SD text-to-image UNet")
    context_dim = int(sd[attn2[0]].shape[1])
    label = sd.get("label_emb.0.0.weight")
    cond_proj = sd.get("time_embedding.cond_proj.weight")  # [model_channels, guidance_embed_dim] (LCM)
    heads = {"num_heads": 8, "num_head_channels": -1} if context_dim == 768 else {"num_head_channels": 64}
    return UNetConfig(
        in_channels=in_channels,
        out_channels=int(out_conv.shape[0]),
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        transformer_depth=tuple(transformer_depth),
        transformer_depth_middle=depth("middle_block.1"),
        context_dim=context_dim,
        use_linear_in_transformer=sd[proj_in[0]].ndim == 2,
        adm_in_channels=None if label is None else int(label.shape[1]),
        guidance_embed_dim=None if cond_proj is None else int(cond_proj.shape[1]),
        **heads,  # type: ignore[arg-type]
    )
