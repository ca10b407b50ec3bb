"""Rewrite single-file checkpoints: bake a standalone VAE in (A1111's "Bake in VAE"), change how tensors are stored."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sumie.checkpoints.detect import VAE_PREFIX
from sumie.checkpoints.io import file_metadata, load_state_dict, save_safetensors_atomic
from sumie.checkpoints.loader import vae_state_dict_from_file
from sumie.errors import CheckpointError

__all__ = ["FP8_MAX", "bake_vae", "convert_checkpoint"]

FP8_MAX = 448.0  # the largest finite float8_e4m3fn value
_TOKEN_EMBEDDING = "token_embedding.weight"  # CLIP (HF and OpenCLIP layouts) token tables: 49,408 rows each


def _check_paths(model_p: Path, out_p: Path, what: str) -> None:
    if model_p.is_dir():
        raise CheckpointError(f"{model_p}: a diffusers folder; {what} writes single-file checkpoints, give a "
                              ".safetensors or .ckpt model")
    if out_p.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{out_p}: the output must be a .safetensors file")


def bake_vae(model: str | os.PathLike[str], vae: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """Write ``model`` with the weights of ``vae`` in place of its own VAE to ``out`` (.safetensors, atomic).

    Every other tensor and the model file's metadata (config, native size, default CFG) are kept as they are; the
    VAE's tensors take the dtype the model stores its VAE in. The VAE must have the model's VAE architecture (the
    latent scaling factor stays the model's). Returns the number of tensors replaced.
    """
    model_p, out_p = Path(model), Path(out)
    _check_paths(model_p, out_p, "bake-vae")
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


def convert_checkpoint(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    fp8_embeddings: bool = False,
) -> dict[str, int]:
    """Write ``model`` to ``out`` (.safetensors, atomic) with its floating tensors stored in ``dtype``.

    ``fp8_embeddings`` stores the CLIP token embedding tables in float8 e4m3 (1 byte a value; they are a quarter of a
    small model and barely used at inference: one row per prompt token); Sumie's loader upcasts them, other tools
    need torch >= 2.1 to read them. Keys and metadata are kept. Returns how many tensors were cast and stored in fp8.
    """
    model_p, out_p = Path(model), Path(out)
    _check_paths(model_p, out_p, "convert")
    sd = load_state_dict(model_p)
    cast = fp8 = 0
    for key, tensor in sd.items():
        if not tensor.is_floating_point():
            continue
        if fp8_embeddings and key.endswith(_TOKEN_EMBEDDING):
            peak = tensor.float().abs().max().item()
            if not peak <= FP8_MAX:  # also catches NaN
                raise CheckpointError(f"{model_p}: {key} has values up to {peak:g}, beyond float8's +-{FP8_MAX:g}; "
                                      "convert without --fp8-embeddings")
            sd[key] = tensor.to(torch.float8_e4m3fn)
            fp8 += 1
        elif dtype is not None and tensor.dtype != dtype:
            sd[key] = tensor.to(dtype)
            cast += 1
    if fp8_embeddings and not fp8:
        raise CheckpointError(f"{model_p}: no CLIP token embedding (*.{_TOKEN_EMBEDDING}) in this checkpoint; "
                              "convert without --fp8-embeddings")
    save_safetensors_atomic({k: v.contiguous() for k, v in sd.items()}, out_p, metadata=file_metadata(model_p))
    return {"cast": cast, "fp8": fp8}
