"""Load Stable Diffusion weights (single files, diffusers folders, standalone VAEs) into Sumie's modules."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sumie.checkpoints.detect import (
    UNET_PREFIX,
    VAE_PREFIX,
    Detection,
    read_prediction_from_yaml,
    split_checkpoint,
    unet_config_for,
)
from sumie.checkpoints.io import (
    PICKLE_EXT,
    SAFETENSORS_EXT,
    file_metadata,
    load_state_dict,
    model_hash,
    read_safetensors_header,
    tensor_shapes,
)
from sumie.checkpoints.keymaps.clip import add_text_model_prefix
from sumie.checkpoints.keymaps.unet import diffusers_to_ldm_unet
from sumie.checkpoints.keymaps.vae import diffusers_to_ldm_vae, infer_vae_config, vae_attention_to_conv
from sumie.checkpoints.precision import Precision
from sumie.configs import FAMILIES, ModelConfig, Prediction, TextEncoderConfig, VAEConfig
from sumie.errors import CheckpointError
from sumie.models.clip import CLIPTextModel
from sumie.models.unet import UNetModel
from sumie.models.vae import AutoencoderKL

_PREDICTIONS = ("eps", "v")
_DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v"}


@dataclass
class StableDiffusionModels:
    """The loaded networks of one checkpoint, ready for inference."""

    config: ModelConfig
    unet: UNetModel
    vae: AutoencoderKL
    text_encoders: list[CLIPTextModel]
    source: str
    prediction_source: str
    hash: str | None = None
    ignored_keys: list[str] = field(default_factory=list)
    zero_terminal_snr: bool = False  # zero-terminal-SNR training (``ztsnr`` key, diffusers rescale_betas_zero_snr)
    native_size: int | None = None  # the side it was trained at, when the file says (``sumie.resolution`` metadata)
    cfg_scale: float | None = None  # the CFG scale the file recommends (``sumie.cfg_scale`` metadata), if any

    def modules(self) -> dict[str, nn.Module]:
        """Component name -> module (``unet``, ``vae``, ``clip_l``, ``clip_g`` ...)."""
        out: dict[str, nn.Module] = {"unet": self.unet, "vae": self.vae}
        for cfg, te in zip(self.config.text_encoders, self.text_encoders, strict=True):
            out[cfg.name] = te
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StableDiffusionModels:
        """Move every network (in place) and return self."""
        for m in self.modules().values():
            m.to(device=device, dtype=dtype)
        return self


def _describe_mismatch(module: nn.Module, sd: Mapping[str, torch.Tensor]) -> str | None:
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(want.keys() - sd.keys())
    extra = sorted(sd.keys() - want.keys())
    if missing:
        return f"{len(missing)} missing key(s), e.g. {missing[0]!r}"
    if extra:
        return f"{len(extra)} unexpected key(s), e.g. {extra[0]!r}"
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            return f"tensor {k!r} has shape {tuple(sd[k].shape)}, expected {shape}"
    return None


class _SkipInit(TorchFunctionMode):
    """Weight initialisation on meta tensors does nothing (used with ``torch.device("meta")``, see
    :func:`build_module`): the values do not exist, and torch's meta kernel of ``normal_`` (every ``nn.Embedding``)
    imports ``torch._dynamo`` on first use, ~2 s of a cold start."""

    _FILLS = frozenset({
        nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_, nn.init.constant_,
        torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.random_, torch.Tensor.bernoulli_,
        torch.Tensor.exponential_, torch.Tensor.log_normal_, torch.Tensor.cauchy_, torch.Tensor.geometric_,
        torch.Tensor.fill_, torch.Tensor.zero_,
    })

    def __torch_function__(self, func: object, types: object, args: tuple = (), kwargs: dict | None = None) -> object:
        """Skip the fill when its tensor is on the meta device; run everything else."""
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if func in self._FILLS and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)  # type: ignore[operator]


def build_module(
    cls: Callable[[Any], nn.Module],
    cfg: object,
    sd: Mapping[str, torch.Tensor],
    where: str,
    what: str,
    device: torch.device | str | None = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Construct on the meta device without initialising weights, take the tensors as they are (no second copy,
    ``assign=True`` replaces every one), then cast to the run dtype (None: keep the file's device / dtype)."""
    with torch.device("meta"), _SkipInit():
        module = cls(cfg)
    problem = _describe_mismatch(module, sd)
    if problem:
        raise CheckpointError(f"{where}: {what} weights do not fit the detected architecture: {problem}")
    module.load_state_dict(dict(sd), strict=True, assign=True)
    module.to(device=device, dtype=dtype)
    module.eval().requires_grad_(False)
    return module


def _check_prediction(prediction: str | None) -> Prediction | None:
    if prediction is not None and prediction not in _PREDICTIONS:
        raise CheckpointError(f"unknown prediction type {prediction!r}; use one of: eps, v")
    return prediction  # type: ignore[return-value]


def _assemble(det: Detection, where: str, device: torch.device | str, precision: Precision, **info: object) -> (
        StableDiffusionModels):
    cfg = det.config
    unet = build_module(UNetModel, cfg.unet, det.parts["unet"], where, "UNet", device, precision.unet)
    vae = build_module(AutoencoderKL, cfg.vae, det.parts["vae"], where, "VAE", device, precision.vae_dtype(cfg.family))
    tes = [
        build_module(CLIPTextModel, tcfg, det.parts[f"text{i}"], where, f"text encoder {tcfg.name}", device,
                     precision.text_dtype())
        for i, tcfg in enumerate(cfg.text_encoders)
    ]
    return StableDiffusionModels(
        config=cfg, unet=unet, vae=vae, text_encoders=tes,  # type: ignore[arg-type]
        prediction_source=det.prediction_source, ignored_keys=det.ignored, zero_terminal_snr=det.zero_terminal_snr,
        **info,  # type: ignore[arg-type]
    )


def _metadata_size(meta: Mapping[str, str] | None) -> int | None:
    """The ``sumie.resolution`` metadata value (a positive multiple of 8), else None."""
    value = (meta or {}).get("sumie.resolution", "")
    return int(value) if value.isdigit() and int(value) > 0 and int(value) % 8 == 0 else None


def _metadata_cfg(meta: Mapping[str, str] | None) -> float | None:
    """The ``sumie.cfg_scale`` metadata value (a finite number >= 0), else None."""
    try:
        value = float((meta or {}).get("sumie.cfg_scale", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def load_models(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | Precision = torch.float32,
    device: torch.device | str = "cpu",
    prediction: str | None = None,
    vae: str | os.PathLike[str] | None = None,
    file_hash: str | Callable[[Path], str | None] | None = None,
) -> StableDiffusionModels:
    """Load a single-file checkpoint or a diffusers folder; ``vae`` replaces the built-in VAE with a file.

    ``dtype``: one run dtype for every network, or a :class:`~sumie.checkpoints.precision.Precision` with the text
    encoders' and the VAE's own (an SDXL VAE stays in float32 when the rest runs in float16). ``file_hash``: the
    file's A1111 model hash, or a function giving it (e.g. a cached
    :meth:`~sumie.checkpoints.hashes.FileHashes.model_hash`); None hashes the whole file here.
    """
    precision = Precision.of(dtype)
    pred = _check_prediction(prediction)
    p = Path(path)
    if p.is_dir():
        det = inspect_diffusers_folder(p, prediction=pred, load=True)
        models = _assemble(det, str(p), device, precision, source=str(p), hash=None)
    else:
        sd = load_state_dict(p)
        meta = file_metadata(p)
        det = split_checkpoint(sd, str(p), pred, read_prediction_from_yaml(p), metadata=meta)
        del sd
        digest = file_hash(p) if callable(file_hash) else file_hash if file_hash is not None else model_hash(p)
        models = _assemble(det, str(p), device, precision, source=str(p), hash=digest,
                           native_size=_metadata_size(meta), cfg_scale=_metadata_cfg(meta))
    if vae is not None:
        models.vae = load_vae(vae, dtype=precision.vae_dtype(models.config.family), device=device,
                              scaling_factor=models.config.vae.scaling_factor,
                              fallback=models.config.vae)
        models.config = replace(models.config, vae=models.vae.config)  # type: ignore[arg-type]
    return models


def inspect_checkpoint(path: str | os.PathLike[str], prediction: str | None = None) -> Detection:
    """Detect a model without loading its weights (shapes only; a few small tensors are read for heuristics)."""
    pred = _check_prediction(prediction)
    p = Path(path)
    if p.is_dir():
        return inspect_diffusers_folder(p, prediction=pred, load=False)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder; check the path")
    shapes, metadata = tensor_shapes(p)
    probe = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    if p.suffix.lower() in SAFETENSORS_EXT and probe in shapes:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            shapes[probe] = f.get_tensor(probe)
    return split_checkpoint(shapes, str(p), pred, read_prediction_from_yaml(p), metadata=metadata)


# ---------------------------------------------------------------- diffusers folders

_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model", ),
    "vae": ("diffusion_pytorch_model", ),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the diffusers folder is incomplete") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from None


def _component_weights(folder: Path, names: tuple[str, ...], load: bool) -> dict[str, torch.Tensor]:
    """Weights of one diffusers component: single file, fp16 variant or sharded index; meta tensors if not load."""
    for base in names:
        for variant in ("", ".fp16"):
            for ext in (".safetensors", ".bin"):
                f = folder / f"{base}{variant}{ext}"
                if f.is_file():
                    return load_state_dict(f) if load else tensor_shapes(f)[0]
                index = folder / f"{base}{variant}{ext}.index.json"
                if index.is_file():
                    shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
                    out: dict[str, torch.Tensor] = {}
                    for shard in shards:
                        out.update(load_state_dict(folder / shard) if load else tensor_shapes(folder / shard)[0])
                    return out
    raise CheckpointError(f"{folder}: no weights file found (looked for {names[0]}.safetensors and variants)")


def unet_config_from_diffusers(cfg: Mapping[str, object], family: str) -> object:
    """Sumie UNetConfig from a diffusers ``unet/config.json`` (needed to map its keys)."""
    from sumie.configs import UNetConfig

    blocks = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))  # type: ignore[call-overload]
    n = len(blocks)
    down = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]))  # type: ignore
    tlpb = cfg.get("transformer_layers_per_block", 1)
    depths = list(tlpb) if isinstance(tlpb, list | tuple) else [int(tlpb)] * n  # type: ignore[arg-type]
    depth = tuple(d if "CrossAttn" in t else 0 for d, t in zip(depths, down, strict=True))
    mult = tuple(b // blocks[0] for b in blocks)
    lpb = cfg.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        raise CheckpointError("unet/config.json: per-level layers_per_block is not supported")
    base = FAMILIES[family].unet
    return UNetConfig(
        in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),  # type: ignore
        model_channels=blocks[0], channel_mult=mult, num_res_blocks=lpb, transformer_depth=depth,
        transformer_depth_middle=max(depths[-1], 1),
        num_heads=base.num_heads, num_head_channels=base.num_head_channels,
        context_dim=int(cfg.get("cross_attention_dim", 768)),  # type: ignore[arg-type]
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        adm_in_channels=cfg.get("projection_class_embeddings_input_dim"),  # type: ignore[arg-type]
        norm_groups=int(cfg.get("norm_num_groups", 32)),  # type: ignore[arg-type]
        guidance_embed_dim=cfg.get("time_cond_proj_dim"),  # type: ignore[arg-type]
    )


def inspect_diffusers_folder(folder: Path, prediction: Prediction | None, load: bool) -> Detection:
    """Read a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder*/, scheduler/)."""
    from sumie.checkpoints.detect import _text_config

    index = _read_json(folder / "model_index.json")
    has_te1 = (folder / "text_encoder").is_dir() and index.get("text_encoder", [None])[0] is not None
    has_te2 = (folder / "text_encoder_2").is_dir()
    unet_json = _read_json(folder / "unet" / "config.json")
    ctx = int(unet_json.get("cross_attention_dim", 768))
    if has_te2:
        family = "sdxl" if has_te1 else "sdxl_refiner"
    else:
        family = "sd2" if ctx == 1024 else "sd1"
    base = FAMILIES[family]
    unet_cfg = unet_config_from_diffusers(unet_json, family)
    unet_sd = diffusers_to_ldm_unet(_component_weights(folder / "unet", _WEIGHT_NAMES["unet"], load), unet_cfg)
    unet_cfg = unet_config_for(family, unet_sd)
    vae_json = _read_json(folder / "vae" / "config.json")
    vae_sd = vae_attention_to_conv(
        diffusers_to_ldm_vae(_component_weights(folder / "vae", _WEIGHT_NAMES["vae"], load)))
    vae_cfg = replace(infer_vae_config(vae_sd),
                      scaling_factor=float(vae_json.get("scaling_factor", base.vae.scaling_factor)))
    te_dirs = (["text_encoder"] if has_te1 else []) + (["text_encoder_2"] if has_te2 else [])
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": unet_sd, "vae": vae_sd}
    text_cfgs: list[TextEncoderConfig] = []
    ignored: list[str] = []
    for i, (d, base_te) in enumerate(zip(te_dirs, base.text_encoders, strict=True)):
        sd = add_text_model_prefix(_component_weights(folder / d, _WEIGHT_NAMES[d], load))
        if "text_model.embeddings.position_ids" in sd:
            del sd["text_model.embeddings.position_ids"]
            ignored.append(f"{d}/text_model.embeddings.position_ids")
        parts[f"text{i}"] = sd
        text_cfgs.append(_text_config(base_te, sd))
    source = "option"
    sched = folder / "scheduler" / "scheduler_config.json"
    zsnr = sched.is_file() and bool(_read_json(sched).get("rescale_betas_zero_snr", False))
    if prediction is None:
        if sched.is_file():
            ptype = _read_json(sched).get("prediction_type", "epsilon")
            if ptype not in _DIFFUSERS_PREDICTION:
                raise CheckpointError(f"{sched}: unknown prediction_type {ptype!r}")
            prediction, source = _DIFFUSERS_PREDICTION[ptype], "scheduler_config.json"  # type: ignore[assignment]
        else:
            prediction, source = base.prediction, f"{family} default"
    config = ModelConfig(family=family, unet=unet_cfg, vae=vae_cfg, text_encoders=tuple(text_cfgs),
                         prediction=prediction)  # type: ignore[arg-type]
    return Detection(config=config, parts=parts, prediction_source=source, ignored=ignored, zero_terminal_snr=zsnr)


# ---------------------------------------------------------------- standalone VAE files


def vae_state_dict_from_file(path: str | os.PathLike[str], load: bool = True) -> dict[str, torch.Tensor]:
    """A standalone VAE in LDM layout (with or without ``first_stage_model.``) or diffusers layout -> LDM keys."""
    p = Path(path)
    sd = load_state_dict(p) if load else tensor_shapes(p)[0]
    if any(k.startswith(VAE_PREFIX) for k in sd):
        sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    if any(".down_blocks." in k or ".up_blocks." in k for k in sd):
        sd = diffusers_to_ldm_vae(sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}
    if "decoder.conv_in.weight" not in sd:
        raise CheckpointError(f"{p}: not a VAE file (no decoder.conv_in.weight in LDM or diffusers layout)")
    return vae_attention_to_conv(sd)


VAE_METADATA_KEY = "sumie.vae_config"


def declared_vae_config(metadata: Mapping[str, str], where: str) -> VAEConfig | None:
    """The VAEConfig a Sumie-written VAE file declares (``sumie.vae_config`` metadata), or None."""
    if VAE_METADATA_KEY not in metadata:
        return None
    try:
        d = json.loads(metadata[VAE_METADATA_KEY])
        return VAEConfig(**{k: (tuple(v) if k == "ch_mult" else v) for k, v in d.items()})
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: unreadable {VAE_METADATA_KEY} metadata ({e}); the file is damaged") from None


def load_vae(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    scaling_factor: float | None = None,
    fallback: VAEConfig | None = None,
) -> AutoencoderKL:
    """Load a standalone VAE file, frozen; the scaling factor comes from the model it is used with.

    Group norms' group count cannot be read from the weights: a Sumie-written file declares its config
    (``sumie.vae_config``); any other file is taken to share ``fallback``'s (the model's) group count, else SD's 32.
    """
    p = Path(path)
    sd = vae_state_dict_from_file(p)
    cfg = declared_vae_config(file_metadata(p), str(p)) if p.suffix.lower() in SAFETENSORS_EXT else None
    if cfg is None:
        cfg = infer_vae_config(sd)
        if fallback is not None:
            cfg = replace(cfg, scaling_factor=fallback.scaling_factor, norm_groups=fallback.norm_groups)
    if scaling_factor is not None:
        cfg = replace(cfg, scaling_factor=scaling_factor)
    return build_module(AutoencoderKL, cfg, sd, str(p), "VAE", device, dtype)  # type: ignore[return-value]


def stored_dtype(path: str | os.PathLike[str]) -> str:
    """The dominant floating dtype of a file's tensors (by element count), e.g. ``float16``."""
    p = Path(path)
    counts: dict[str, int] = {}
    if p.is_dir():
        files = [f for f in p.rglob("*")
                 if f.suffix.lower() in SAFETENSORS_EXT | PICKLE_EXT and ".index" not in f.name]
    else:
        files = [p]
    for f in files:
        if f.suffix.lower() in SAFETENSORS_EXT:
            header, _ = read_safetensors_header(f)
            for e in header.values():
                n = 1
                for s in e["shape"]:
                    n *= s
                counts[e["dtype"]] = counts.get(e["dtype"], 0) + n
        else:
            for t in tensor_shapes(f)[0].values():
                name = str(t.dtype).removeprefix("torch.")
                counts[name] = counts.get(name, 0) + t.numel()
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    floats = {names.get(k, k): v for k, v in counts.items() if names.get(k, k).startswith(("float", "bfloat"))}
    return max(floats, key=floats.get) if floats else "unknown"  # type: ignore[arg-type]


def vae_downscale(model: str | os.PathLike[str], vae: str | os.PathLike[str] | None = None) -> int | None:
    """Pixels per latent pixel along a side (8 for SD, 4 for sumie-tiny) of a model, or of ``vae`` when given, from
    file headers and configs alone; None where that would mean reading a pickle in full or the files do not say
    (the load then finds it, or reports the problem)."""
    try:
        if vae is not None:
            v = Path(vae)
            if v.suffix.lower() not in SAFETENSORS_EXT or not v.is_file():
                return None
            cfg = declared_vae_config(file_metadata(v), str(v)) or infer_vae_config(
                vae_state_dict_from_file(v, load=False))
            return 2 ** (len(cfg.ch_mult) - 1)
        p = Path(model)
        if p.is_dir():
            blocks = _read_json(p / "vae" / "config.json").get("block_out_channels")
            return 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else None
        if p.suffix.lower() not in SAFETENSORS_EXT or not p.is_file():
            return None
        return 2 ** (len(inspect_checkpoint(p).config.vae.ch_mult) - 1)
    except CheckpointError:
        return None
