"""A1111 request bodies -> Sumie's :class:`GenerationParams`, and results -> A1111's ``info`` JSON.

Everything that needs no model is checked here, before the job is queued, and every failure is a 422 naming the
field: sampler / scheduler names (A1111 1.10 falls back to DPM++ 2M; Sumie lists the valid names), base64 images,
the server's limits (pixels, steps, images per request), and the value ranges of
:func:`sumie.pipelines.validation.check_values`. Settings A1111 has and Sumie does not (face restoration, tiling,
churn, scripts run always-on) are accepted and listed under ``warnings`` in ``info``.
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sumie.checkpoints.manager import ModelFile
from sumie.errors import ConfigError
from sumie.pipelines import validation
from sumie.pipelines.engine import GenerationResult
from sumie.pipelines.extra_networks import collect_tags, tag_text
from sumie.pipelines.infotext import params_from_infotext, parse_infotext, sampler_labels
from sumie.pipelines.masks import load_mask
from sumie.pipelines.params import GenerationParams, HiresParams, InpaintParams, RefinerParams
from sumie.sampling import registry
from sumie.serve import controlnet_api
from sumie.serve.catalog import Catalog, NameError_, check_name
from sumie.serve.config import Limits
from sumie.serve.decode import decode_image
from sumie.serve.errors import ApiError
from sumie.serve.models import Img2ImgRequest, Txt2ImgRequest

__all__ = ["Plan", "build_info", "build_plan"]

_FILLS = {0: "fill", 1: "original", 2: "latent_noise", 3: "latent_nothing"}
_HR_UPSCALERS = {"latent": "latent", "lanczos": "lanczos"}
_HR_SAME = (None, "", "Use same checkpoint", "Use same sampler", "Use same scheduler")
_API_FIELD = {"refiner.switch_at": "refiner_switch_at", "eta_noise_seed_delta": "override_settings"}
# request fields taken from an ``infotext`` when the request does not set them (A1111 1.10 applies it the same way)
_FROM_INFOTEXT = {"prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "cfg_scale": "cfg_scale",
                  "seed": "seed", "subseed": "subseed", "subseed_strength": "subseed_strength", "width": "width",
                  "height": "height", "sampler_name": "sampler", "scheduler": "scheduler",
                  "denoising_strength": "denoising_strength"}


@dataclass
class Plan:
    """One request, resolved: what to run, on which checkpoint, what to save and what to answer."""

    kind: str  # "txt2img" / "img2img"
    params: GenerationParams
    checkpoint: ModelFile
    vae: Path | None
    options: dict[str, Any]
    save: bool
    send_images: bool
    parameters: dict[str, Any]  # the request with defaults filled in (A1111's response ``parameters``)
    warnings: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)


def _err(field: str, message: str, status: int = 422) -> ApiError:
    return ApiError(status, f"{field}: {message}", field=field)


def _value(req: Any, name: str, default: Any) -> Any:
    """A field's value, its A1111 default when null."""
    v = getattr(req, name)
    return default if v is None else v


def _sampler(req: Any, warnings: list[str]) -> tuple[str, str, Any]:
    """(sampler, scheduler, spec) from sampler_name / sampler_index / scheduler; 422 listing valid names."""
    sampler = req.sampler_name or req.sampler_index or "Euler"
    field = "sampler_name" if req.sampler_name else "sampler_index"
    scheduler = req.scheduler or "Automatic"
    try:
        spec, _ = registry.resolve(sampler, None)
    except ConfigError:
        labels = [s.a1111[0] for s in registry.SAMPLERS if s.a1111]
        raise _err(field, f"unknown sampler {sampler!r}; valid: {', '.join(labels)} (aliases and Sumie/ComfyUI "
                          "names work too; GET /sdapi/v1/samplers lists them)") from None
    try:
        registry.resolve(sampler, scheduler)
    except ConfigError as e:
        if "names schedule" in str(e):  # "DPM++ 2M Karras" with scheduler "Exponential": the scheduler wins
            warnings.append(f"sampler_name {sampler!r} names a schedule, scheduler {scheduler!r} was used")
            sampler = (spec.a1111 or (spec.name,))[0]
        else:
            labels = [a[0] for a, _ in registry.SCHEDULE_ALIASES.values() if a]
            raise _err("scheduler", f"unknown scheduler {scheduler!r}; valid: Automatic, {', '.join(labels)}") \
                from None
    return sampler, scheduler, spec


def _limits(p: GenerationParams, limits: Limits) -> None:
    if p.steps > limits.max_steps:
        raise _err("steps", f"{p.steps} steps is over this server's limit of {limits.max_steps}")
    images = p.batch_size * p.n_iter
    if images > limits.max_images:
        raise _err("batch_size", f"batch_size x n_iter = {images} images is over this server's limit of "
                                 f"{limits.max_images}")
    for w_field, h_field, w, h in (("width", "height", p.width, p.height),):
        if w is not None and h is not None and w * h > limits.max_pixels:
            raise _err(w_field, f"{w}x{h} = {w * h} pixels is over this server's limit of {limits.max_pixels} "
                                f"(width x height); lower {w_field} or {h_field}")
    hr = p.hires
    if hr is not None and p.width and p.height:
        tw = hr.resize_x or int(p.width * hr.scale)
        th = hr.resize_y or int(p.height * hr.scale)
        if tw * th > limits.max_pixels:
            raise _err("hr_scale", f"the hires pass would be {tw}x{th} = {tw * th} pixels, over this server's limit "
                                   f"of {limits.max_pixels}; lower hr_scale or hr_resize_x / hr_resize_y")
        if hr.steps > limits.max_steps:
            raise _err("hr_second_pass_steps", f"{hr.steps} steps is over this server's limit of {limits.max_steps}")


def _apply_infotext(req: Any, warnings: list[str]) -> None:
    """Fill fields the request leaves unset from its ``infotext`` (A1111 1.10 ``apply_infotext``)."""
    if not req.infotext:
        return
    try:
        given = params_from_infotext(req.infotext, warnings.append)
    except ConfigError as e:
        raise _err("infotext", str(e)) from None
    for name, attr in _FROM_INFOTEXT.items():
        if name not in req.model_fields_set and hasattr(req, name):
            setattr(req, name, getattr(given, attr))
    if "sampler_name" not in req.model_fields_set:
        req.sampler_index = None


def _ignored(req: Any, warnings: list[str]) -> None:
    """Accepted settings Sumie has no implementation of: listed in ``info`` as ignored."""
    for name in ("restore_faces", "tiling"):
        if getattr(req, name):
            warnings.append(f"{name} is not supported by Sumie and was ignored")
    for name in ("s_churn", "s_tmin", "s_tmax"):
        if getattr(req, name):
            warnings.append(f"{name} is not supported by Sumie and was ignored")
    for name in ("seed_resize_from_h", "seed_resize_from_w"):
        if getattr(req, name) not in (None, -1, 0):
            warnings.append(f"{name} is not supported by Sumie and was ignored")
    if req.styles:
        warnings.append(f"styles {', '.join(req.styles)} were ignored: this server has no prompt styles")
    if req.disable_extra_networks:
        warnings.append("disable_extra_networks is not supported by Sumie and was ignored")
    if req.firstpass_image:
        warnings.append("firstpass_image is not supported by Sumie and was ignored")
    for name in sorted(req.alwayson_scripts or {}):
        if name.lower() == controlnet_api.SCRIPT:
            continue
        warnings.append(f"alwayson_scripts: {name!r} is not available in Sumie and was ignored")


def _options_into(p: GenerationParams, spec: Any, opts: dict[str, Any], req: Any) -> None:
    """Options that change a generation: clip skip, ENSD, the samplers' eta when the request gives none, NGMS, Skip
    Early CFG and token merging."""
    p.clip_skip = int(opts["CLIP_stop_at_last_layers"])
    p.eta_noise_seed_delta = int(opts["eta_noise_seed_delta"])
    # the speed options that change the image: A1111's request field s_min_uncond, else its option; the others are
    # options only
    p.s_min_uncond = float(req.s_min_uncond if req.s_min_uncond is not None else opts["s_min_uncond"])
    p.s_min_uncond_all = bool(opts["s_min_uncond_all"])
    p.skip_early_cond = float(opts["skip_early_cond"])
    p.token_merging_ratio = float(opts["token_merging_ratio"])
    p.token_merging_ratio_hr = float(opts["token_merging_ratio_hr"])
    accepted = inspect.signature(spec.function).parameters
    if req.eta is None and "eta" in accepted:
        want = opts["eta_ddim"] if spec.name == "ddim" else opts["eta_ancestral"]
        if want != validation.effective_eta(spec, None):
            p.eta = float(want)


def _check_lora_tags(p: GenerationParams) -> None:
    """``<lora:NAME>`` tags name files inside the LoRA folders only: never a path (the library would open it)."""
    for kind, tags in collect_tags(p.prompt, p.negative_prompt).items():
        if kind not in ("lora", "lyco"):
            continue
        for tag in tags:
            field = "prompt" if tag_text(tag) in p.prompt else "negative_prompt"
            try:
                check_name("LoRA", tag.name)
            except NameError_ as e:
                raise ApiError(400, f"{field}: {tag_text(tag)}: {e}", field=field) from None
            if Path(tag.name).expanduser().is_file():
                raise ApiError(400, f"{field}: {tag_text(tag)} names a file path; give the name of a LoRA in the "
                                    "configured folders (GET /sdapi/v1/loras)", field=field)


def build_plan(kind: str, req: Txt2ImgRequest | Img2ImgRequest, catalog: Catalog, options: dict[str, Any],
               limits: Limits) -> Plan:
    """The resolved request (see the module docstring); ApiError naming the field on anything wrong."""
    warnings: list[str] = []
    parameters = req.model_dump()
    _apply_infotext(req, warnings)
    if req.script_name:
        raise _err("script_name", f"script {req.script_name!r} not found; this server has no scripts")
    opts = options
    sampler, scheduler, spec = _sampler(req, warnings)
    accepted = inspect.signature(spec.function).parameters
    eta, s_noise = req.eta, req.s_noise
    if eta is not None and "eta" not in accepted:
        eta = None  # A1111 ignores an eta the sampler does not take (webuiapi always sends one)
    if s_noise is not None and ("s_noise" not in accepted or not validation.uses_s_noise(spec, eta)):
        if s_noise != 1.0:
            warnings.append(f"s_noise {s_noise} has no effect with sampler {sampler} and was ignored")
        s_noise = None
    p = GenerationParams(
        prompt=_value(req, "prompt", ""), negative_prompt=_value(req, "negative_prompt", ""),
        steps=_value(req, "steps", 50), cfg_scale=float(_value(req, "cfg_scale", 7.0)), sampler=sampler,
        scheduler=scheduler, seed=_value(req, "seed", -1), subseed=_value(req, "subseed", -1),
        subseed_strength=float(_value(req, "subseed_strength", 0.0)), width=_value(req, "width", 512),
        height=_value(req, "height", 512), batch_size=_value(req, "batch_size", 1), n_iter=_value(req, "n_iter", 1),
        eta=eta, s_noise=s_noise, denoising_strength=float(_value(req, "denoising_strength", 0.75)))
    _options_into(p, spec, opts, req)
    _ignored(req, warnings)
    if req.refiner_checkpoint and req.refiner_checkpoint not in ("None", "none"):
        ref = catalog.checkpoint(req.refiner_checkpoint, "refiner_checkpoint")
        p.refiner = RefinerParams(str(ref.path), float(_value(req, "refiner_switch_at", 0.8)))
    if isinstance(req, Txt2ImgRequest):
        _hires(req, p, warnings)
    else:
        _img2img(req, p, limits, warnings)
    p.controlnets = controlnet_api.control_units(req.alwayson_scripts, p, catalog, limits, warnings)
    _limits(p, limits)
    _check_lora_tags(p)
    named: list[str] = []

    def namer(field: str) -> str:  # messages name the request's fields; the last one named is at fault
        named.append(_API_FIELD.get(field, field))
        return named[-1]

    try:
        validation.check_request(p, namer, warn=warnings.append)
    except ConfigError as e:
        raise ApiError(422, str(e), field=named[-1] if named else None) from None
    checkpoint = catalog.checkpoint(opts.get("sd_model_checkpoint"), "sd_model_checkpoint")
    vae = catalog.vae(opts.get("sd_vae"), "sd_vae")
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        parameters["init_images"], parameters["mask"] = None, None
    return Plan(kind, p, checkpoint, vae, opts, bool(req.save_images), req.send_images is not False, parameters,
                warnings)


def _hires(req: Txt2ImgRequest, p: GenerationParams, warnings: list[str]) -> None:
    if not req.enable_hr:
        return
    name = (req.hr_upscaler or "Latent").strip()
    upscaler = _HR_UPSCALERS.get(name.lower())
    if upscaler is None:
        raise _err("hr_upscaler", f"unknown hires upscaler {name!r}; this server has: Latent, Lanczos")
    p.hires = HiresParams(scale=float(_value(req, "hr_scale", 2.0)), upscaler=upscaler,  # type: ignore[arg-type]
                          steps=int(_value(req, "hr_second_pass_steps", 0)),
                          denoising_strength=float(_value(req, "denoising_strength", 0.7)),
                          resize_x=int(_value(req, "hr_resize_x", 0)), resize_y=int(_value(req, "hr_resize_y", 0)))
    if p.hires.scale <= 0 or p.hires.steps < 0 or p.hires.resize_x < 0 or p.hires.resize_y < 0:
        raise _err("hr_scale", "hr_scale must be > 0 and hr_second_pass_steps, hr_resize_x, hr_resize_y >= 0")
    for name in ("hr_checkpoint_name", "hr_sampler_name", "hr_scheduler"):
        if getattr(req, name) not in _HR_SAME:
            warnings.append(f"{name} is not supported by Sumie (the hires pass uses the first pass's) and was ignored")
    for name, base in (("hr_prompt", p.prompt), ("hr_negative_prompt", p.negative_prompt)):
        if getattr(req, name) and getattr(req, name) != base:
            warnings.append(f"{name} is not supported by Sumie (the hires pass uses the prompt) and was ignored")
    if req.firstphase_width or req.firstphase_height:
        warnings.append("firstphase_width / firstphase_height (A1111's old hires API) were ignored")


def _img2img(req: Img2ImgRequest, p: GenerationParams, limits: Limits, warnings: list[str]) -> None:
    if not req.init_images:
        raise ApiError(404, "init_images: no init images given; send at least one base64 image",
                       field="init_images")

    def image(text: object, name: str) -> Image.Image:
        return decode_image(text, name, max_b64_bytes=limits.max_b64_bytes, max_pixels=limits.max_image_pixels)

    p.init_images = [image(t, f"init_images[{i}]") for i, t in enumerate(req.init_images)]
    mode = _value(req, "resize_mode", 0)
    if mode not in (0, 1, 2, 3):
        raise _err("resize_mode", f"{mode} is not a resize mode; use 0 (just resize), 1 (crop and resize), "
                                  "2 (resize and fill) or 3 (just resize, latent upscale)")
    if mode == 3:
        warnings.append("resize_mode 3 (latent upscale) is run as 0 (just resize)")
    p.resize_mode = ("just_resize", "crop_and_resize", "resize_and_fill", "just_resize")[mode]  # type: ignore
    if req.image_cfg_scale is not None:
        warnings.append("image_cfg_scale (instruct-pix2pix) is not supported by Sumie and was ignored")
    if req.initial_noise_multiplier not in (None, 1.0):
        warnings.append("initial_noise_multiplier is not supported by Sumie and was ignored")
    if not req.mask:
        return
    mask = image(req.mask, "mask")
    blur = req.mask_blur if req.mask_blur is not None else _value(req, "mask_blur_x", 4)
    if req.mask_blur is None and _value(req, "mask_blur_y", 4) != blur:
        warnings.append("mask_blur_x and mask_blur_y differ; Sumie blurs both ways by mask_blur_x")
    fill = _FILLS.get(_value(req, "inpainting_fill", 0))
    if fill is None:
        raise _err("inpainting_fill", "use 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing)")
    if not 0 <= blur <= 64:  # A1111's UI bounds; a huge blur is a huge convolution
        raise _err("mask_blur", f"must be in [0, 64], got {blur}")
    padding = _value(req, "inpaint_full_res_padding", 0)
    if not 0 <= padding <= 256:
        raise _err("inpaint_full_res_padding", f"must be in [0, 256], got {padding}")
    latent = image(req.latent_mask, "latent_mask") if req.latent_mask else None
    size = p.init_images[0].size
    try:
        m = load_mask(mask, size, resize=True, round_mask=_value(req, "mask_round", True))
        lm = load_mask(latent, size, resize=True) if latent is not None else None
    except ConfigError as e:
        raise _err("mask", str(e)) from None
    p.inpaint = InpaintParams(mask=m, mask_blur=int(blur), invert=_value(req, "inpainting_mask_invert", 0) == 1,
                              fill=fill, full_res=bool(_value(req, "inpaint_full_res", True)),  # type: ignore
                              full_res_padding=int(padding), latent_mask=lm)


_CORE = {"Prompt", "Negative prompt", "Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model",
         "Version", "Size-1", "Size-2", "Variation seed", "Variation seed strength", "Clip skip", "Denoising strength"}


def build_info(plan: Plan, result: GenerationResult, *, model_name: str, model_hash: str | None,
               vae_name: str | None, warnings: list[str]) -> str:
    """A1111's ``info`` JSON string of a result (``processing.Processed.js``)."""
    p = result.params
    sampler_label, _ = sampler_labels(p.sampler, p.scheduler)
    texts = result.infotexts
    first = texts[0] if texts else ""
    extra: dict[str, Any] = {}
    if first:
        for key, value in parse_infotext(first).items():
            if key not in _CORE and f"{key}:" in first.split("\n")[-1]:
                extra[key] = value
    count = len(result.images)
    info = {
        "prompt": p.prompt, "all_prompts": [p.prompt] * count, "negative_prompt": p.negative_prompt,
        "all_negative_prompts": [p.negative_prompt] * count, "seed": p.seed, "all_seeds": list(result.seeds),
        "subseed": p.subseed, "all_subseeds": list(result.subseeds), "subseed_strength": p.subseed_strength,
        "width": p.width, "height": p.height, "sampler_name": sampler_label, "cfg_scale": p.cfg_scale,
        "steps": p.steps, "batch_size": p.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model_name, "sd_model_hash": model_hash, "sd_vae_name": vae_name, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": p.denoising_strength if plan.kind == "img2img" or p.hires else None,
        "extra_generation_params": extra, "index_of_first_image": 0, "infotexts": list(texts),
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(plan.created)),
        "clip_skip": p.clip_skip, "is_using_inpainting_conditioning": False, "version": "sumie",
        "interrupted": result.interrupted, "warnings": warnings,
    }
    return json.dumps(info)
