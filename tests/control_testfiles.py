"""Random-weight ControlNet files in every layout Sumie reads, at tiny configs with the real key structure.

* :func:`random_controlnet` / :func:`write_original`: Sumie's ControlNetModel written with original keys
  (``control_model.*``, or unprefixed as the fp16 conversions, or beside a whole SD model as the 1.0 files);
* :func:`random_diffusers_controlnet` / :func:`write_diffusers`: diffusers' own ``ControlNetModel`` written by
  diffusers (``save_pretrained`` folder) or as one safetensors file of its state dict;
* :func:`write_control_lora`: an SDXL Control-LoRA file for a given base UNet (``lora_controlnet`` marker,
  ``X.up`` / ``X.down`` pairs for every base weight of two or more dims, full tensors for the rest).

Every parameter is random (the zero convolutions too: zero ones would prove nothing): weights ~ N(0, 1/fan_in),
norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2), from a seeded generator (no global seed); the hint block's convs
get a gain (:data:`HINT_GAIN`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from sumie.configs import TINY, UNetConfig
from sumie.models.controlnet import ControlNetModel
from sumie.models.unet import UNetModel

# SDXL's size conditioning: each of the 6 (or 5) ids is embedded in 256 sinusoids (diffusers addition_time_embed_dim)
ADM_ID_DIM = 256

# ControlNet configs of the tiny families (they fit sumie.configs.TINY models: same context and ADM widths)
TINY_CONTROLNET: dict[str, UNetConfig] = {f: TINY[f].unet for f in ("sd1", "sd2", "sdxl")}
# diffusers' SDXL "mid" (transformer_layers_per_block [0, 0, 1]) and "small" ([0, 0, 0]) ControlNets, tiny: the
# CrossAttn levels keep a transformer of 0 layers (norm, proj_in, proj_out) where the depth is 0
TINY_SDXL_MID = replace(TINY["sdxl"].unet, channel_mult=(1, 1, 2), transformer_depth=(0, 0, 1),
                        transformer_depth_middle=1, attention_levels=(False, True, True))
TINY_SDXL_SMALL = replace(TINY_SDXL_MID, transformer_depth=(0, 0, 0), transformer_depth_middle=0)


# the hint block's 8 convs with SiLU between them shrink N(0, 1/fan_in) signals ~8x; this gain brings the control
# image's features to about half the size of conv_in's output, so a control image changes the residuals by ~50%
HINT_GAIN = 1.7
HINT_BLOCKS = ("input_hint_block.", "controlnet_cond_embedding.")


@torch.no_grad()
def randomize(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random and nonzero (see the module docstring); returns ``module``."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.ndim >= 2:
            gain = HINT_GAIN if name.startswith(HINT_BLOCKS) else 1.0
            p.copy_(noise * gain * p[0].numel() ** -0.5)
        elif name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)
    return module


def random_controlnet(cfg: UNetConfig, hint_channels: int = 3, seed: int = 0) -> ControlNetModel:
    """Sumie's ControlNetModel at ``cfg`` with random weights (eval mode, fp32, CPU)."""
    return randomize(ControlNetModel(cfg, hint_channels), seed).eval()  # type: ignore[return-value]


def original_state_dict(model: ControlNetModel, prefix: bool = True, full_model: bool = False) -> dict[str, Tensor]:
    """Original-layout tensors: ``control_model.*`` (or unprefixed), plus, with ``full_model``, the keys of an old
    1.0 file's SD model beside it (a UNet, VAE and text-encoder tensor each, random)."""
    pre = "control_model." if prefix else ""
    sd = {pre + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if full_model:
        g = torch.Generator().manual_seed(99)
        for k in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
                  "first_stage_model.decoder.conv_in.weight",
                  "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
            sd[k] = torch.randn(8, 4, 3, 3, generator=g)
    return sd


def save_tensors(sd: dict[str, Tensor], path: Path) -> Path:
    """A safetensors file, or a plain-dict pickle for ``.pth`` / ``.ckpt`` / ``.bin`` (what the originals are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, str(path))
    return path


def write_original(path: Path, model: ControlNetModel, prefix: bool = True, full_model: bool = False) -> Path:
    """The original single-file layout of ``model`` at ``path`` (see :func:`original_state_dict`)."""
    return save_tensors(original_state_dict(model, prefix, full_model), path)


def diffusers_kwargs(cfg: UNetConfig, hint_channels: int = 3) -> dict[str, Any]:
    """``diffusers.ControlNetModel(**kwargs)`` with the structure of a Sumie encoder config."""
    levels = range(len(cfg.channel_mult))
    widths = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    # the middle block takes the last entry of transformer_layers_per_block (levels without attention ignore theirs)
    depths = [cfg.transformer_depth[lv] if cfg.attends(lv) else cfg.transformer_depth_middle for lv in levels]
    if depths[-1] != cfg.transformer_depth_middle:
        raise ValueError("diffusers ties the middle block's depth to the last level's")
    # diffusers' attention_head_dim is the number of heads (its naming; num_attention_heads defaults to it)
    heads = cfg.num_heads if cfg.num_head_channels == -1 else tuple(w // cfg.num_head_channels for w in widths)
    kw: dict[str, Any] = dict(
        in_channels=cfg.in_channels, conditioning_channels=hint_channels, block_out_channels=widths,
        down_block_types=tuple("CrossAttnDownBlock2D" if cfg.attends(lv) else "DownBlock2D" for lv in levels),
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=depths, attention_head_dim=heads,
        use_linear_projection=cfg.use_linear_in_transformer, norm_num_groups=cfg.norm_groups,
    )
    if cfg.adm_in_channels is not None:
        kw.update(addition_embed_type="text_time", addition_time_embed_dim=ADM_ID_DIM,
                  projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return kw


def random_diffusers_controlnet(cfg: UNetConfig, hint_channels: int = 3, seed: int = 0, **extra: Any) -> nn.Module:
    """diffusers' ``ControlNetModel`` with ``cfg``'s structure and random weights (eval, fp32, CPU)."""
    from diffusers import ControlNetModel as DiffusersControlNet

    return randomize(DiffusersControlNet(**diffusers_kwargs(cfg, hint_channels), **extra), seed).eval()


def write_diffusers(path: Path, model: nn.Module, folder: bool) -> Path:
    """A diffusers ControlNet: ``save_pretrained`` folder (config.json + diffusion_pytorch_model.safetensors) or
    one safetensors file of its state dict."""
    if folder:
        model.save_pretrained(path)  # type: ignore[operator]
        return path
    return save_tensors(dict(model.state_dict()), path)


def control_lora_tensors(base: UNetModel, rank: int = 4, hint_channels: int = 3, seed: int = 0) -> dict[str, Tensor]:
    """The tensors of a Control-LoRA for ``base`` (what ComfyUI's ``ControlLoraSave`` writes): ``K.up`` [out, r(, 1,
    1)] and ``K.down`` [r, in(, kh, kw)] for each base weight K.weight of 2+ dims, every other ControlNet tensor
    full (norms and biases of the copy, the hint block, zero convs, middle-block out), ``lora_controlnet`` empty."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        skeleton = ControlNetModel(base.config, hint_channels).state_dict()
    base_sd = base.state_dict()
    out: dict[str, Tensor] = {"lora_controlnet": torch.tensor([])}
    for key, meta in skeleton.items():
        shape = tuple(meta.shape)
        if key in base_sd and len(shape) >= 2:
            stem = key[: -len(".weight")]
            r = min(rank, shape[0], shape[1])
            ones = (1,) * (len(shape) - 2)
            out[f"{stem}.up"] = torch.randn((shape[0], r, *ones), generator=g) * 0.05
            out[f"{stem}.down"] = torch.randn((r, *shape[1:]), generator=g) * 0.05
        elif len(shape) >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            out[key] = torch.randn(shape, generator=g) * fan_in**-0.5
        elif key.endswith("weight"):
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = 0.1 * torch.randn(shape, generator=g)
    return out


def write_control_lora(path: Path, base: UNetModel, rank: int = 4, hint_channels: int = 3, seed: int = 0) -> Path:
    """An SDXL-style Control-LoRA file for ``base`` (see :func:`control_lora_tensors`)."""
    return save_tensors(control_lora_tensors(base, rank, hint_channels, seed), path)


def random_unet(cfg: UNetConfig, seed: int = 1) -> UNetModel:
    """Sumie's UNetModel at ``cfg`` with random weights: the base of a Control-LoRA."""
    return randomize(UNetModel(cfg), seed).eval()  # type: ignore[return-value]
