"""Typed training configuration, read from a TOML file (``sumie train run.toml``).

Sections: ``[model]`` (with ``[model.unet]``, ``[model.vae]``, ``[model.text_encoder]`` overrides of the
architecture), ``[data]``, ``[train]``, ``[output]``. Every key is checked: an unknown key raises
:class:`~sumie.errors.ConfigError` naming the key, its section and the valid keys. Relative paths are resolved
against the folder of the config file.

Example (the tiny model from scratch, stage 2 on top of a stage-1 VAE)::

    [model]
    family = "sd1"
    preset = "tiny"
    vae_from = "runs/vae/vae.safetensors"
    [model.unet]
    model_channels = 64
    [data]
    synthetic = { length = 20000 }
    resolution = 64
    caption_dropout = 0.1
    [train]
    what = "diffusion"
    steps = 20000
    batch_size = 64
    lr = 3e-4
    [output]
    dir = "runs/tiny"
    sample_prompts = ["a small red circle in the top left on a white background"]
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from sumie.configs import FAMILIES, TINY, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sumie.errors import ConfigError

__all__ = [
    "DataConfig",
    "LoRASection",
    "ModelSection",
    "OutputConfig",
    "TrainConfig",
    "TrainSection",
    "build_model_config",
    "config_from_dict",
    "load_config",
]

What = Literal["diffusion", "vae", "lora", "embedding"]
LORA_PARTS = ("attention", "ff", "conv", "text_encoder")  # sumie.training.adapters.LORA_PARTS


@dataclass
class ModelSection:
    """``[model]``: the architecture to build (family + preset + overrides) or a checkpoint to fine-tune."""

    family: str = "sd1"  # sd1 | sd2 (SDXL-type models with an ADM input are not trainable yet)
    preset: Literal["tiny", "full"] = "tiny"  # "tiny" (sumie.configs.TINY) or "full" (the family's real sizes)
    init_from: Path | None = None  # a checkpoint (single file or diffusers folder) to fine-tune; lora/embedding:
    # the checkpoint the adapter is trained on (default: the embedded sumie-tiny)
    vae_from: Path | None = None  # a VAE file (e.g. the vae.safetensors of a what="vae" run) for diffusion
    unet: dict[str, Any] = field(default_factory=dict)  # UNetConfig overrides
    vae: dict[str, Any] = field(default_factory=dict)  # VAEConfig overrides
    text_encoder: dict[str, Any] = field(default_factory=dict)  # TextEncoderConfig overrides (every encoder)


@dataclass
class DataConfig:
    """``[data]``: a folder of images with same-name captions (kohya) or the built-in synthetic shapes."""

    folder: Path | None = None
    synthetic: dict[str, Any] | None = None  # keyword arguments of the synthetic dataset
    resolution: int = 64  # square side; with buckets, the side of the target area
    crop: Literal["center", "random"] = "center"  # after resizing the short side to the target
    flip: bool = False  # random horizontal flips (leave off when captions say "left"/"right")
    buckets: bool = False  # aspect-ratio buckets (NovelAI/kohya): same area, sides multiple of bucket_step
    bucket_step: int = 64
    bucket_max_ratio: float = 2.0
    caption_dropout: float = 0.1  # probability a caption becomes "" (trains the unconditional branch of CFG)
    caption_extension: str = ".txt"
    missing_captions: Literal["error", "empty"] = "error"
    cache_latents: bool = False  # encode every image once with the frozen VAE before diffusion training
    shuffle: bool = True
    num_workers: int = 0


@dataclass
class TrainSection:
    """``[train]``: what is trained and how (optimizer, schedule, loss, EMA, precision, seed)."""

    what: What = "diffusion"
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    text_encoder_lr: float | None = None  # None = lr
    unet_lr: float | None = None  # None = lr
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # after the linear warmup
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    bf16: bool = False  # bf16 autocast; weights, optimizer, EMA stay float32 (3x slower on CPUs without AVX512-BF16)
    seed: int = 0
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    channels_last: bool = True  # NHWC convolutions for the UNet and VAE (measured ~20% faster UNet steps on CPU)
    # recompute the UNet's blocks (and the trained text encoders' layers) in the backward pass instead of keeping
    # their activations: less memory, more time (README "Training", measured cost)
    gradient_checkpointing: bool = False
    device: str = "cpu"
    # diffusion
    prediction: Literal["eps", "v"] | None = None  # None = the model's
    min_snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (Hang et al. 2023); 0 = off
    foreground_weight: float = 1.0  # loss weight of masked (subject) latent pixels; background 1; 1 = off
    zero_terminal_snr: bool = False  # rescale the schedule to zero SNR at t = 999 (Lin et al. 2023); needs v
    # draw some timesteps more often (diffusers' names): "later" = the noisiest timestep_bias_portion of them
    timestep_bias_strategy: Literal["none", "earlier", "later", "range"] = "none"
    timestep_bias_portion: float = 0.25
    timestep_bias_multiplier: float = 1.0
    timestep_bias_begin: int = 0  # "range": begin <= t < end
    timestep_bias_end: int = 1000
    train_text_encoder: bool | None = None  # None = yes from scratch, no when fine-tuning (init_from)
    # embedding (textual inversion): the new word, how many token vectors it takes, the word they start from
    embedding_name: str = ""
    num_vectors: int = 1
    init_word: str = ""  # "" = zeros
    # vae
    train_vae_encoder: bool = True  # false: only the decoder trains; the latent space (and any UNet on it) is kept
    kl_weight: float = 1e-6  # on KL summed over latents / pixels, i.e. LDM's weight on its sums
    recon: Literal["l1", "l2"] = "l1"
    edge_weight: float = 0.0  # L1 between image gradients (sharper edges)
    multiscale_weight: float = 0.0  # L1 between 2x, 4x, 8x average-pooled images
    # EMA
    ema_decay: float = 0.999  # 0 = off (the export then holds the raw weights)
    ema_start: int = 0  # steps before the EMA starts (it copies the weights until then)
    ema_warmup: bool = True  # diffusers' EMAModel warmup: decay = 1 - (1 + step) ** -2/3, capped


@dataclass
class LoRASection:
    """``[lora]`` (with what = "lora"): the network's ranks and the parts of the model it adapts (kohya's names)."""

    rank: int = 8  # kohya network_dim: Linear and 1x1-conv layers
    alpha: float = 8.0  # kohya network_alpha: the update is scaled by alpha / rank
    conv_rank: int = 0  # LoCon conv_dim for 3x3 convs (0 = none; ResBlock Linear/1x1 layers take rank)
    conv_alpha: float = 1.0
    targets: list[str] = field(default_factory=lambda: ["attention", "ff"])  # of attention, ff, conv, text_encoder


@dataclass
class OutputConfig:
    """``[output]``: where and how often checkpoints, samples and the loss log are written."""

    dir: Path = Path("runs/sumie")
    checkpoint_every: int = 500  # 0 = only at the end (and on Ctrl-C)
    keep_checkpoints: int = 3
    sample_every: int = 500  # 0 = off
    sample_prompts: list[str] = field(default_factory=list)  # empty: the captions of the first 4 items
    sample_steps: int = 20
    sample_cfg: float = 5.0
    sample_sampler: str = "Euler"
    sample_seed: int = 0
    log_every: int = 10  # loss-log lines (JSONL) every N steps; the bar shows every step
    progress: bool | None = None  # tqdm bar; None = only on a terminal
    export: str = "model.safetensors"  # final single file (what="diffusion") inside dir; vae.safetensors for vae,
    # lora.safetensors for lora (its stem is ss_output_name); an embedding is always <embedding_name>.safetensors
    export_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # how the exported weights are stored
    cfg_scale: float | None = None  # the CFG scale the export recommends (``sumie.cfg_scale``; the engine's default)


@dataclass
class TrainConfig:
    """The whole run: ``model``, ``data``, ``train``, ``output`` (see the module docstring)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputConfig = field(default_factory=OutputConfig)
    lora: LoRASection | None = None
    source: str = "<dict>"  # where the config came from (for messages)
    text: str = ""  # the TOML text (stored in checkpoints)


_SECTIONS: dict[str, type] = {"model": ModelSection, "data": DataConfig, "train": TrainSection, "output": OutputConfig,
                              "lora": LoRASection}
_PATH_KEYS = {("model", "init_from"), ("model", "vae_from"), ("data", "folder"), ("output", "dir")}


def _literal_choices(cls: type) -> dict[str, tuple[object, ...]]:
    """Field name -> its allowed values, for the fields annotated ``Literal[...]`` (or ``Literal[...] | None``)."""
    out: dict[str, tuple[object, ...]] = {}
    for name, hint in get_type_hints(cls).items():
        parts = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
        values = tuple(v for part in parts if get_origin(part) is Literal for v in get_args(part))
        if values:
            out[name] = values
    return out


def _unknown(key: str, section: str, valid: list[str]) -> ConfigError:
    return ConfigError(f"unknown key {key!r} in [{section}]; valid keys: {', '.join(valid)}")


# Fields whose default is None: the type a given value must have.
_OPTIONAL_TYPES: dict[str, type] = {"text_encoder_lr": float, "unet_lr": float, "train_text_encoder": bool,
                                     "progress": bool, "cfg_scale": float}


def _check_type(section: str, key: str, value: object, default: object) -> object:
    """Coerce/check one value against its field's default type (ints are accepted for floats)."""
    where = f"[{section}] {key}"
    kind = _OPTIONAL_TYPES.get(key) if default is None else type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _section(name: str, cls: type, raw: object, base_dir: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}] must be a table, got {raw!r}")
    defaults = cls()
    valid = [f.name for f in fields(cls)]
    allowed = _literal_choices(cls)
    kwargs: dict[str, object] = {}
    for key, value in raw.items():
        if key not in valid:
            raise _unknown(key, name, valid)
        default = getattr(defaults, key)
        choices = allowed.get(key)
        if choices is not None:
            if value not in choices:
                raise ConfigError(f"[{name}] {key} must be one of {', '.join(map(str, choices))}, got {value!r}")
        elif (name, key) in _PATH_KEYS:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"[{name}] {key} must be a path string, got {value!r}")
            p = Path(value).expanduser()
            value = p if p.is_absolute() else base_dir / p
        elif isinstance(default, dict) or key == "synthetic":
            if not isinstance(value, dict):
                raise ConfigError(f"[{name}] {key} must be a table, got {value!r}")
        elif key == "betas":
            if not (isinstance(value, list) and len(value) == 2 and all(isinstance(b, int | float) for b in value)):
                raise ConfigError(f"[train] betas must be two numbers, e.g. [0.9, 0.999], got {value!r}")
            value = (float(value[0]), float(value[1]))
        elif key in ("sample_prompts", "targets"):
            if not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
                raise ConfigError(f"[{name}] {key} must be a list of strings, got {value!r}")
        else:
            value = _check_type(name, key, value, default)
        kwargs[key] = value
    return cls(**kwargs)


def _validate(cfg: TrainConfig) -> None:
    d, t, o, m = cfg.data, cfg.train, cfg.output, cfg.model
    if (d.folder is None) == (d.synthetic is None):
        raise ConfigError("[data] needs exactly one of folder = \"path\" or synthetic = { ... }")
    positive = {
        "[data] resolution": d.resolution, "[data] bucket_step": d.bucket_step, "[train] steps": t.steps,
        "[train] batch_size": t.batch_size, "[train] grad_accum": t.grad_accum,
        "[output] keep_checkpoints": o.keep_checkpoints, "[output] sample_steps": o.sample_steps,
        "[output] log_every": o.log_every,
    }
    for name, v in positive.items():
        if v < 1:
            raise ConfigError(f"{name} must be at least 1, got {v}")
    non_negative = {
        "[train] warmup_steps": t.warmup_steps, "[train] grad_clip": t.grad_clip, "[train] weight_decay":
        t.weight_decay, "[train] min_snr_gamma": t.min_snr_gamma, "[train] kl_weight": t.kl_weight,
        "[train] edge_weight": t.edge_weight, "[train] multiscale_weight": t.multiscale_weight,
        "[train] ema_start": t.ema_start, "[train] threads": t.threads, "[data] num_workers": d.num_workers,
        "[output] checkpoint_every": o.checkpoint_every, "[output] sample_every": o.sample_every,
    }
    for name, v in non_negative.items():
        if v < 0:
            raise ConfigError(f"{name} must be >= 0, got {v}")
    if not t.lr > 0:
        raise ConfigError(f"[train] lr must be > 0, got {t.lr}")
    for key in ("text_encoder_lr", "unet_lr"):
        v = getattr(t, key)
        if v is not None and not v > 0:
            raise ConfigError(f"[train] {key} must be > 0, got {v}")
    _validate_adapter(cfg)
    if not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"[train] betas must be in [0, 1), got {list(t.betas)}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"[train] ema_decay must be in [0, 1) (0 = off), got {t.ema_decay}")
    if not 0 < t.timestep_bias_portion <= 1:
        raise ConfigError(f"[train] timestep_bias_portion must be in (0, 1], got {t.timestep_bias_portion}")
    if not t.timestep_bias_multiplier > 0:
        raise ConfigError(f"[train] timestep_bias_multiplier must be > 0, got {t.timestep_bias_multiplier}")
    if not 0 <= t.timestep_bias_begin < t.timestep_bias_end <= 1000:
        raise ConfigError("[train] timestep_bias_begin and timestep_bias_end must satisfy 0 <= begin < end <= 1000, "
                          f"got {t.timestep_bias_begin} and {t.timestep_bias_end}")
    if o.cfg_scale is not None and not o.cfg_scale >= 0:
        raise ConfigError(f"[output] cfg_scale must be >= 0, got {o.cfg_scale}")
    if not t.foreground_weight > 0:
        raise ConfigError(f"[train] foreground_weight must be > 0 (1 = off), got {t.foreground_weight}")
    if t.foreground_weight != 1 and t.what == "vae":
        raise ConfigError("[train] foreground_weight only applies to what = \"diffusion\", \"lora\" or \"embedding\"; "
                          "remove it")
    if not 0 <= d.caption_dropout <= 1:
        raise ConfigError(f"[data] caption_dropout must be in [0, 1], got {d.caption_dropout}")
    if d.synthetic is not None and (d.flip or d.buckets or d.crop != "center"):
        raise ConfigError("[data] flip, buckets and random crops do not apply to the synthetic shapes (a mirrored "
                          "image would show held-out colour/position pairs); remove them")
    if d.bucket_max_ratio < 1:
        raise ConfigError(f"[data] bucket_max_ratio must be >= 1, got {d.bucket_max_ratio}")
    if d.caption_extension and not d.caption_extension.startswith("."):
        raise ConfigError(f"[data] caption_extension must start with a dot, e.g. \".txt\", got {d.caption_extension!r}")
    if m.init_from is None and m.family not in ("sd1", "sd2") and t.what not in ("lora", "embedding"):
        known = ", ".join(FAMILIES)
        if m.family in FAMILIES:
            raise ConfigError(f"[model] family {m.family!r}: training SDXL-type models (ADM input) is not "
                              "supported yet; use sd1 or sd2")
        raise ConfigError(f"[model] unknown family {m.family!r}; use sd1 or sd2 (known families: {known})")
    if m.init_from is not None and (m.unet or m.text_encoder) and t.what not in ("lora", "embedding"):
        raise ConfigError("[model] init_from takes the architecture from the checkpoint; remove [model.unet] and "
                          "[model.text_encoder] (or drop init_from to build a new model)")
    if not t.train_vae_encoder:
        if t.what != "vae":
            raise ConfigError("[train] train_vae_encoder only applies to what = \"vae\"; remove it")
        if m.vae_from is None and m.init_from is None:
            raise ConfigError("[train] train_vae_encoder = false fine-tunes the decoder of a trained VAE; set [model] "
                              "vae_from (or init_from) to it")
        if "scaling_factor" in m.vae or "shift_factor" in m.vae:
            raise ConfigError("[model.vae] scaling_factor/shift_factor: a decoder-only run keeps the VAE's latent "
                              "space and its factors; remove them")
    if t.what == "vae" and d.cache_latents:
        raise ConfigError("[data] cache_latents only applies to what = \"diffusion\"; remove it for VAE training")
    if t.device != "cpu" and not t.device.startswith("cuda"):
        raise ConfigError(f"[train] device must be cpu or cuda[:N], got {t.device!r}")
    build_model_config(cfg)  # override keys and widths are checked here


def _validate_adapter(cfg: TrainConfig) -> None:
    """Checks of what = "lora" / "embedding" and of the options only they take."""
    t, m, lo = cfg.train, cfg.model, cfg.lora
    if lo is not None and t.what != "lora":
        raise ConfigError(f"[lora] only applies to what = \"lora\" (this config trains {t.what!r}); remove it")
    if t.what != "embedding":
        for key, default in (("embedding_name", ""), ("num_vectors", 1), ("init_word", "")):
            if getattr(t, key) != default:
                raise ConfigError(f"[train] {key} only applies to what = \"embedding\"; remove it")
    if t.unet_lr is not None and t.what not in ("diffusion", "lora"):
        raise ConfigError(f"[train] unet_lr does not apply to what = {t.what!r}; use lr")
    if t.what not in ("lora", "embedding"):
        return
    if m.unet or m.text_encoder or m.vae:
        raise ConfigError(f"[model.unet] / [model.text_encoder] / [model.vae]: what = {t.what!r} trains an adapter on "
                          "a checkpoint as it is; remove them")
    if t.train_text_encoder is not None:
        hint = "; add \"text_encoder\" to [lora] targets to adapt it" if t.what == "lora" else ""
        raise ConfigError(f"[train] train_text_encoder does not apply to what = {t.what!r}: the base weights stay "
                          f"frozen{hint}")
    if t.what == "embedding":
        if t.text_encoder_lr is not None:
            raise ConfigError("[train] text_encoder_lr does not apply to what = \"embedding\" (only the new vectors "
                              "train, at lr); remove it")
        if not t.embedding_name.strip() or any(c.isspace() or c in "<>:()[]" for c in t.embedding_name):
            raise ConfigError(f"[train] embedding_name must be one word without spaces or ()[]<>:, e.g. "
                              f"\"crimson\", got {t.embedding_name!r}")
        if not 1 <= t.num_vectors <= 75:
            raise ConfigError(f"[train] num_vectors must be 1 to 75 (one prompt chunk), got {t.num_vectors}")
        if cfg.output.export != "model.safetensors":
            raise ConfigError("[output] export: an embedding is saved as <embedding_name>.safetensors (its name in "
                              "prompts is the file stem); remove export")
        return
    lo = cfg.lora = lo or LoRASection()
    if lo.rank < 1:
        raise ConfigError(f"[lora] rank must be at least 1, got {lo.rank}")
    if lo.conv_rank < 0:
        raise ConfigError(f"[lora] conv_rank must be >= 0 (0 = no 3x3 convs), got {lo.conv_rank}")
    for key in ("alpha", "conv_alpha"):
        if not getattr(lo, key) > 0:
            raise ConfigError(f"[lora] {key} must be > 0, got {getattr(lo, key)}")
    if not lo.targets:
        raise ConfigError(f"[lora] targets must name at least one of {', '.join(LORA_PARTS)}")
    bad = [p for p in lo.targets if p not in LORA_PARTS]
    if bad:
        raise ConfigError(f"[lora] targets: unknown part {bad[0]!r}; use some of {', '.join(LORA_PARTS)}")
    if lo.conv_rank and "conv" not in lo.targets:
        raise ConfigError("[lora] conv_rank is set but targets has no \"conv\"; add it or remove conv_rank")
    if t.text_encoder_lr is not None and "text_encoder" not in lo.targets:
        raise ConfigError("[train] text_encoder_lr is set but [lora] targets has no \"text_encoder\"; add it or "
                          "remove text_encoder_lr")
    if not cfg.output.export.endswith(".safetensors") or "/" in cfg.output.export:
        raise ConfigError(f"[output] export must be a file name ending in .safetensors, got {cfg.output.export!r}")


def config_from_dict(raw: dict[str, Any], base_dir: str | Path = ".", source: str = "<dict>",
                     text: str = "") -> TrainConfig:
    """A validated :class:`TrainConfig` from parsed TOML (a dict of sections); paths relative to ``base_dir``."""
    base = Path(base_dir)
    parts: dict[str, object] = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]; valid sections: {', '.join(_SECTIONS)}")
        parts[name] = _section(name, _SECTIONS[name], value, base)
    cfg = TrainConfig(**parts, source=source, text=text)  # type: ignore[arg-type]
    syn = cfg.data.synthetic
    if syn is not None and "resolution" in syn:
        given = raw.get("data", {}).get("resolution")
        if given is not None and given != syn["resolution"]:
            raise ConfigError(f"[data] resolution {given} and synthetic resolution {syn['resolution']} differ; "
                              "give it once")
        if not isinstance(syn["resolution"], int) or isinstance(syn["resolution"], bool):
            raise ConfigError(f"[data] synthetic resolution must be an integer, got {syn['resolution']!r}")
        cfg.data.resolution = syn["resolution"]
    _validate(cfg)
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a TOML training config; paths inside are relative to the file's folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the config ({e})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML ({e})") from None
    return config_from_dict(raw, p.resolve().parent, source=str(p), text=text)


def _override(obj: Any, overrides: dict[str, Any], section: str) -> Any:
    """A dataclass copy with fields replaced; lists become tuples for tuple fields; unknown keys raise."""
    valid = [f.name for f in fields(obj)]
    changes: dict[str, object] = {}
    for key, value in overrides.items():
        if key not in valid:
            raise _unknown(key, section, valid)
        current = getattr(obj, key)
        if isinstance(current, tuple) or (isinstance(value, list) and current is None):
            if not isinstance(value, list):
                raise ConfigError(f"[{section}] {key} must be a list, got {value!r}")
            value = tuple(value)
        elif current is not None and not isinstance(value, type(current)) and not (
                isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"[{section}] {key} must be a {type(current).__name__}, got {value!r}")
        changes[key] = float(value) if isinstance(current, float) else value
    return replace(obj, **changes)


def build_model_config(cfg: TrainConfig) -> ModelConfig:
    """The ModelConfig of a new model: family/preset with the ``[model.*]`` overrides and the prediction type.

    With ``init_from`` the checkpoint's config is used instead (read when the model is loaded); this returns the
    family preset then, only for validation. The UNet's ``context_dim`` follows the text encoders' widths unless
    it is overridden.
    """
    m = cfg.model
    family = m.family if m.family in ("sd1", "sd2") else "sd1"
    base: ModelConfig = TINY[family] if m.preset == "tiny" else FAMILIES[family]
    tes: tuple[TextEncoderConfig, ...] = tuple(
        _override(t, m.text_encoder, "model.text_encoder") for t in base.text_encoders)
    for t in tes:
        if t.width % t.heads:
            raise ConfigError(f"[model.text_encoder] width {t.width} is not divisible by heads {t.heads}")
        if t.max_positions != 77:
            raise ConfigError("[model.text_encoder] max_positions must stay 77 (the CLIP tokenizer's length)")
        if t.vocab_size != 49408:
            raise ConfigError("[model.text_encoder] vocab_size must stay 49408 (the CLIP tokenizer's vocabulary)")
    unet: UNetConfig = _override(base.unet, m.unet, "model.unet")
    if "context_dim" not in m.unet:
        unet = replace(unet, context_dim=sum(t.width for t in tes))
    elif unet.context_dim != sum(t.width for t in tes):
        raise ConfigError(f"[model.unet] context_dim {unet.context_dim} must equal the text encoder width "
                          f"{sum(t.width for t in tes)}; remove it (it follows the text encoder)")
    if len(unet.transformer_depth) != len(unet.channel_mult):
        raise ConfigError(f"[model.unet] transformer_depth {list(unet.transformer_depth)} needs one entry per "
                          f"level of channel_mult {list(unet.channel_mult)}")
    for mult in unet.channel_mult:
        if (mult * unet.model_channels) % unet.norm_groups:
            raise ConfigError(f"[model.unet] width {mult * unet.model_channels} is not divisible by norm_groups "
                              f"{unet.norm_groups}")
    vae: VAEConfig = _override(base.vae, m.vae, "model.vae")
    for mult in vae.ch_mult:
        if (mult * vae.ch) % vae.norm_groups:
            raise ConfigError(f"[model.vae] width {mult * vae.ch} is not divisible by norm_groups {vae.norm_groups}")
    if unet.in_channels != vae.embed_dim and cfg.train.what == "diffusion" and m.vae_from is None:
        raise ConfigError(f"[model.unet] in_channels {unet.in_channels} must equal the VAE's embed_dim "
                          f"{vae.embed_dim}")
    prediction = cfg.train.prediction or base.prediction
    return dataclasses.replace(base, unet=unet, vae=vae, text_encoders=tes, prediction=prediction)
