"""VAE key maps: diffusers ``AutoencoderKL`` <-> LDM ``first_stage_model`` (prefix stripped), TAESD layouts.

Sumie's AutoencoderKL uses the LDM layout; Sumie's TAESD uses the published Sequential-index layout
of madebyollin/taesd under ``encoder.`` / ``decoder.`` prefixes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from sumie.checkpoints.keymaps.common import Entry, count_indices, rename_keys, unmapped_error
from sumie.configs import VAEConfig
from sumie.errors import CheckpointError

__all__ = [
    "diffusers_to_ldm_vae",
    "ldm_to_diffusers_vae",
    "vae_attention_to_conv",
    "infer_vae_config",
    "taesd_keys_to_sumie",
]

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
# Old diffusers (< 0.14) AttentionBlock names come first, so the reverse map ends on the current names.
_ATTN = {
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
}
_ATTN_PROJ_LDM = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _module_map(levels: int, blocks: int) -> list[Entry]:
    """(diffusers module, LDM module, renames) for a VAE with ``levels`` resolutions and up to ``blocks`` blocks."""
    m: list[Entry] = [("quant_conv", "quant_conv", None), ("post_quant_conv", "post_quant_conv", None)]
    for part in ("encoder", "decoder"):
        m += [
            (f"{part}.conv_in", f"{part}.conv_in", None),
            (f"{part}.conv_norm_out", f"{part}.norm_out", None),
            (f"{part}.conv_out", f"{part}.conv_out", None),
            (f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _RESNET),
            (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _RESNET),
            (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _ATTN),
        ]
    for i in range(levels):
        up = levels - 1 - i  # diffusers numbers decoder blocks from the bottom, LDM from the top
        m.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", None))
        m.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{up}.upsample.conv", None))
        for j in range(blocks):
            m.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _RESNET))
            m.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{up}.block.{j}", _RESNET))
    return m


def diffusers_to_ldm_vae(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> LDM ``first_stage_model`` keys (prefix stripped)."""
    levels = count_indices(sd, r"^decoder\.up_blocks\.(\d+)\.")
    blocks = count_indices(sd, r"^decoder\.up_blocks\.\d+\.resnets\.(\d+)\.")
    return vae_attention_to_conv(rename_keys(sd, _module_map(levels, blocks), "diffusers VAE"))


def ldm_to_diffusers_vae(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LDM ``first_stage_model`` keys (prefix stripped) -> diffusers ``AutoencoderKL`` state dict."""
    levels = count_indices(sd, r"^decoder\.up\.(\d+)\.")
    blocks = count_indices(sd, r"^decoder\.up\.\d+\.block\.(\d+)\.")
    flat = {k: (v.reshape(v.shape[0], v.shape[1]) if _ATTN_PROJ_LDM.match(k) and v.ndim > 2 else v)
            for k, v in sd.items()}  # 1x1 conv -> Linear
    return rename_keys(flat, _module_map(levels, blocks), "LDM VAE", reverse=True)


def vae_attention_to_conv(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """LDM-layout dict whose ``mid.attn_1.{q,k,v,proj_out}.weight`` may be Linear [C, C]: make them [C, C, 1, 1]."""
    out = dict(sd)
    for k, v in sd.items():
        if _ATTN_PROJ_LDM.match(k) and v.ndim != 4:
            if v.ndim not in (2, 3) or v.shape[2:].numel() != 1:
                raise CheckpointError(f"VAE attention weight {k} has unexpected shape {tuple(v.shape)}")
            out[k] = v.reshape(v.shape[0], v.shape[1], 1, 1)
    return out


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"VAE state dict lacks {key!r} (expected LDM layout without 'first_stage_model.')")
    return tuple(sd[key].shape)


def infer_vae_config(sd: Mapping[str, Tensor]) -> VAEConfig:
    """VAEConfig from the shapes of an LDM-layout VAE state dict; scaling/shift factors and groups stay default."""
    ch, in_channels = _shape(sd, "encoder.conv_in.weight")[:2]
    n_levels = count_indices(sd, r"^encoder\.down\.(\d+)\.")
    if n_levels <= 0:
        raise CheckpointError("VAE state dict has no 'encoder.down.N' blocks (not an LDM-layout VAE)")
    ch_mult = tuple(_shape(sd, f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(n_levels))
    num_res_blocks = count_indices(sd, r"^encoder\.down\.0\.block\.(\d+)\.")
    z_channels = _shape(sd, "decoder.conv_in.weight")[1]
    embed_dim = _shape(sd, "post_quant_conv.weight")[1]
    out_channels = _shape(sd, "decoder.conv_out.weight")[0]
    return VAEConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        embed_dim=embed_dim,
    )


# --------------------------------------------------------------------------------------------------- TAESD

# Inside one part (Sequential index N): conv weight/bias, or a Block's conv.{0,2,4} / skip.
_TAESD_INNER = re.compile(r"^(\d+)\.((?:conv\.[024]\.)?(?:weight|bias)|skip\.weight)$")
_TAESD_PARTS = ("encoder", "decoder")


def _taesd_inner(key: str, part: str, offset: int) -> str | None:
    m = _TAESD_INNER.match(key)
    return None if m is None else f"{part}.{int(m[1]) + offset}.{m[2]}"


def taesd_keys_to_sumie(sd: Mapping[str, Tensor], part: str | None = None) -> dict[str, Tensor]:
    """Any TAESD layout -> Sumie's (``encoder.N...`` / ``decoder.N...``, published Sequential indices).

    part='encoder'/'decoder': sd is one published file (``0.weight``, ``1.conv.0.weight``...) or one diffusers
    sub-module (``layers.N...``). part=None: sd holds prefixed keys (diffusers ``AutoencoderTiny``
    ``encoder.layers.N``/``decoder.layers.N``, ComfyUI ``taesd_encoder.N``/``taesd_decoder.N``, or Sumie's
    own), or one bare published part, recognised by its first conv (the decoder's index 0 is its Clamp).
    """
    if part is not None and part not in _TAESD_PARTS:
        raise CheckpointError(f"TAESD part must be 'encoder', 'decoder' or None, not {part!r}")
    keys = list(sd)
    if part is None and keys and all(k[:1].isdigit() for k in keys):
        part = "encoder" if "0.weight" in sd else "decoder"
    out: dict[str, Tensor] = {}
    bad: list[str] = []
    for key, value in sd.items():
        new: str | None = None
        if part is not None:
            if key.startswith("layers."):  # diffusers EncoderTiny/DecoderTiny alone: decoder lacks the Clamp
                new = _taesd_inner(key[len("layers.") :], part, 1 if part == "decoder" else 0)
            else:
                new = _taesd_inner(key, part, 0)
        elif key in ("vae_scale", "vae_shift"):  # ComfyUI's combined file: its own latent scaling scalars
            continue
        else:
            head, _, rest = key.partition(".")
            if head in _TAESD_PARTS and rest.startswith("layers."):  # diffusers AutoencoderTiny
                new = _taesd_inner(rest[len("layers.") :], head, 1 if head == "decoder" else 0)
            elif head in ("taesd_encoder", "taesd_decoder"):  # ComfyUI
                new = _taesd_inner(rest, head[len("taesd_") :], 0)
            elif head in _TAESD_PARTS:  # Sumie's own
                new = _taesd_inner(rest, head, 0)
        if new is None:
            bad.append(key)
        else:
            out[new] = value
    if bad:
        raise unmapped_error(bad, "TAESD")
    if not out:
        raise CheckpointError("TAESD state dict is empty")
    return out
