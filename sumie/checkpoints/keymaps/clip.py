"""CLIP text encoder key maps: OpenCLIP layout <-> Hugging Face transformers layout, and config inference.

The OpenCLIP text layout is what SD2 (``cond_stage_model.model.*``), SDXL's second encoder
(``conditioner.embedders.1.model.*``) and the SDXL refiner (``conditioner.embedders.0.model.*``) store;
callers strip that prefix first. The transformers layout is the state dict of
:class:`sumie.models.clip.CLIPTextModel`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from sumie.configs import CLIP_G, CLIP_H, CLIP_L, TextEncoderConfig
from sumie.errors import CheckpointError

_HF_LAYER = "text_model.encoder.layers.{}."
_HF_FINAL_NORM = "text_model.final_layer_norm."
_HF_TOKEN = "text_model.embeddings.token_embedding.weight"
_HF_POSITION = "text_model.embeddings.position_embedding.weight"
_HF_POSITION_IDS = "text_model.embeddings.position_ids"  # a derived buffer some files carry; never needed
_HF_PROJECTION = "text_projection.weight"
_HF_BARE_ROOTS = ("embeddings", "encoder", "final_layer_norm")

# Per-block modules that only get renamed (OpenCLIP -> transformers name); attention q/k/v is split apart.
_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
_OPENCLIP_IGNORED = re.compile(r"(logit_scale|logit_bias|attn_mask|visual\..*)")
_KNOWN_TEXT_ENCODERS: dict[str, TextEncoderConfig] = {c.name: c for c in (CLIP_L, CLIP_H, CLIP_G)}


def openclip_to_hf(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """OpenCLIP text-model state dict (prefix stripped) -> (transformers-layout dict, ignored keys).

    ``logit_scale``, ``logit_bias``, ``attn_mask`` and ``visual.*`` are not part of the text encoder: they are
    left out and listed in the second return value. Any other key that is not understood raises
    :class:`CheckpointError`. ``attn.in_proj_*`` is split into q/k/v views (no copy); ``text_projection``
    ([width, proj], applied as ``x @ P``) becomes the bias-free Linear weight ``P.T`` ([proj, width]).
    """
    out: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in sd.items():
        if _OPENCLIP_IGNORED.fullmatch(key):
            ignored.append(key)
        elif key == "token_embedding.weight":
            out[_HF_TOKEN] = value
        elif key == "positional_embedding":
            out[_HF_POSITION] = value
        elif key == "text_projection":
            if value.ndim != 2:
                raise CheckpointError(f"text_projection should be 2-D, got shape {tuple(value.shape)}")
            out[_HF_PROJECTION] = value.t().contiguous()
        elif key.startswith("ln_final.") and key[len("ln_final.") :] in ("weight", "bias"):
            out[_HF_FINAL_NORM + key[len("ln_final.") :]] = value
        elif (m := _OPENCLIP_BLOCK.fullmatch(key)) is not None:
            out.update(_block_openclip_to_hf(key, _HF_LAYER.format(int(m.group(1))), m.group(2), value))
        else:
            raise CheckpointError(f"unknown OpenCLIP text encoder key {key!r}")
    return out, ignored


def _block_openclip_to_hf(key: str, prefix: str, rest: str, value: Tensor) -> dict[str, Tensor]:
    """One OpenCLIP resblock tensor -> its transformers-layout tensor(s) under ``prefix``."""
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        if value.shape[0] % 3 != 0:
            raise CheckpointError(f"{key} has shape {tuple(value.shape)}; its first dim must be 3 * width")
        kind = "weight" if rest.endswith("weight") else "bias"
        q, k, v = value.chunk(3, dim=0)
        return {f"{prefix}self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v), strict=True)}
    module, _, param = rest.rpartition(".")
    if module in _BLOCK_RENAMES and param in ("weight", "bias"):
        return {f"{prefix}{_BLOCK_RENAMES[module]}.{param}": value}
    raise CheckpointError(f"unknown OpenCLIP text encoder key {key!r}")


def hf_to_openclip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Transformers-layout text encoder state dict -> OpenCLIP layout (the inverse of :func:`openclip_to_hf`).

    q/k/v are concatenated into ``attn.in_proj_*``; ``text_projection.weight`` is transposed back.
    ``text_model.embeddings.position_ids`` (a derived buffer) is skipped; any other unknown key raises
    :class:`CheckpointError`.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    inverse_renames = {v: k for k, v in _BLOCK_RENAMES.items()}
    for key, value in sd.items():
        if key == _HF_POSITION_IDS:
            continue
        if key == _HF_TOKEN:
            out["token_embedding.weight"] = value
        elif key == _HF_POSITION:
            out["positional_embedding"] = value
        elif key == _HF_PROJECTION:
            out["text_projection"] = value.t().contiguous()
        elif key.startswith(_HF_FINAL_NORM) and key[len(_HF_FINAL_NORM) :] in ("weight", "bias"):
            out["ln_final." + key[len(_HF_FINAL_NORM) :]] = value
        elif (m := _HF_BLOCK.fullmatch(key)) is not None:
            index, rest = int(m.group(1)), m.group(2)
            module, _, param = rest.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") and param in (
                "weight",
                "bias",
            ):
                qkv.setdefault((index, param), {})[module[len("self_attn.")]] = value
            elif module in inverse_renames and param in ("weight", "bias"):
                out[f"transformer.resblocks.{index}.{inverse_renames[module]}.{param}"] = value
            else:
                raise CheckpointError(f"unknown transformers CLIP text encoder key {key!r}")
        else:
            raise CheckpointError(f"unknown transformers CLIP text encoder key {key!r}")
    for (index, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise CheckpointError(f"layer {index} lacks self_attn.{missing[0]}_proj.{param}")
        fused = torch.cat([parts[n] for n in "qkv"], dim=0)
        out[f"transformer.resblocks.{index}.attn.in_proj_{param}"] = fused
    return out


def add_text_model_prefix(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Prefix bare ``embeddings.*`` / ``encoder.*`` / ``final_layer_norm.*`` keys with ``text_model.``.

    transformers >= 5 saves ``CLIPTextModel`` without the ``text_model.`` level that older diffusers folders,
    SD1/SDXL single files and ``CLIPTextModelWithProjection`` have; other keys pass through unchanged.
    """
    return {(f"text_model.{k}" if k.split(".", 1)[0] in _HF_BARE_ROOTS else k): v for k, v in sd.items()}


def infer_text_config(
    sd: Mapping[str, Tensor], name: str, base: TextEncoderConfig | None = None
) -> TextEncoderConfig:
    """Read width, layers, heads (width // 64), intermediate, projection, vocab and positions from a
    transformers-layout state dict.

    The fields weights cannot tell (activation, pad id, conditioning layer, final norm) come from ``base``,
    or, when it is None, from the known encoder called ``name`` (``clip_l``, ``clip_h`` or ``clip_g``).
    Raises :class:`CheckpointError` when the tensors are missing or inconsistent.
    """
    if base is None:
        if name not in _KNOWN_TEXT_ENCODERS:
            known = sorted(_KNOWN_TEXT_ENCODERS)
            raise CheckpointError(f"unknown text encoder name {name!r}; pass base= or use one of {known}")
        base = _KNOWN_TEXT_ENCODERS[name]
    for key in (_HF_TOKEN, _HF_POSITION, _HF_LAYER.format(0) + "mlp.fc1.weight"):
        if key not in sd:
            raise CheckpointError(f"text encoder {name!r}: state dict has no {key!r}")
    vocab_size, width = sd[_HF_TOKEN].shape
    max_positions = sd[_HF_POSITION].shape[0]
    indices = {int(m.group(1)) for k in sd if (m := _HF_BLOCK.fullmatch(k)) is not None}
    layers = max(indices) + 1
    if indices != set(range(layers)):
        missing = sorted(set(range(layers)) - indices)
        raise CheckpointError(f"text encoder {name!r}: layers {missing} are missing (last is {layers - 1})")
    if width % 64 != 0:
        raise CheckpointError(f"text encoder {name!r}: width {width} is not a multiple of the 64-wide heads")
    intermediate = sd[_HF_LAYER.format(0) + "mlp.fc1.weight"].shape[0]
    projection = sd.get(_HF_PROJECTION)
    if projection is not None and projection.shape[1] != width:
        raise CheckpointError(
            f"text encoder {name!r}: text_projection is {tuple(projection.shape)}, expected [*, {width}]"
        )
    return replace(
        base,
        name=name,
        width=int(width),
        layers=layers,
        heads=int(width) // 64,
        intermediate=int(intermediate),
        projection_dim=None if projection is None else int(projection.shape[0]),
        vocab_size=int(vocab_size),
        max_positions=int(max_positions),
    )
