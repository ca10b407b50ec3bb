"""A1111's generation parameters text ("infotext"): write it as A1111 1.10 does, read A1111's and other tools'.

The text is what A1111 stores in a PNG's ``parameters`` chunk and shows under an image::

    a cat, masterpiece
    Negative prompt: lowres
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

:func:`format_infotext` follows A1111 1.10's ``create_infotext`` (``modules/processing.py``): the prompt, a
``Negative prompt:`` line only when there is one, then ``key: value`` pairs in A1111's order. The fixed fields come
first in A1111's literal order (Steps ... Tiling); then the extra fields in the order A1111's pipeline adds them
(img2img/inpaint and hires fields at init, the caller's ``extra`` such as ``Lora hashes`` when extra networks load,
sampler fields like ``Eta`` when sampling starts, the refiner at its switch); an extra field that A1111 also lists
among the fixed ones (``VAE``, ``Seed resize from``, ...) takes that fixed place, as A1111's dict merge does. Last
comes ``Version``. Values go through A1111's ``quote``: JSON-quoted when they hold ``,``, ``:`` or a newline.

Choices where A1111 has several behaviours, or none:

* Numbers print as A1111's web UI writes them: its sliders send JSON numbers, so a whole number prints without a
  fraction (``CFG scale: 7``, ``Hires upscale: 2``) and others as Python's shortest repr (``CFG scale: 7.5``).
  (A1111 called through its API with ``7.0`` would print ``7.0``; both parse to the same value.)
* ``RNG: CPU`` is always written: Sumie draws each image's noise from a CPU generator, which is A1111's
  "Random number generator source: CPU" setting. Pasting the text into A1111 selects that source, so A1111
  reproduces the image; A1111's default GPU source would give different noise.
* ``Version: sumie-<version>``. Tools read fields by name, so the value is free text; A1111 parses it with
  ``packaging`` to switch on compatibility options for old versions. ``sumie-0.1.0`` is no valid version there,
  so A1111 switches nothing on (a bare ``0.1.0`` would read as older than 1.6.0 and turn on old behaviours).
* Values that A1111's ``quote`` would leave unquoted but that its parser would then misread (an empty value, one
  with leading or trailing spaces, one starting with ``"``) are quoted too; A1111 reads them back correctly.
* Samplers and schedules are written with A1111's labels. A ComfyUI-flavoured sampler that behaves differently
  from A1111's namesake (``uni_pc``, ``dpmpp_3m_sde``: see ``sumie.sampling.registry``) and schedules A1111 does not
  have (``beta_comfyui``, ``linear_quadratic``, ...) keep Sumie's names, so Sumie reads back the same run; A1111
  falls back to its defaults for names it does not know.
* Sumie-only settings get their own fields, written only when they differ from the default: ``CFG Rescale``
  (the key of the CFG-Rescale extension for A1111), ``SDXL original size`` / ``SDXL target size`` (WxH),
  ``SDXL crop`` (TOPxLEFT), ``Convention`` (``diffusers``).

:func:`parse_infotext` follows A1111's ``parse_generation_parameters`` (``modules/infotext_utils.py``), with its
defaults for missing fields, old hires-fix fields and version back-compatibility flags; it also splits old
combined sampler labels ("DPM++ 2M Karras") when no ``Schedule type`` is given. :func:`params_from_infotext` turns
a text into :class:`GenerationParams` (``sumie generate --from-png``).
"""

from __future__ import annotations

import inspect
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from sumie import __version__
from sumie.errors import ConfigError
from sumie.pipelines.params import DEFAULT_CFG_SCALE, GenerationParams, HiresParams, InpaintParams, RefinerParams
from sumie.pipelines.validation import uses_s_noise
from sumie.sampling import registry, schedules

if TYPE_CHECKING:
    from PIL import Image

VERSION = f"sumie-{__version__}"

# A1111 1.10 create_infotext's fixed fields, in order; "Version" and "User" follow the extra fields.
FIXED_FIELDS: tuple[str, ...] = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration", "Size",
    "Model hash", "Model", "FP8 weight", "Cache FP16 weight for LoRA", "VAE hash", "VAE", "Variation seed",
    "Variation seed strength", "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip",
    "ENSD", "Token merging ratio", "Token merging ratio hr", "Init image hash", "RNG", "Tiling",
)
TRAILING_FIELDS: tuple[str, ...] = ("Version", "User")

# A key, then a JSON-quoted value or anything up to the next comma (A1111's ``re_param``).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]+")
_IMAGE_SIZE = re.compile(r"^(\d+)x(\d+)$")

_UPSCALERS = {"latent": "Latent", "lanczos": "Lanczos"}
_MASKED_CONTENT = {"fill": "fill", "latent_noise": "latent noise", "latent_nothing": "latent nothing"}
_MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".gguf")

# Fields that change an A1111 image but have no GenerationParams counterpart: (field, value(s) that are harmless).
_UNSUPPORTED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Image CFG scale", ()), ("Face restoration", ()), ("Seed resize from-1", ()),
    ("Tiling", ("False",)), ("Noise multiplier", ("1", "1.0")),
    ("Hires prompt", ("",)), ("Hires negative prompt", ("",)), ("Hires sampler", ("Use same sampler",)),
    ("Hires schedule type", ("Use same scheduler",)), ("Hires checkpoint", ("Use same checkpoint",)),
    ("Sigma churn", ()), ("Sigma tmin", ()), ("Sigma tmax", ()), ("Schedule rho", (0, "0")),
    ("Schedule min sigma", (0, "0")), ("Schedule max sigma", (0, "0")), ("Discard penultimate sigma", ("False",)),
    ("Emphasis", ("Original",)), ("Pad conds v0", ("False",)),
    ("Old prompt editing timelines", ("False",)), ("Downcast alphas_cumprod", ("False",)),
    ("Refiner switch by sampling steps", ("False",)), ("VAE Encoder", ("Full",)), ("VAE Decoder", ("Full", "TAESD")),
    ("FP8 weight", ("Disable",)),
)


# --- values ---


def format_value(value: object) -> str:
    """A value as A1111's web UI writes it: whole floats without a fraction, booleans as True/False."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def quote(value: object) -> str:
    """A1111's ``quote``: JSON-quote (non-ASCII kept) a value holding ``,``, ``:`` or a newline; also one A1111
    would misread unquoted (empty, leading/trailing whitespace, a leading ``"``)."""
    text = format_value(value)
    if any(c in text for c in ",:\n") or text != text.strip() or text.startswith('"') or not text:
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    """A1111's ``unquote``: a JSON-quoted value decoded, anything else as it is."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


# --- samplers and schedules ---


def _same_run(a: tuple[registry.SamplerSpec, str], b: tuple[registry.SamplerSpec, str]) -> bool:
    (sa, ka), (sb, kb) = a, b
    return (sa.name, sa.discard_penultimate_sigma, sa.tail, ka) == (sb.name, sb.discard_penultimate_sigma, sb.tail, kb)


def sampler_labels(sampler: str, scheduler: str | None = "Automatic") -> tuple[str, str]:
    """(``Sampler``, ``Schedule type``) as A1111 1.10 writes them: ("dpmpp_2m", None) -> ("DPM++ 2M", "Karras"),
    ("Euler a", "Automatic") -> ("Euler a", "Automatic"), ("DPM++ 2M Karras", None) -> ("DPM++ 2M", "Karras").

    "Automatic" becomes the sampler's default schedule label where A1111 has one (it writes the schedule it
    used), else stays "Automatic". The pair always resolves back (``registry.resolve``) to the same sampler,
    flavor behaviour and schedule; Sumie's own names are written where A1111's labels would not.
    """
    run = registry.resolve(sampler, scheduler)
    spec, schedule = run
    try:
        registry.get_sampler(sampler)
        suffix = False
    except ConfigError:
        suffix = True  # "DPM++ 2M Karras": the label names its schedule
    typed = (scheduler or "").strip()
    explicit = suffix or typed.lower() not in ("", "automatic")
    label = spec.a1111[0] if spec.a1111 else spec.name
    labels = registry.schedule_aliases(schedule)[0]
    if not explicit:
        default = schedules.A1111_DEFAULT_SCHEDULE.get(label.lower())
        schedule_text = registry.schedule_aliases(default)[0][0] if default else "Automatic"
    else:
        matching = [x for x in labels if x.lower() == typed.lower()]
        schedule_text = matching[0] if matching else (labels[0] if labels else schedule)
    for s in dict.fromkeys((label, spec.name)):
        for k in dict.fromkeys((schedule_text, schedule)):
            try:
                if _same_run(registry.resolve(s, k), run):
                    return s, k
            except ConfigError:
                continue
    return spec.name, schedule


def _model_label(model: str) -> str:
    """A model path or name as A1111 names it in infotexts: the file name without its extension."""
    name = PurePath(model).name
    for suffix in _MODEL_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# --- writing ---


def _is_img2img(params: GenerationParams) -> bool:
    return bool(params.init_images) or params.inpaint is not None


def _init_fields(params: GenerationParams) -> dict[str, object]:
    """Fields A1111 adds while setting up the job (img2img/inpaint init, txt2img hires init), in its order."""
    out: dict[str, object] = {}
    if _is_img2img(params):
        out["Denoising strength"] = params.denoising_strength
        ip = params.inpaint
        if ip is not None:
            if ip.invert:
                out["Mask mode"] = "Inpaint not masked"
            if ip.mask_blur > 0:
                out["Mask blur"] = ip.mask_blur
            if ip.full_res:
                out["Inpaint area"] = "Only masked"
                out["Masked area padding"] = ip.full_res_padding
            if ip.fill in _MASKED_CONTENT:
                out["Masked content"] = _MASKED_CONTENT[ip.fill]
    hr = params.hires
    if hr is not None:
        if _is_img2img(params):
            out["Hires denoising strength"] = hr.denoising_strength  # Sumie only: A1111 has no img2img hires
        else:
            out["Denoising strength"] = hr.denoising_strength
        if hr.resize_x == 0 and hr.resize_y == 0:
            out["Hires upscale"] = hr.scale
        else:
            out["Hires resize"] = f"{hr.resize_x}x{hr.resize_y}"
        if hr.steps:
            out["Hires steps"] = hr.steps
        out["Hires upscaler"] = _UPSCALERS.get(str(hr.upscaler), _upscaler_name(str(hr.upscaler)))
    return out


def _upscaler_name(name: str) -> str:
    """A hires upscaler model as A1111 names it: a file's stem (a path or a file name), else the name as given."""
    p = Path(name)
    return p.stem if p.suffix.lower() in (".pth", ".pt", ".safetensors", ".sft", ".ckpt", ".bin") else name


def _sampler_fields(params: GenerationParams, spec: registry.SamplerSpec, schedule: str) -> dict[str, object]:
    """Fields A1111's sampler adds when sampling starts (schedule options, eta, sigma noise), then Sumie's own."""
    out: dict[str, object] = {}
    if schedule == "beta_a1111":  # A1111 writes its Beta options (defaults 0.6, Sumie's too)
        out["Beta schedule alpha"] = 0.6
        out["Beta schedule beta"] = 0.6
    accepted = inspect.signature(spec.function).parameters
    if params.eta is not None and "eta" in accepted and params.eta != accepted["eta"].default:
        out["Eta DDIM" if spec.name == "ddim" else "Eta"] = params.eta
    if (params.s_noise is not None and "s_noise" in accepted and params.s_noise != accepted["s_noise"].default
            and uses_s_noise(spec, params.eta)):  # not where it has no effect (Euler without churn, eta 0)
        out["Sigma noise"] = params.s_noise
    if params.cfg_rescale:
        out["CFG Rescale"] = params.cfg_rescale
    out.update(speed_fields(params))
    return out


def speed_fields(params: GenerationParams) -> dict[str, object]:
    """A1111's fields of the speed options that change the image, written when on (NGMS, Skip Early CFG, VAE
    Decoder; the token merging ratios have their fixed places), then Sumie's own (token merging random, DeepCache)."""
    out: dict[str, object] = {}
    if params.skip_early_cond:
        out["Skip Early CFG"] = params.skip_early_cond
    if params.s_min_uncond:
        out["NGMS"] = params.s_min_uncond
        if params.s_min_uncond_all:
            out["NGMS all steps"] = True
    if params.taesd_decode:
        out["VAE Decoder"] = "TAESD"
    if params.token_merging_random and (params.token_merging_ratio or params.token_merging_ratio_hr):
        out["Token merging random"] = True
    if params.deepcache_interval > 1:
        out["DeepCache interval"] = params.deepcache_interval
        out["DeepCache depth"] = params.deepcache_depth
    return out


def _sumie_fields(params: GenerationParams) -> dict[str, object]:
    """Sumie-only settings, written when not the default."""
    out: dict[str, object] = {}
    if params.sdxl_original_size is not None:
        h, w = params.sdxl_original_size
        out["SDXL original size"] = f"{w}x{h}"
    if tuple(params.sdxl_crop) != (0, 0):
        out["SDXL crop"] = f"{params.sdxl_crop[0]}x{params.sdxl_crop[1]}"
    if params.sdxl_target_size is not None:
        h, w = params.sdxl_target_size
        out["SDXL target size"] = f"{w}x{h}"
    if params.convention != "a1111":
        out["Convention"] = params.convention
    return out


def infotext_fields(params: GenerationParams, *, seed: int, subseed: int, index: int = 0, model_name: str | None,
                    model_hash: str | None, extra: Mapping[str, object] | None = None) -> dict[str, object]:
    """The ``key: value`` fields of one image in A1111's order (None-valued fields dropped), before quoting.

    ``seed``/``subseed`` are this image's seeds (A1111: ``seed + index`` without variation, else ``seed``; the
    variation seed ``subseed + index``); ``index`` picks this image's entry of list-valued ``extra`` fields.
    ``extra``: more fields, e.g. ``{"Lora hashes": "name: hash", "TI hashes": ..., "VAE": ...}``.
    """
    if params.width is None or params.height is None:
        raise ConfigError("the infotext needs the image size: set params.width and params.height "
                          "(the pipeline fills in the model's native size before writing metadata)")
    spec, schedule = registry.resolve(params.sampler, params.scheduler)
    sampler_text, schedule_text = sampler_labels(params.sampler, params.scheduler)
    variation = params.subseed_strength != 0
    fields: dict[str, object | None] = dict.fromkeys(FIXED_FIELDS)
    fields.update({
        "Steps": params.steps, "Sampler": sampler_text, "Schedule type": schedule_text,
        "CFG scale": DEFAULT_CFG_SCALE if params.cfg_scale is None else params.cfg_scale,
        "Seed": seed, "Size": f"{params.width}x{params.height}", "Model hash": model_hash or None,
        "Model": model_name or None, "Variation seed": subseed if variation else None,
        "Variation seed strength": params.subseed_strength if variation else None,
        "Clip skip": params.clip_skip if params.clip_skip > 1 else None, "RNG": "CPU",
        "Token merging ratio": params.token_merging_ratio or None,
        "Token merging ratio hr": (params.token_merging_ratio_hr or params.token_merging_ratio or None)
        if params.hires is not None else None,
    })
    fields.update(_init_fields(params))
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ConfigError(f"infotext field name {key!r} is not usable: start with a letter or digit and use only "
                              "letters, digits, spaces, '-' and '/' (at least 2 characters)")
        fields[key] = value[index] if isinstance(value, list) else value
    fields.update(_sampler_fields(params, spec, schedule))
    if params.refiner is not None:
        fields["Refiner"] = _model_label(params.refiner.model)
        fields["Refiner switch at"] = params.refiner.switch_at
    fields.update(_sumie_fields(params))
    fields["Version"] = VERSION
    return {k: v for k, v in fields.items() if v is not None}


def join_infotext(prompt: str, negative_prompt: str, fields: Mapping[str, object]) -> str:
    """Prompt, ``Negative prompt:`` line (when non-empty) and the quoted fields, as A1111 joins them."""
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in fields.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def format_infotext(params: GenerationParams, *, seed: int, subseed: int, index: int, model_name: str | None,
                    model_hash: str | None, extra: Mapping[str, object] | None = None) -> str:
    """The A1111 1.10 ``parameters`` text of one image (see the module docstring; arguments as
    :func:`infotext_fields`)."""
    fields = infotext_fields(params, seed=seed, subseed=subseed, index=index, model_name=model_name,
                             model_hash=model_hash, extra=extra)
    return join_infotext(params.prompt, params.negative_prompt, fields)


# --- reading ---


def _version_key(text: object) -> tuple[int, ...] | None:
    """A1111's ``infotext_versions.parse_version`` as a sortable key (v1.7.0-225-gabc -> 1.7.0 post 225), or None."""
    if not isinstance(text, str):
        return None
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:-?(rc|RC)(\d*))?(?:-(\d+)(?:-.*)?)?", text.strip())
    if m is None:
        return None
    major, minor, patch, rc, rc_n, post = m.groups()
    return int(major), int(minor), int(patch or 0), 0 if rc else 1, int(rc_n or 0), int(post or 0)


def _backcompat(res: dict[str, Any]) -> None:
    """A1111's ``infotext_versions.backcompat``: flags for behaviours of the A1111 version that wrote the text."""
    ver = _version_key(res.get("Version"))
    if ver is None:
        return
    if ver < (1, 6, 0, 1, 0, 0) and "[" in res.get("Prompt", ""):
        res["Old prompt editing timelines"] = True
    if ver < (1, 6, 0, 1, 0, 0) and res.get("Sampler", "") in ("DDIM", "PLMS"):
        res["Pad conds v0"] = True
    if ver < (1, 7, 0, 1, 0, 225):
        res["Downcast alphas_cumprod"] = True
    if ver < (1, 8, 0, 1, 0, 0) and res.get("Refiner"):
        res["Refiner switch by sampling steps"] = True


def _old_hires_first_pass(width: int, height: int) -> tuple[int, int]:
    """A1111's old automatic first-pass size: about 512x512 pixels, rounded up to multiples of 64."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def _restore_old_hires(res: dict[str, Any]) -> None:
    """Texts with the pre-1.0 ``First pass size`` field: Size becomes the first pass, the old Size the hires size."""
    fw, fh = res.get("First pass size-1"), res.get("First pass size-2")
    if fw is None or fh is None:
        return
    fw, fh = int(fw), int(fh)
    width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
    if fw == 0 or fh == 0:
        fw, fh = _old_hires_first_pass(width, height)
    res["Size-1"], res["Size-2"] = fw, fh
    res["Hires resize-1"], res["Hires resize-2"] = width, height


def _split_old_sampler(res: dict[str, Any]) -> None:
    """Old texts name the schedule in the sampler ("DPM++ 2M Karras"): split it into Sampler and Schedule type."""
    sampler = res.get("Sampler")
    if not isinstance(sampler, str):
        return
    try:
        registry.get_sampler(sampler)
        return
    except ConfigError:
        pass
    labels = sorted({lab for a1111, _ in registry.SCHEDULE_ALIASES.values() for lab in a1111}, key=len, reverse=True)
    for label in labels:
        head = sampler[: -len(label) - 1]
        if sampler.lower().endswith(" " + label.lower()) and head:
            try:
                registry.get_sampler(head)
            except ConfigError:
                continue
            res["Sampler"], res["Schedule type"] = head, label
            return


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's ``parse_generation_parameters``: {"Prompt", "Negative prompt", every ``key: value`` (WxH values
    split into ``key-1``/``key-2``), A1111's defaults for missing fields (``Clip skip`` "1", ``Schedule type``
    "Automatic", ``RNG`` "GPU", ...)}. Values are strings as written (quoted ones decoded); defaults keep A1111's
    types. Old combined sampler labels are split when the text has no ``Schedule type``."""
    res: dict[str, Any] = {}
    prompt, negative, in_negative = "", "", False
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for key, value in _PARAM.findall(last):
        if not value:
            continue  # A1111 fails on an empty value and skips the field
        if value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        m = _IMAGE_SIZE.match(value)
        if m is not None:
            res[f"{key}-1"], res[f"{key}-2"] = m.group(1), m.group(2)
        else:
            res[key] = value
    res.setdefault("Clip skip", "1")
    if res.get("Hypernet") is not None:
        res["Prompt"] += f"<hypernet:{res['Hypernet']}:{res.get('Hypernet strength', '1.0')}>"
    if "Hires resize-1" not in res:
        res["Hires resize-1"], res["Hires resize-2"] = 0, 0
    had_schedule = "Schedule type" in res
    for key, default in (("Hires sampler", "Use same sampler"), ("Hires checkpoint", "Use same checkpoint"),
                         ("Hires prompt", ""), ("Hires negative prompt", ""), ("Mask mode", "Inpaint masked"),
                         ("Masked content", "original"), ("Inpaint area", "Whole picture"),
                         ("Masked area padding", 32)):
        res.setdefault(key, default)
    _restore_old_hires(res)
    for key, default in (("RNG", "GPU"), ("Schedule type", "Automatic"), ("Schedule max sigma", 0),
                         ("Schedule min sigma", 0), ("Schedule rho", 0), ("VAE Encoder", "Full"),
                         ("VAE Decoder", "Full"), ("FP8 weight", "Disable")):
        res.setdefault(key, default)
    if res["FP8 weight"] != "Disable":
        res.setdefault("Cache FP16 weight for LoRA", False)
    _backcompat(res)
    if not had_schedule:
        _split_old_sampler(res)
    return res


def _number(d: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    """A numeric field converted to ``kind`` (int or float), or ``default`` when missing."""
    if key not in d:
        return default
    value = d[key]
    try:
        return kind(value) if kind is float else int(str(value).strip())
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"infotext field {key!r} is {value!r}, not {what}; fix it in the text") from None


def _size_pair(d: Mapping[str, Any], key: str) -> tuple[int, int] | None:
    """A ``key: WxH`` field as (height, width), or None."""
    if f"{key}-1" not in d:
        return None
    return _number(d, f"{key}-2", int, 0), _number(d, f"{key}-1", int, 0)


def unsupported_fields(d: Mapping[str, Any]) -> list[str]:
    """Fields of a parsed text that change the image but that Sumie cannot apply (``key: value`` strings)."""
    notes = [f"{k}: {d[k]}" for k, harmless in _UNSUPPORTED if k in d and d[k] not in harmless]
    if d.get("ENSD", "0") != "0" and not hasattr(GenerationParams, "eta_noise_seed_delta"):
        notes.append(f"ENSD: {d['ENSD']}")
    if d.get("RNG", "GPU") != "CPU":
        notes.append(f"RNG: {d.get('RNG', 'GPU')} (Sumie draws noise like A1111's CPU source)")
    return notes


def params_from_infotext(text: str | Mapping[str, Any],
                         warn: Callable[[str], None] | None = None) -> GenerationParams:
    """GenerationParams from an infotext (or a :func:`parse_infotext` dict), for ``sumie generate --from-png``.

    Restores what the text stores: prompts, steps, sampler and schedule, CFG, seeds, size, clip skip, denoising
    strength (img2img: the init image itself is not in the text), hires fix, eta, sigma noise, refiner, and Sumie's
    own fields. A warning lists fields Sumie cannot apply (e.g. A1111's GPU noise source, a hires prompt): given to
    ``warn`` when set, else a Python ``UserWarning``.
    """
    d = parse_infotext(text) if isinstance(text, str) else dict(text)
    sampler = str(d.get("Sampler", GenerationParams.sampler))
    scheduler = str(d.get("Schedule type", "Automatic"))
    spec, _ = registry.resolve(sampler, scheduler)  # unknown names fail here with the list of valid ones
    size = _size_pair(d, "Size")
    p = GenerationParams(
        prompt=d.get("Prompt", ""), negative_prompt=d.get("Negative prompt", ""),
        steps=_number(d, "Steps", int, 20), cfg_scale=_number(d, "CFG scale", float, DEFAULT_CFG_SCALE),
        sampler=sampler, scheduler=scheduler, seed=_number(d, "Seed", int, -1),
        width=size[1] if size else None, height=size[0] if size else None,
        clip_skip=_number(d, "Clip skip", int, 1), cfg_rescale=_number(d, "CFG Rescale", float, 0.0),
    )
    if "CFG Rescale φ" in d:
        p.cfg_rescale = _number(d, "CFG Rescale φ", float, 0.0)
    p.subseed_strength = _number(d, "Variation seed strength", float, 0.0)
    if p.subseed_strength:
        p.subseed = _number(d, "Variation seed", int, -1)
    eta_key = "Eta DDIM" if spec.name == "ddim" else "Eta"
    p.eta = _number(d, eta_key, float, None)
    p.s_noise = _number(d, "Sigma noise", float, None)
    if hasattr(p, "eta_noise_seed_delta"):
        p.eta_noise_seed_delta = _number(d, "ENSD", int, 0)
    resize = (_number(d, "Hires resize-1", int, 0), _number(d, "Hires resize-2", int, 0))
    hires = any(k in d for k in ("Hires upscale", "Hires upscaler", "Hires steps")) or resize != (0, 0)
    if hires:
        upscaler = str(d.get("Hires upscaler", "Latent"))
        found = {v.lower(): k for k, v in _UPSCALERS.items()}.get(upscaler.lower())
        if found is None and upscaler.lower().split(" (")[0] in ("latent", "none", "nearest"):
            raise ConfigError(f"hires upscaler {upscaler!r} is not available in Sumie (it has Latent, Lanczos and "
                              "upscaler models); change 'Hires upscaler' in the text to one of them")
        found = found or upscaler  # an upscaler model's name, looked up when the job runs
        strength_key = "Hires denoising strength" if "Hires denoising strength" in d else "Denoising strength"
        p.hires = HiresParams(scale=_number(d, "Hires upscale", float, 2.0), upscaler=found,
                              steps=_number(d, "Hires steps", int, 0),
                              denoising_strength=_number(d, strength_key, float, 0.7),
                              resize_x=resize[0], resize_y=resize[1])
        if strength_key == "Hires denoising strength":
            p.denoising_strength = _number(d, "Denoising strength", float, 0.75)
    else:
        p.denoising_strength = _number(d, "Denoising strength", float, 0.75)
    if d.get("Refiner"):
        model = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", str(d["Refiner"]))  # A1111's "name [hash]"
        p.refiner = RefinerParams(model=model, switch_at=_number(d, "Refiner switch at", float, 0.8))
    p.sdxl_original_size = _size_pair(d, "SDXL original size")
    p.sdxl_target_size = _size_pair(d, "SDXL target size")
    if "SDXL crop-1" in d:
        p.sdxl_crop = (_number(d, "SDXL crop-1", int, 0), _number(d, "SDXL crop-2", int, 0))
    convention = d.get("Convention", "a1111")
    if convention not in ("a1111", "diffusers"):
        raise ConfigError(f"infotext field 'Convention' is {convention!r}; use a1111 or diffusers")
    p.convention = convention
    p.pad_conds = str(d.get("Pad conds", "False")) == "True"
    p.token_merging_ratio = _number(d, "Token merging ratio", float, 0.0)
    p.token_merging_ratio_hr = _number(d, "Token merging ratio hr", float, 0.0)
    p.token_merging_random = str(d.get("Token merging random", "False")) == "True"
    p.s_min_uncond = _number(d, "NGMS", float, 0.0)
    p.s_min_uncond_all = str(d.get("NGMS all steps", "False")) == "True"
    p.skip_early_cond = _number(d, "Skip Early CFG", float, 0.0)
    p.deepcache_interval = _number(d, "DeepCache interval", int, 0)
    p.deepcache_depth = _number(d, "DeepCache depth", int, 0)
    p.taesd_decode = str(d.get("VAE Decoder", "Full")) == "TAESD"
    p.controlnets = controlnets_from_infotext(d)
    notes = unsupported_fields(d)
    if notes:
        message = "the image will differ: Sumie cannot apply " + "; ".join(notes)
        if warn is not None:
            warn(message)
        else:
            warnings.warn(message, UserWarning, stacklevel=2)
    return p


def controlnets_from_infotext(d: Mapping[str, Any]) -> list[Any]:
    """The ``ControlNet N`` units of a parsed infotext (A1111's extension format), in order, without their images
    (the PNG does not hold them: give them again); the model stays ``name [hash]`` (found by name, else by hash)."""
    from sumie.adapters.control.units import parse_infotext_value
    from sumie.pipelines.params import ControlUnit

    units: list[ControlUnit] = []
    keys = sorted((int(m.group(1)), k) for k in d if (m := re.fullmatch(r"ControlNet (\d+)", str(k))))
    for _, key in keys:
        f = parse_infotext_value(str(d[key]))
        units.append(ControlUnit(
            model=str(f.get("model", "")), image=None, weight=float(f.get("weight", 1.0)),
            start=float(f.get("guidance_start", 0.0)), end=float(f.get("guidance_end", 1.0)),
            mode=str(f.get("control_mode", "Balanced")),  # type: ignore[arg-type]
            resize_mode=str(f.get("resize_mode", "Crop and Resize")),  # type: ignore[arg-type]
            module=str(f.get("module", "none")), processor_res=int(f.get("processor_res", -1)),
            threshold_a=float(f.get("threshold_a", -1.0)), threshold_b=float(f.get("threshold_b", -1.0)),
            pixel_perfect=bool(f.get("pixel_perfect", False))))
    return units


def inpaint_from_infotext(text: str | Mapping[str, Any], mask: Image.Image) -> InpaintParams:
    """The inpainting settings of a text with the given mask (the mask itself is not in the text). A1111 writes
    ``Mask blur`` only when > 0 and ``Masked content`` only when not "original", so missing fields mean those."""
    d = parse_infotext(text) if isinstance(text, str) else dict(text)
    content = str(d.get("Masked content", "original"))
    fill = {v: k for k, v in _MASKED_CONTENT.items()}.get(content, "original" if content == "original" else None)
    if fill is None:
        raise ConfigError(f"infotext field 'Masked content' is {content!r}; use fill, original, latent noise or "
                          "latent nothing")
    return InpaintParams(mask=mask, mask_blur=_number(d, "Mask blur", int, 0),
                         invert=d.get("Mask mode") == "Inpaint not masked", fill=fill,  # type: ignore[arg-type]
                         full_res=d.get("Inpaint area") == "Only masked",
                         full_res_padding=_number(d, "Masked area padding", int, 32))
