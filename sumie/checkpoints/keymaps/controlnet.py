"""ControlNet key maps: the file layouts people download -> the original keys of :mod:`sumie.models.controlnet`.

Original single files keep ``control_model.*`` (``control_v11p_sd15_canny.pth``), the fp16 safetensors conversions
drop that prefix, old 1.0 files add a whole SD model beside it. diffusers' ``ControlNetModel`` names its encoder
like ``UNet2DConditionModel`` (mapped by :mod:`.unet`'s module map) plus ``controlnet_cond_embedding``
(-> ``input_hint_block``), ``controlnet_down_blocks.i`` (-> ``zero_convs.i.0``) and ``controlnet_mid_block``
(-> ``middle_block_out.0``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import Tensor

from sumie.checkpoints.keymaps.common import Entry, count_indices, rename_keys
from sumie.checkpoints.keymaps.unet import module_map
from sumie.configs import UNetConfig

Layout = Literal["original", "diffusers", "control_lora"]

CONTROL_PREFIX = "control_model."
CONTROL_LORA_MARKER = "lora_controlnet"


def controlnet_layout(keys: set[str] | list[str]) -> Layout | None:
    """Which ControlNet layout a file's keys are in (prefix already stripped by :func:`original_keys` or not),
    or None when they are no ControlNet."""
    ks = set(keys)
    if CONTROL_LORA_MARKER in ks:
        return "control_lora"
    if "controlnet_cond_embedding.conv_in.weight" in ks and "controlnet_mid_block.weight" in ks:
        return "diffusers"
    for prefix in (CONTROL_PREFIX, ""):
        if f"{prefix}input_hint_block.0.weight" in ks and f"{prefix}zero_convs.0.0.weight" in ks:
            return "original"
    return None


def original_keys(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ControlNet's own tensors of an original-layout file: ``control_model.*`` with the prefix removed when
    the file has it (an old 1.0 file's ``model.diffusion_model.*``, VAE and text encoder are left out), else all."""
    if any(k.startswith(CONTROL_PREFIX) for k in sd):
        return {k[len(CONTROL_PREFIX):]: v for k, v in sd.items() if k.startswith(CONTROL_PREFIX)}
    return dict(sd)


def _control_entries(hint_convs: int, zero_convs: int) -> list[Entry]:
    """diffusers -> original for the parts only a ControlNet has (hint block, zero convs, middle-block out)."""
    m: list[Entry] = [("controlnet_cond_embedding.conv_in", "input_hint_block.0", None),
                      ("controlnet_cond_embedding.conv_out", f"input_hint_block.{2 * (hint_convs + 1)}", None),
                      ("controlnet_mid_block", "middle_block_out.0", None)]
    m += [(f"controlnet_cond_embedding.blocks.{j}", f"input_hint_block.{2 * (j + 1)}", None) for j in range(hint_convs)]
    m += [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0", None) for i in range(zero_convs)]
    return m


def diffusers_to_ldm_controlnet(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers ``ControlNetModel`` state dict to original keys (same tensor objects).

    The index arithmetic needs only the number of levels and ResBlocks per level, read from the keys; the rest of
    the config is read from the renamed state dict (:func:`~sumie.checkpoints.keymaps.unet.infer_encoder_config`).
    """
    levels = count_indices(sd, r"down_blocks\.(\d+)\.")
    nrb = count_indices(sd, r"down_blocks\.0\.resnets\.(\d+)\.")
    shape = UNetConfig(channel_mult=(1,) * max(levels, 1), num_res_blocks=max(nrb, 1),
                       transformer_depth=(0,) * max(levels, 1))
    entries = module_map(shape) + _control_entries(
        count_indices(sd, r"controlnet_cond_embedding\.blocks\.(\d+)\."),
        count_indices(sd, r"controlnet_down_blocks\.(\d+)\."),
    )
    return rename_keys(sd, entries, "diffusers ControlNet", hint="; is this a diffusers ControlNetModel file?")
