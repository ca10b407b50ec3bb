"""Bake a standalone VAE into a single-file checkpoint (A1111's "Bake in VAE"; ComfyUI's CheckpointSave)."""

from __future__ import annotations

import os
from pathlib import Path

from sumie.checkpoints.detect import VAE_PREFIX
from sumie.checkpoints.io import file_metadata, load_state_dict, save_safetensors_atomic
from sumie.checkpoints.loader import vae_state_dict_from_file
from sumie.errors import CheckpointError

__all__ = ["bake_vae"]


def bake_vae(model: str | os.PathLike[str], vae: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """Write ``model`` with the weights of ``vae`` in place of its own VAE to ``out`` (.safetensors, atomic).

    Every other tensor and the model file's metadata (config, native size, default CFG) are kept as they are; the
    VAE's tensors take the dtype the model stores its VAE in. The VAE must have the model's VAE architecture (the
    latent scaling factor stays the model's). Returns the number of tensors replaced.
    """
    model_p, out_p = Path(model), Path(out)
    if model_p.is_dir():
        raise CheckpointError(f"{model_p}: a diffusers folder; bake-vae writes single-file checkpoints, give a "
                              ".safetensors or .ckpt model")
    if out_p.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{out_p}: the output must be a .safetensors file")
    sd = load_state_dict(model_p)
    mine = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    if "decoder.conv_in.weight" not in mine:
        raise CheckpointError(f"{model_p}: no VAE in this checkpoint ({VAE_PREFIX}* keys); bake-vae needs a full "
                              "single-file model")
    new = vae_state_dict_from_file(vae)
    missing, extra = sorted(set(mine) - set(new)), sorted(set(new) - set(mine))
    if missing or extra:
        raise CheckpointError(f"{vae}: not the model's VAE architecture ({len(missing)} keys missing, e.g. "
                              f"{(missing or ['-'])[0]}; {len(extra)} unexpected, e.g. {(extra or ['-'])[0]}); "
                              "use a VAE made for this model family")
    for key, old in mine.items():
        tensor = new[key]
        if tensor.shape != old.shape:
            if tensor.numel() != old.numel():  # attention stored as linear [C, C] or 1x1 conv [C, C, 1, 1]
                raise CheckpointError(f"{vae}: {key} has shape {tuple(tensor.shape)}, the model's "
                                      f"{tuple(old.shape)}; use a VAE made for this model family")
            tensor = tensor.reshape(old.shape)
        sd[VAE_PREFIX + key] = tensor.to(old.dtype) if old.is_floating_point() else tensor
    save_safetensors_atomic({k: v.contiguous() for k, v in sd.items()}, out_p, metadata=file_metadata(model_p))
    return len(mine)

