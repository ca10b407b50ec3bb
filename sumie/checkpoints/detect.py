"""Which Stable Diffusion a single-file checkpoint holds, read from its key names and tensor shapes."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from sumie.checkpoints.keymaps.clip import add_text_model_prefix, infer_text_config, openclip_to_hf
from sumie.checkpoints.keymaps.unet import infer_unet_config
from sumie.checkpoints.keymaps.vae import infer_vae_config, vae_attention_to_conv
from sumie.configs import FAMILIES, ModelConfig, Prediction, TextEncoderConfig, UNetConfig, config_from_dict
from sumie.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Text encoders of each family: (prefix in the file, stored layout). Order = order of ModelConfig.text_encoders.
TEXT_PARTS: dict[str, tuple[tuple[str, str], ...]] = {
    "sd1": (("cond_stage_model.transformer.", "hf"),),
    "sd2": (("cond_stage_model.model.", "openclip"),),
    "sdxl": (("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "openclip")),
    "sdxl_refiner": (("conditioner.embedders.0.model.", "openclip"),),
}

# Training-time state that inference does not use (noise schedule buffers, EMA copies, losses, markers).
_IGNORED_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min",
}
_IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.", "loss.")
_HF_IGNORED = {"text_model.embeddings.position_ids"}


@dataclass
class Detection:
    """A checkpoint split into Sumie's components, with the config read from it."""

    config: ModelConfig
    parts: dict[str, dict[str, torch.Tensor]]  # "unet", "vae", "text0", "text1" -> module state dicts
    prediction_source: str
    ignored: list[str] = field(default_factory=list)
    zero_terminal_snr: bool = False


def declared_config(metadata: Mapping[str, str] | None, where: str) -> ModelConfig | None:
    """The config a Sumie-written file declares in its metadata (``sumie.config``), if any."""
    if not metadata or "sumie.config" not in metadata:
        return None
    try:
        return config_from_dict(json.loads(metadata["sumie.config"]))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{where}: unreadable sumie.config metadata ({e}); the file is damaged") from None


def detect_family(keys: list[str] | set[str], where: str) -> str:
    """Family from the key layout: the text encoder prefixes tell SD1, SD2, SDXL and the refiner apart."""
    ks = set(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in ks)

    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        return "sdxl_refiner"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    sample = ", ".join(sorted(ks)[:3])
    if has(UNET_PREFIX):
        raise CheckpointError(
            f"{where}: has a UNet but no text encoder; Sumie needs a full single-file checkpoint "
            "(UNet, VAE and text encoders) or a diffusers folder"
        )
    raise CheckpointError(
        f"{where}: unknown model layout (first keys: {sample}); expected an SD1/SD2/SDXL single-file "
        "checkpoint (model.diffusion_model.*, first_stage_model.*, cond_stage_model.* or conditioner.*)"
    )


def read_prediction_from_yaml(checkpoint: Path) -> Prediction | None:
    """A1111's sidecar config: ``model.yaml`` next to ``model.safetensors`` with ``parameterization: "v"``."""
    side = checkpoint.with_suffix(".yaml")
    if not side.is_file():
        return None
    text = side.read_text(errors="replace")
    m = re.search(r"^\s*parameterization:\s*[\"']?(\w+)", text, flags=re.MULTILINE)
    if m is None:
        return "eps"
    value = m.group(1).lower()
    if value not in ("eps", "v"):
        raise CheckpointError(f"{side}: unknown parameterization {value!r}; use \"eps\" or \"v\"")
    return value  # type: ignore[return-value]


def guess_prediction(family: str, sd: Mapping[str, torch.Tensor]) -> tuple[Prediction, str]:
    """Best available guess without running the model: explicit marker keys, then a weight statistic for SD2."""
    if "v_pred" in sd:
        return "v", "v_pred key in the file"
    if family != "sd2":
        return "eps", f"{family} default"
    # SD2 768-v and 512-base differ in this norm's bias spread (ComfyUI's heuristic); inpainting SD2 is eps.
    key = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    t = sd.get(key)
    if t is None or t.is_meta:
        return "v", "sd2 default (768-v); pass --prediction eps for 512-base models"
    if sd[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1] != 4:
        return "eps", "sd2 inpainting models are eps"
    std = float(t.float().std(unbiased=False))
    return ("v", f"heuristic (norm bias std {std:.3f} > 0.09)") if std > 0.09 else (
        "eps", f"heuristic (norm bias std {std:.3f} <= 0.09)")


def _text_config(base: TextEncoderConfig, sd_hf: Mapping[str, torch.Tensor]) -> TextEncoderConfig:
    found = infer_text_config(sd_hf, base.name)
    return replace(
        base, width=found.width, layers=found.layers, heads=found.heads, intermediate=found.intermediate,
        projection_dim=found.projection_dim, vocab_size=found.vocab_size, max_positions=found.max_positions,
    )


def unet_config_for(family: str, sd_unet: Mapping[str, torch.Tensor]) -> UNetConfig:
    """UNet config from shapes, with the family's head convention (SD1: 8 heads, others: 64 channels a head)."""
    found = infer_unet_config(sd_unet)
    base = FAMILIES[family].unet
    return replace(found, num_heads=base.num_heads, num_head_channels=base.num_head_channels)


def split_checkpoint(
    sd: Mapping[str, torch.Tensor],
    where: str,
    prediction: Prediction | None = None,
    yaml_prediction: Prediction | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Detection:
    """Split a single-file checkpoint into component state dicts and read its config; unknown keys are errors.

    A ``sumie.config`` JSON entry in the safetensors metadata (written by Sumie's trainer) declares the exact
    config, e.g. head counts that shapes cannot show; the tensors must still fit it.
    """
    family = detect_family(list(sd), where)
    declared = declared_config(metadata, where)
    if declared is not None and declared.family != family:
        raise CheckpointError(f"{where}: metadata declares a {declared.family} model but the keys are {family}'s")
    base = FAMILIES[family]
    text_parts = TEXT_PARTS[family]
    prefixes = [(UNET_PREFIX, "unet"), (VAE_PREFIX, "vae")] + [(p, f"text{i}") for i, (p, _) in enumerate(text_parts)]
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for _, name in prefixes}
    ignored: list[str] = []
    unexpected: list[str] = []
    for key, tensor in sd.items():
        for prefix, name in prefixes:
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = tensor
                break
        else:
            if key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES):
                ignored.append(key)
            else:
                unexpected.append(key)
    if unexpected:
        raise CheckpointError(
            f"{where}: {len(unexpected)} unexpected key(s) for an {family} checkpoint, e.g. {unexpected[0]!r}; "
            "the file is not a plain SD checkpoint (merged or damaged?)"
        )
    for _, name in prefixes:
        if not parts[name]:
            raise CheckpointError(f"{where}: the {family} checkpoint has no {name} weights; the file is incomplete")

    text_cfgs = []
    for i, ((prefix, layout), base_te) in enumerate(zip(text_parts, base.text_encoders, strict=True)):
        raw = parts[f"text{i}"]
        if layout == "openclip":
            hf, dropped = openclip_to_hf(raw)
            ignored += [prefix + k for k in dropped]
        else:
            hf = add_text_model_prefix(raw)
            for k in _HF_IGNORED & hf.keys():
                del hf[k]
                ignored.append(prefix + k)
        parts[f"text{i}"] = hf
        text_cfgs.append(_text_config(base_te, hf))

    parts["vae"] = vae_attention_to_conv(parts["vae"])
    unet_cfg = unet_config_for(family, parts["unet"])
    vae_cfg = replace(infer_vae_config(parts["vae"]), scaling_factor=base.vae.scaling_factor,
                      shift_factor=base.vae.shift_factor)
    if prediction is not None:
        pred, source = prediction, "option"
    elif yaml_prediction is not None:
        pred, source = yaml_prediction, "sidecar .yaml"
    else:
        pred, source = guess_prediction(family, sd)
    if declared is not None:
        config = replace(declared, prediction=pred if source in ("option", "sidecar .yaml") else declared.prediction)
        source = source if source in ("option", "sidecar .yaml") else "sumie.config metadata"
    else:
        config = ModelConfig(family=family, unet=unet_cfg, vae=vae_cfg, text_encoders=tuple(text_cfgs),
                             prediction=pred)
    return Detection(config=config, parts=parts, prediction_source=source, ignored=ignored,
                     zero_terminal_snr="ztsnr" in sd)
