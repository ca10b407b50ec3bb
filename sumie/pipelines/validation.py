"""Checks of a generation request, shared by the engine (API) and the CLI, so each rule exists once.

Two kinds: model-free checks (:func:`check_request`: counts, strengths, CFG, eta / sigma noise, seed range,
sampler and schedule names), which the CLI runs before the slow model load, and the size check
(:func:`check_size`, :func:`processing_size`), which needs the VAE's downscale factor (8 for SD, 4 for a
three-level VAE such as sumie-tiny's). Messages name what the user typed: every function takes a ``name``
function from a :class:`~sumie.pipelines.params.GenerationParams` field to its name (``--cfg-scale`` for the CLI,
"CFG scale" for the API, see :func:`api_name`).

Ranges: eta and sigma noise in [0, 100] (ComfyUI's bounds; k-diffusion accepts any eta >= 0, eta > 1 only clamps
the ancestral step; a negative value takes the square root of a negative number: NaN, a black image); seeds -1
(random) or 0 .. 2**64 - 1 (what ``torch.Generator.manual_seed`` accepts), including ``seed + k`` of every image
and the eta noise seed delta. Importing this module does not import torch.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from sumie.errors import ConfigError

if TYPE_CHECKING:
    from sumie.pipelines.params import GenerationParams
    from sumie.sampling.registry import SamplerSpec

__all__ = ["ETA_MAX", "MAX_SEED_VALUE", "S_NOISE_MAX", "IgnoredSettingWarning", "Namer", "api_name", "check_request",
           "check_sampler", "check_seed", "check_size", "check_speed_options", "check_values", "effective_eta",
           "processing_size", "uses_s_noise", "uses_white_noise"]

Namer = Callable[[str], str]
MAX_SEED_VALUE = 2**64 - 1  # torch.Generator.manual_seed takes -2**63 .. 2**64 - 1; Sumie: -1 or >= 0
ETA_MAX = 100.0  # ComfyUI's node bounds for eta and s_noise
S_NOISE_MAX = 100.0
_RANDOM_SEED_MAX = 4294967293  # the largest seed -1 becomes (A1111: random.randrange(4294967294))

_LABELS = {"cfg_scale": "CFG scale", "cfg_rescale": "CFG rescale", "subseed_strength": "variation strength",
           "n_iter": "batch count", "s_noise": "s_noise", "refiner.switch_at": "refiner switch point"}


class IgnoredSettingWarning(UserWarning):
    """A setting that has no effect with the chosen sampler (it is not recorded in the infotext either)."""


def api_name(field: str) -> str:
    """How API errors name a field: its words ("batch size"), plus the field when the words differ from it."""
    label = _LABELS.get(field, field.replace("_", " "))
    return label if label.lower().replace(" ", "_") == field else f"{label} ({field})"


def _warn(message: str) -> None:
    warnings.warn(message, IgnoredSettingWarning, stacklevel=4)


def _in_range(value: float, lo: float, hi: float) -> bool:
    return math.isfinite(value) and lo <= value <= hi


def check_seed(field: str, seed: int, count: int = 1, delta: int = 0, name: Namer = api_name) -> None:
    """-1 or 0 .. 2**64 - 1, and so must be every image's ``seed + k`` (+ the eta noise seed delta)."""
    if seed < -1:
        raise ConfigError(f"{name(field)} must be -1 (random) or a number from 0 to {MAX_SEED_VALUE}, got {seed}")
    base = _RANDOM_SEED_MAX if seed == -1 else seed
    top = base + count - 1 + delta
    if top <= MAX_SEED_VALUE:
        return
    if seed == -1:
        raise ConfigError(f"{name('eta_noise_seed_delta')} {delta} is too large: seeds plus the delta must stay "
                          f"below 2**64; use a delta up to {MAX_SEED_VALUE - (top - delta)}")
    extra = f" with {count} images" if count > 1 else ""
    extra += f" and eta noise seed delta {delta}" if delta else ""
    fix = f"use a seed up to {MAX_SEED_VALUE - (top - seed)}" if extra else "use a smaller one"
    raise ConfigError(f"{name(field)} {seed} is out of range{extra}: seeds go from 0 to {MAX_SEED_VALUE} "
                      f"(2**64 - 1); {fix}, or -1 for a random seed")


def check_values(p: GenerationParams, name: Namer = api_name) -> None:
    """The numeric and enum fields of a request (no sampler lookup, no model; imports nothing heavy)."""
    if p.steps < 1:
        raise ConfigError(f"{name('steps')} must be at least 1, got {p.steps}")
    for field in ("batch_size", "n_iter"):
        if getattr(p, field) < 1:
            raise ConfigError(f"{name(field)} must be at least 1, got {getattr(p, field)}")
    if p.cfg_scale is not None and not math.isfinite(p.cfg_scale):
        raise ConfigError(f"{name('cfg_scale')} must be a finite number, got {p.cfg_scale}")
    if not _in_range(p.cfg_rescale, 0.0, 1.0):
        raise ConfigError(f"{name('cfg_rescale')} must be in [0, 1] (0 = off, 0.7 is usual), got {p.cfg_rescale}")
    for field in ("subseed_strength", "denoising_strength"):
        if not _in_range(getattr(p, field), 0.0, 1.0):
            raise ConfigError(f"{name(field)} must be in [0, 1], got {getattr(p, field)}")
    if p.clip_skip < 1:
        raise ConfigError(f"{name('clip_skip')} must be 1 (off) or more, got {p.clip_skip}")
    if p.convention not in ("a1111", "diffusers"):
        raise ConfigError(f"unknown {name('convention')} {p.convention!r}; use a1111 or diffusers")
    if p.vae_tiling not in ("auto", "on", "off"):
        raise ConfigError(f"unknown {name('vae_tiling')} {p.vae_tiling!r}; use auto, on or off")
    if p.vae_tile_size < 32 or p.vae_tile_size % 8:
        raise ConfigError(f"{name('vae_tile_size')} must be a multiple of 8 of at least 32 pixels (512 is usual), got "
                          f"{p.vae_tile_size}")
    if p.styles:
        raise ConfigError("styles are not supported by the engine; put the style text into the prompt")
    if p.eta_noise_seed_delta < 0:
        raise ConfigError(f"{name('eta_noise_seed_delta')} must be >= 0, got {p.eta_noise_seed_delta}")
    if p.eta is not None and not _in_range(p.eta, 0.0, ETA_MAX):
        raise ConfigError(f"{name('eta')} must be in [0, {ETA_MAX:g}] (0 = no added noise, 1 = the sampler's "
                          f"usual amount), got {p.eta}")
    if p.s_noise is not None and not _in_range(p.s_noise, 0.0, S_NOISE_MAX):
        raise ConfigError(f"{name('s_noise')} must be in [0, {S_NOISE_MAX:g}] (1 = unscaled noise), got {p.s_noise}")
    if p.refiner is not None and not _in_range(p.refiner.switch_at, 0.0, 1.0):
        raise ConfigError(f"{name('refiner.switch_at')} must be in [0, 1], got {p.refiner.switch_at}")
    check_speed_options(p, name)
    count = max(p.batch_size, len(p.init_images)) * p.n_iter
    check_seed("seed", int(p.seed), 1 if p.subseed_strength else count, p.eta_noise_seed_delta, name)
    check_seed("subseed", int(p.subseed), count, 0, name)


def check_speed_options(p: GenerationParams, name: Namer = api_name) -> None:
    """The speed options that change the image: ToMe ratios, NGMS, Skip Early CFG, DeepCache."""
    for field in ("token_merging_ratio", "token_merging_ratio_hr"):
        if not _in_range(getattr(p, field), 0.0, 0.9):
            raise ConfigError(f"{name(field)} must be in [0, 0.9] (0 = off, A1111's slider), got {getattr(p, field)}")
    if not _in_range(p.s_min_uncond, 0.0, 1000.0):
        raise ConfigError(f"{name('s_min_uncond')} must be a sigma >= 0 (0 = off), got {p.s_min_uncond}")
    if not _in_range(p.skip_early_cond, 0.0, 1.0):
        raise ConfigError(f"{name('skip_early_cond')} must be in [0, 1] (a fraction of the steps), got "
                          f"{p.skip_early_cond}")
    if p.deepcache_interval < 0 or p.deepcache_interval > 1000:
        raise ConfigError(f"{name('deepcache_interval')} must be 0 or 1 (off) or N >= 2 (a full UNet call every N "
                          f"calls), got {p.deepcache_interval}")
    if p.deepcache_depth < 0:
        raise ConfigError(f"{name('deepcache_depth')} must be >= 0 (0 = the shallowest skip branch), got "
                          f"{p.deepcache_depth}")


def effective_eta(spec: SamplerSpec, eta: float | None) -> float | None:
    """The eta a sampler runs with: the request's, else the registry's or the function's default (None: no eta)."""
    params = inspect.signature(spec.function).parameters
    if "eta" not in params:
        return None
    return eta if eta is not None else spec.kwargs.get("eta", params["eta"].default)


def uses_white_noise(spec: SamplerSpec, eta: float | None) -> bool:
    """Whether a sampler draws per-image white noise after the initial noise (where A1111's ENSD changes the image);
    the DPM++ SDE family draws Brownian noise instead."""
    if not spec.stochastic or spec.needs_brownian:
        return False
    value = effective_eta(spec, eta)
    return value is None or value != 0


def uses_s_noise(spec: SamplerSpec, eta: float | None) -> bool:
    """Whether a sampler's result depends on ``s_noise``: it scales the noise of ancestral / SDE steps (not when
    eta is 0) and Restart's; Euler, Heun and DPM2 take it only for churn, which Sumie runs at 0."""
    params = inspect.signature(spec.function).parameters
    if "s_noise" not in params:
        return False
    if "s_churn" in params and not spec.kwargs.get("s_churn", params["s_churn"].default):
        return False
    if "eta" in params:
        return effective_eta(spec, eta) != 0
    return True


def _samplers_with(option: str) -> str:
    from sumie.sampling import registry

    names = [(s.a1111 or (s.name,))[0] for s in registry.SAMPLERS
             if option in inspect.signature(s.function).parameters and (option != "s_noise" or uses_s_noise(s, None))]
    return ", ".join(names)


def check_sampler(p: GenerationParams, name: Namer = api_name,
                  warn: Callable[[str], None] | None = None) -> tuple[SamplerSpec, str]:
    """Resolve the sampler and schedule names; eta / s_noise only for samplers that take them -> (spec, schedule).

    ``s_noise`` that the sampler takes but does not use here (Euler without churn, an ancestral sampler at eta 0)
    is reported through ``warn`` (default: an :class:`IgnoredSettingWarning`).
    """
    from sumie.sampling import registry

    spec, schedule = registry.resolve(p.sampler, p.scheduler)
    params = inspect.signature(spec.function).parameters
    label = (spec.a1111 or (spec.name,))[0]
    if p.eta is not None and "eta" not in params:
        raise ConfigError(f"sampler {label} has no eta; leave {name('eta')} out (it applies to "
                          f"{_samplers_with('eta')})")
    if p.s_noise is not None:
        if "s_noise" not in params:
            raise ConfigError(f"sampler {label} has no sigma noise; leave {name('s_noise')} out (it applies to "
                              f"{_samplers_with('s_noise')})")
        if not uses_s_noise(spec, p.eta):
            why = "at eta 0 it adds no noise" if "eta" in params else "it scales only churn noise, which is off"
            (warn or _warn)(f"{name('s_noise')} has no effect with sampler {label} ({why}); it is ignored and not "
                            "written to the image's parameters")
    return spec, schedule


def check_request(p: GenerationParams, name: Namer = api_name,
                  warn: Callable[[str], None] | None = None) -> tuple[SamplerSpec, str]:
    """Every check that needs no model: :func:`check_values`, then :func:`check_sampler` -> (spec, schedule)."""
    check_values(p, name)
    return check_sampler(p, name, warn)


def check_size(width: int | None, height: int | None, factor: int, name: Namer = api_name) -> None:
    """Width and height (when given) must be positive multiples of the VAE's downscale ``factor``."""
    for field, value in (("width", width), ("height", height)):
        if value is not None and (value < factor or value % factor):
            lo = max(factor, value // factor * factor)
            raise ConfigError(f"{name(field)} {value} is not a multiple of {factor}; use {lo} or {lo + factor} "
                              f"(this model's VAE turns each {factor}x{factor} pixels into one latent pixel)")


def processing_size(p: GenerationParams, factor: int, native: int, name: Namer = api_name) -> tuple[int, int]:
    """(width, height) of a request: as given, else the init image's rounded down to the factor (img2img), else
    the model's native size; checked with :func:`check_size`."""
    if p.init_images and (p.width is None or p.height is None):
        w0, h0 = p.init_images[0].size
        width = p.width if p.width is not None else max(factor, w0 // factor * factor)
        height = p.height if p.height is not None else max(factor, h0 // factor * factor)
    else:
        width = p.width if p.width is not None else native
        height = p.height if p.height is not None else native
    check_size(int(width), int(height), factor, name)
    return int(width), int(height)
