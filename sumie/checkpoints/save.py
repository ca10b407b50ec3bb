"""Write Sumie's networks back into the original single-file checkpoint layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from sumie.checkpoints.detect import TEXT_PARTS, UNET_PREFIX, VAE_PREFIX
from sumie.checkpoints.io import save_safetensors_atomic
from sumie.checkpoints.keymaps.clip import hf_to_openclip
from sumie.configs import ModelConfig, config_to_dict


def single_file_state_dict(
    config: ModelConfig, unet: nn.Module, vae: nn.Module, text_encoders: list[nn.Module],
    zero_terminal_snr: bool = False,
) -> dict[str, torch.Tensor]:
    """LDM/sgm keys (``model.diffusion_model.*``, ``first_stage_model.*``, text encoders in their own layout).

    Marker keys as A1111/ComfyUI read them: ``v_pred`` for v-prediction, ``ztsnr`` for a zero-terminal-SNR model.
    """
    out = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    out.update({VAE_PREFIX + k: v for k, v in vae.state_dict().items()})
    for (prefix, layout), te in zip(TEXT_PARTS[config.family], text_encoders, strict=True):
        sd = te.state_dict()
        if layout == "openclip":
            sd = hf_to_openclip(sd)
        out.update({prefix + k: v for k, v in sd.items()})
    if config.prediction == "v":
        out["v_pred"] = torch.tensor([])
    if zero_terminal_snr:
        out["ztsnr"] = torch.tensor([])
    return out


def random_single_file(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint with random weights at the given config's shapes, in the real file layout (for tests).

    ``seed``: 0 .. 2**64 - 1 (torch's generator range).
    """
    from sumie.models.clip import CLIPTextModel
    from sumie.models.unet import UNetModel
    from sumie.models.vae import AutoencoderKL

    with torch.random.fork_rng(devices=[]), torch.no_grad():  # seeded draws without touching the caller's RNG
        torch.manual_seed(seed)
        unet, vae = UNetModel(config.unet), AutoencoderKL(config.vae)
        tes = [CLIPTextModel(t) for t in config.text_encoders]
        for m in (unet, vae, *tes):
            for p in m.parameters():
                if not p.any():  # zero-initialised output layers would hide every later layer in tests
                    p.normal_(0.0, 0.02)
    return single_file_state_dict(config, unet, vae, tes)


def save_single_file(
    path: str | Path, config: ModelConfig, unet: nn.Module, vae: nn.Module, text_encoders: list[nn.Module],
    extra_metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None, zero_terminal_snr: bool = False,
) -> None:
    """Write a single-file .safetensors (atomic) that declares its exact config in the ``sumie.config`` metadata.

    ``dtype``: store floating-point tensors in this type (e.g. float16 halves the file); None keeps the modules' own.
    """
    metadata = {"sumie.config": json.dumps(config_to_dict(config)), **(extra_metadata or {})}
    sd = single_file_state_dict(config, unet, vae, text_encoders, zero_terminal_snr)
    out = {k: v.detach().cpu() for k, v in sd.items()}
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    save_safetensors_atomic(out, path, metadata=metadata)
