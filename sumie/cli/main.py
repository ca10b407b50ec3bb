"""The ``sumie`` command line: every sub-command drives the same library functions as the Python API."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sumie.cli import control as control_cli
from sumie.cli import ip_adapter as ip_cli
from sumie.cli import lora as lora_cli
from sumie.cli import preprocess as preprocess_cli
from sumie.cli import sd_upscale as sd_upscale_cli
from sumie.cli import serve as serve_cli
from sumie.cli import speed as speed_cli
from sumie.cli import upscale as upscale_cli
from sumie.errors import SumieError

if TYPE_CHECKING:
    from sumie.pipelines.params import GenerationParams

FAMILY_NAMES = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "Stable Diffusion XL base",
    "sdxl_refiner": "Stable Diffusion XL refiner",
}


def _count(sd: dict) -> int:
    return sum(t.numel() for t in sd.values())


def cmd_info(args: argparse.Namespace) -> int:
    """Print what a checkpoint is: family, prediction type, parameters per component, dtype, hash."""
    from sumie.checkpoints.embedded import resolve_model
    from sumie.checkpoints.io import legacy_model_hash, model_hash
    from sumie.checkpoints.loader import inspect_checkpoint, stored_dtype

    path = resolve_model(args.model)
    det = inspect_checkpoint(path, prediction=args.prediction)
    cfg = det.config
    comps = {"unet": det.parts["unet"], "vae": det.parts["vae"]}
    for i, t in enumerate(cfg.text_encoders):
        comps[t.name] = det.parts[f"text{i}"]
    info = {
        "model": str(path),
        "format": "diffusers folder" if path.is_dir() else f"single file ({path.suffix.lstrip('.')})",
        "family": cfg.family,
        "family_name": FAMILY_NAMES.get(cfg.family, cfg.family) + (" inpainting" if cfg.inpainting else ""),
        "inpainting": cfg.inpainting,
        "prediction": cfg.prediction,
        "prediction_source": det.prediction_source,
        "zero_terminal_snr": det.zero_terminal_snr,
        "stored_dtype": stored_dtype(path),
        "hash": None if path.is_dir() else model_hash(path),
        "legacy_hash": None if path.is_dir() or path.stat().st_size < 0x110000 else legacy_model_hash(path),
        "parameters": {name: _count(sd) for name, sd in comps.items()},
        "vae_scaling_factor": cfg.vae.scaling_factor,
        "unet": {"in_channels": cfg.unet.in_channels, "model_channels": cfg.unet.model_channels,
                 "channel_mult": list(cfg.unet.channel_mult), "context_dim": cfg.unet.context_dim,
                 "guidance_embed_dim": cfg.unet.guidance_embed_dim},
        "ignored_keys": len(det.ignored),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model:        {info['model']}")
    print(f"format:       {info['format']}")
    print(f"family:       {info['family_name']} ({cfg.family})")
    print(f"prediction:   {cfg.prediction} ({det.prediction_source})" + ("  zero terminal SNR" if
                                                                              det.zero_terminal_snr else ""))
    print(f"stored dtype: {info['stored_dtype']}")
    if cfg.unet.guidance_embed_dim is not None:
        print(f"guidance:     embedded ({cfg.unet.guidance_embed_dim}, LCM-distilled): the CFG scale is a UNet input, "
              "one cond-only call per step, no negative prompt")
    if info["hash"]:
        legacy = f"  (legacy hash {info['legacy_hash']})" if info["legacy_hash"] else ""
        print(f"model hash:   {info['hash']}{legacy}")
    print("parameters:")
    for name, n in info["parameters"].items():
        print(f"  {name:<7} {n:>15,}")
    print(f"  {'total':<7} {sum(info['parameters'].values()):>15,}")
    print(f"vae scale:    {cfg.vae.scaling_factor}")
    if det.ignored:
        print(f"ignored:      {len(det.ignored)} training-only key(s) (EMA, noise schedule, position ids)")
    return 0


def _new_output(args: argparse.Namespace) -> Path:
    """``args.output`` as a Path; refuses an existing file unless ``--overwrite``."""
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise SumieError(f"{out}: already exists; pass --overwrite to replace it")
    return out


def cmd_random_checkpoint(args: argparse.Namespace) -> int:
    """Write a checkpoint with random weights in the real single-file layout (for tests and demos)."""
    from sumie.checkpoints.io import save_safetensors_atomic
    from sumie.checkpoints.save import random_single_file
    from sumie.configs import FAMILIES, TINY
    from sumie.pipelines.validation import MAX_SEED_VALUE

    if not 0 <= args.seed <= MAX_SEED_VALUE:
        raise SumieError(f"--seed must be a number from 0 to {MAX_SEED_VALUE} (2**64-1), got {args.seed}")
    table = TINY if args.tiny else FAMILIES
    cfg = table[args.family]
    if args.inpainting:
        cfg = cfg.with_(unet=cfg.unet.__class__(**{**cfg.unet.__dict__, "in_channels": 9}))
    out = _new_output(args)
    save_safetensors_atomic(random_single_file(cfg, seed=args.seed), out)
    print(f"wrote {out} ({'tiny ' if args.tiny else ''}{args.family}, random weights)")
    return 0


def cmd_bake_vae(args: argparse.Namespace) -> int:
    """Replace a checkpoint's VAE weights with a standalone VAE's (A1111's "Bake in VAE")."""
    from sumie.checkpoints.bake import bake_vae

    out = _new_output(args)
    n = bake_vae(args.model, args.vae, out)
    print(f"wrote {out} ({args.model} with the {n} VAE tensors of {args.vae})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Store a checkpoint's tensors in another dtype (and its token embeddings in fp8)."""
    import torch

    from sumie.checkpoints.bake import convert_checkpoint

    out = _new_output(args)
    if args.dtype is None and not args.fp8_embeddings:
        raise SumieError("convert: nothing to do; pass --dtype and/or --fp8-embeddings")
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    n = convert_checkpoint(args.model, out, dtype=dtype, fp8_embeddings=args.fp8_embeddings)
    done = ([f"{n['cast']} tensors cast to {args.dtype}"] if args.dtype else []) + (
        [f"{n['fp8']} token embedding(s) in fp8"] if args.fp8_embeddings else [])
    print(f"wrote {out} ({', '.join(done)}; {out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    """List the samplers and schedules with the names A1111 and ComfyUI use for them."""
    from sumie.sampling import registry

    samplers = [{"name": s.name, "default_schedule": s.default_schedule,
                 "noise": "brownian" if s.needs_brownian else "white" if s.stochastic else None,
                 "a1111": list(s.a1111), "comfyui": list(s.comfyui), "options": s.kwargs}
                for s in registry.SAMPLERS]
    schedules = [{"name": n, "a1111": list(registry.schedule_aliases(n)[0]),
                  "comfyui": list(registry.schedule_aliases(n)[1])} for n in registry.schedule_names()]
    if args.json:
        print(json.dumps({"samplers": samplers, "schedules": schedules}, indent=2))
        return 0

    def names(entry: dict) -> str:
        parts = [f"A1111: {', '.join(entry['a1111'])}" if entry["a1111"] else "",
                 f"ComfyUI: {', '.join(entry['comfyui'])}" if entry["comfyui"] else ""]
        return "  ".join(p for p in parts if p)

    print(f"{'SAMPLER':<19} {'DEFAULT SCHEDULE':<17} {'NOISE':<9} ALIASES")
    for e in samplers:
        print(f"{e['name']:<19} {e['default_schedule']:<17} {e['noise'] or '-':<9} {names(e)}")
    print()
    print(f"{'SCHEDULE':<25} ALIASES")
    for e in schedules:
        print(f"{e['name']:<25} {names(e)}")
    print()
    print('Names are case-insensitive. A1111 labels with a schedule ("DPM++ 2M Karras") carry it; "Automatic" '
          "or no scheduler means the sampler's default schedule.")
    return 0



# ------------------------------------------------------------------------------------------------ generation

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_MODES = ("txt2img", "img2img", "inpaint", "outpaint")
# CLI option -> GenerationParams field, for options that map one to one (all default to None = not given)
_PARAM_FIELDS = {
    "negative_prompt": "negative_prompt", "steps": "steps", "cfg_scale": "cfg_scale", "sampler": "sampler",
    "scheduler": "scheduler", "seed": "seed", "subseed": "subseed", "subseed_strength": "subseed_strength",
    "width": "width", "height": "height", "batch_size": "batch_size", "n_iter": "n_iter", "clip_skip": "clip_skip",
    "cfg_rescale": "cfg_rescale", "eta": "eta", "s_noise": "s_noise", "ensd": "eta_noise_seed_delta",
    "convention": "convention", "denoising_strength": "denoising_strength", "resize_mode": "resize_mode",
    "vae_tiling": "vae_tiling", "vae_tile_size": "vae_tile_size",
} | speed_cli.PARAM_FIELDS
_INPAINT_FIELDS = {"mask_blur": "mask_blur", "invert_mask": "invert", "inpainting_fill": "fill",
                   "only_masked": "full_res", "only_masked_padding": "full_res_padding"}
_HIRES_FIELDS = {"hires_scale": "scale", "hires_steps": "steps", "hires_denoise": "denoising_strength",
                 "hires_upscaler": "upscaler"}
# defaults that differ from GenerationParams' for a mode
_MODE_DEFAULTS: dict[str, dict[str, object]] = {"outpaint": {"denoising_strength": 0.8},
                                                "upscale_sd": {"denoising_strength": 0.3}}
_OUTPAINT_INPAINT_DEFAULTS = {"fill": "fill"}
_OTHER_IMAGE_SUFFIXES = (".gif", ".bmp", ".tif", ".tiff", ".avif")  # images Sumie reads but does not write


def _warn(message: str) -> None:
    print(f"sumie: warning: {message}", file=sys.stderr)


def _device_and_dtype(args: argparse.Namespace) -> tuple[str, object]:
    """The torch device (default: cuda, then mps, then cpu) and the Precision: --dtype (default: fp16 on a GPU, else
    fp32), --text-encoder-dtype and --vae-dtype (default: --dtype; an SDXL VAE stays fp32 under fp16)."""
    import torch

    from sumie.checkpoints.precision import Precision
    from sumie.errors import ConfigError

    name = args.device or ("cuda" if torch.cuda.is_available() else
                           "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available to torch; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s); use cuda:0 or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: Apple's MPS is not available to torch; use --device cpu")
    dtype = args.dtype or ("fp32" if device.type == "cpu" else "fp16")

    def named(flag: str | None) -> torch.dtype | None:
        return None if flag is None else getattr(torch, _DTYPES[flag])

    precision = Precision(getattr(torch, _DTYPES[dtype]), named(getattr(args, "text_encoder_dtype", None)),
                          named(getattr(args, "vae_dtype", None)))
    return str(device), precision


def _from_png(path: str) -> tuple[GenerationParams, dict[str, object], str]:
    """(params, parsed fields, text) of an image's stored generation parameters."""
    from sumie.errors import ConfigError
    from sumie.pipelines.infotext import params_from_infotext, parse_infotext
    from sumie.pipelines.output import read_png_info

    text = read_png_info(path)
    if not text:
        raise ConfigError(f"{path}: the image holds no generation parameters; --from-png needs an image written by "
                          "Sumie or A1111")
    fields = parse_infotext(text)
    return params_from_infotext(fields, _warn), fields, text


def _build_params(args: argparse.Namespace, mode: str) -> tuple[GenerationParams, dict[str, object] | None]:
    """The request: defaults (or the --from-png image's parameters), then every option given on the command line."""
    import dataclasses

    from sumie.errors import ConfigError
    from sumie.pipelines.params import GenerationParams, HiresParams, RefinerParams

    fields = None
    if args.from_png:
        p, fields, _ = _from_png(args.from_png)
        if mode == "txt2img" and "Denoising strength" in fields and p.hires is None:
            _warn(f"{args.from_png} was made with img2img; this re-creates it as txt2img (use `sumie img2img "
                  "IMAGE --from-png ...` with the init image)")
    else:
        p = GenerationParams(**_MODE_DEFAULTS.get(mode, {}))  # type: ignore[arg-type]
    if args.prompt is not None:
        p.prompt = args.prompt
    for opt, name in _PARAM_FIELDS.items():
        value = getattr(args, opt, None)
        if value is not None:
            setattr(p, name, value)
    if mode == "txt2img":
        given = {f: getattr(args, o) for o, f in _HIRES_FIELDS.items() if getattr(args, o) is not None}
        if args.hires or given:
            p.hires = dataclasses.replace(p.hires or HiresParams(), **given)  # type: ignore[arg-type]
    if args.refiner is not None:
        p.refiner = RefinerParams(model=args.refiner)
    elif p.refiner is not None and not args.models_dir:  # with --models-dir, _resolve_models looks it up by name
        raise ConfigError(f"the image was refined with '{p.refiner.model}'; pass --refiner PATH to that checkpoint")
    if args.refiner_switch_at is not None:
        if p.refiner is None:
            raise ConfigError("--refiner-switch-at needs --refiner PATH")
        p.refiner.switch_at = args.refiner_switch_at
    return p, fields


_FLAGS = {field: "--" + opt.replace("_", "-") for opt, field in _PARAM_FIELDS.items()} | {
    "refiner.switch_at": "--refiner-switch-at"}


def _flag(field: str) -> str:
    """The option of a GenerationParams field, so validation messages name what the user typed."""
    return _FLAGS.get(field, "--" + field.replace("_", "-"))


def _validate_early(p: GenerationParams) -> set[str]:
    """Checks that need no model (numbers first: they need no torch either), so a typo fails before the load.

    Returns the warnings as the engine words them (field names), which the run's result will repeat."""
    from sumie.pipelines.validation import check_request

    check_request(p, _flag, warn=_warn)
    said: list[str] = []
    check_request(p, warn=said.append)
    return set(said)


def _check_size(args: argparse.Namespace, p: GenerationParams, factor: int | None = None, *,
                model: object = None, vae: object = None) -> None:
    """--width/--height against the VAE's downscale factor: read from the model file's header before the load
    where it can be (safetensors, diffusers folders), else ``factor`` of the loaded model."""
    from sumie.pipelines.validation import check_size

    if factor is None:
        from sumie.checkpoints.embedded import resolve_model
        from sumie.checkpoints.loader import vae_downscale

        factor = vae_downscale(resolve_model(model), vae)  # type: ignore[arg-type]
    if factor is not None:
        check_size(p.width, p.height, factor, _flag)


class _Outputs:
    """Where the images go: a folder (A1111 numbering ``00000-<seed>.<format>``) or one .png/.jpg/.webp file."""

    def __init__(self, out: str | None, count: int, overwrite: bool, fmt: str | None = None,
                 quality: int | None = None) -> None:
        from sumie.errors import ConfigError, SumieError
        from sumie.pipelines.output import DEFAULT_QUALITY, IMAGE_FORMATS

        text = out if out is not None else "outputs"
        self.path = Path(text)
        self.overwrite = overwrite
        if quality is not None and not 1 <= quality <= 100:
            raise ConfigError(f"--quality must be in [1, 100], got {quality}")
        self.ext, self.quality = f".{fmt or 'png'}", DEFAULT_QUALITY if quality is None else quality
        suffix = self.path.suffix.lower()
        self.is_file = suffix in IMAGE_FORMATS and not self.path.is_dir() and not text.endswith(("/", os.sep))
        if self.is_file:
            if fmt is not None and IMAGE_FORMATS[f".{fmt}"] != IMAGE_FORMATS[suffix]:
                raise ConfigError(f"--format {fmt} does not match -o {self.path} (a {IMAGE_FORMATS[suffix]} file "
                                  f"name); drop --format, or name the file {self.path.with_suffix(f'.{fmt}').name}")
            if count != 1:
                raise ConfigError(f"-o {self.path} names one file but the run makes {count} images; give a folder")
            if self.path.exists() and not overwrite:
                raise SumieError(f"{self.path} already exists; choose another name or pass --overwrite")
            self.ext = suffix
        elif suffix in _OTHER_IMAGE_SUFFIXES and not self.path.is_dir():
            raise ConfigError(f"-o {self.path}: images are written as PNG, JPEG or WebP; give a folder or a file "
                              "ending in .png, .jpg or .webp")
        elif self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"-o {self.path} is a file; give a folder or an image file name (.png, .jpg, .webp)")
        if quality is not None and IMAGE_FORMATS[self.ext] == "PNG":
            _warn(f"--quality {quality} is ignored: PNG is lossless (--quality sets JPEG and WebP quality; use "
                  "--format jpg or webp, or an -o name ending in .jpg or .webp)")
        self.preview_path = (self.path.with_name(self.path.stem + ".preview.png") if self.is_file
                             else self.path / "preview.png")
        self.wrote_preview = False
        self.created: list[Path] = []  # folders the preview created, deepest first

    def save(self, image: object, seed: int, infotext: str) -> Path:
        """Write one image with its infotext (atomically; never over an existing file without --overwrite)."""
        from sumie.pipelines.output import next_free_path, save_image

        if self.is_file:
            return save_image(image, self.path, infotext, overwrite=self.overwrite,  # type: ignore[arg-type]
                              quality=self.quality)
        path = next_free_path(self.path, str(seed), ext=self.ext)
        return save_image(image, path, infotext, quality=self.quality)  # type: ignore[arg-type]

    def preview(self, images: list) -> None:
        """Write the batch's current prediction side by side into the preview file."""
        from PIL import Image

        from sumie.pipelines.output import save_png

        w, h = images[0].size
        strip = Image.new("RGB", (w * len(images), h))
        for k, im in enumerate(images):
            strip.paste(im.convert("RGB"), (k * w, 0))
        if not self.wrote_preview:
            folder = self.preview_path.parent
            self.created = [d for d in (folder, *folder.parents) if not d.exists()]
        save_png(strip, self.preview_path, None, overwrite=True)
        self.wrote_preview = True

    def remove_preview(self) -> None:
        """Delete the preview file this run wrote, and the folders it created for it (when empty)."""
        if self.wrote_preview:
            self.preview_path.unlink(missing_ok=True)
            for folder in self.created:
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _init_images(args: argparse.Namespace, mode: str, p: GenerationParams) -> None:
    """Load the init image (and mask, or build the outpainting canvas) into ``p``; before any model is loaded."""
    import dataclasses

    from sumie.pipelines import images as img_ops
    from sumie.pipelines import masks, outpaint
    from sumie.pipelines.infotext import inpaint_from_infotext
    from sumie.pipelines.params import InpaintParams
    from sumie.pipelines.variation import fixed_seed

    if mode == "txt2img":
        return
    image = img_ops.load_image(args.image)
    if mode == "img2img":
        p.init_images = [image]
        return
    if mode == "inpaint":
        mask = masks.load_mask(args.mask, image.size, resize=args.mask_resize)
    else:
        p.seed = fixed_seed(p.seed)  # the canvas noise and the generation share the seed
        image, mask = outpaint.outpaint_canvas(image, args.left, args.right, args.top, args.bottom,
                                              fill=args.outpaint_fill, overlap=args.overlap, seed=p.seed)
    if args.from_png:
        inpaint = inpaint_from_infotext(_from_png(args.from_png)[2], mask)
    else:
        inpaint = InpaintParams(mask=mask, **(_OUTPAINT_INPAINT_DEFAULTS if mode == "outpaint" else {}))
    given = {f: getattr(args, o) for o, f in _INPAINT_FIELDS.items() if getattr(args, o, None) is not None}
    p.inpaint = dataclasses.replace(inpaint, **given)
    p.init_images = [image]


def _check_model_hash(fields: dict[str, object] | None, engine: object) -> None:
    """Warn when --from-png names another model than the one loaded."""
    if not fields or not fields.get("Model hash"):
        return
    have = getattr(getattr(engine, "models", None), "hash", None)
    want = str(fields["Model hash"]).lower()
    if have and not str(have).lower().startswith(want[:10]):
        name = fields.get("Model", "?")
        _warn(f"the image was made with model '{name}' (hash {want}), this run uses hash {have}; the image will "
              "differ")


def _resolve_models(args: argparse.Namespace, p: GenerationParams, fields: dict[str, object] | None) -> (
        tuple[object, object, object, object]):
    """(model, vae, embeddings folder, manager or None): with --models-dir, names are looked up there (paths work as
    before), the --from-png image's model is found by its "Model hash" and its refiner by name."""
    if not args.models_dir:
        return args.model, args.vae, args.embeddings, None
    from sumie.checkpoints.hashes import FileHashes, default_cache_path
    from sumie.checkpoints.manager import ModelFolders, ModelManager
    from sumie.errors import ConfigError

    folders = ModelFolders(args.models_dir)
    manager = ModelManager(folders, hashes=FileHashes(default_cache_path()))
    model = args.model
    if model is None and fields and fields.get("Model hash"):
        model = manager.find_by_hash("checkpoint", str(fields["Model hash"]))  # None: the default model, and a warning
    if p.refiner is not None:
        try:
            p.refiner.model = str(manager.resolve("checkpoint", p.refiner.model))
        except ConfigError as e:
            if args.refiner is not None:
                raise
            raise ConfigError(f"the image was refined with '{p.refiner.model}': {e}; pass --refiner") from None
    embeddings = args.embeddings
    if embeddings is None:
        embeddings = next(iter(folders.dirs("embedding")), None)
    return (manager.resolve("checkpoint", model), manager.resolve("vae", args.vae) if args.vae else None,
            embeddings, manager)


def cmd_generate(args: argparse.Namespace) -> int:
    """txt2img, img2img, inpainting or outpainting (``args.mode``): images with their infotexts as PNGs."""
    return _generate(args)


TIMINGS_ENV = "SUMIE_BENCH_TIMINGS"  # set: generate prints "sumie: timings: {json}" on stderr (bench --cold)


def _generate(args: argparse.Namespace) -> int:
    import time

    mode = args.mode
    p, fields = _build_params(args, mode)
    said = _validate_early(p)
    device, dtype = _device_and_dtype(args)
    if args.preview and not args.taesd:
        _warn("--preview without --taesd FILE decodes previews with the full VAE (slower)")
    _init_images(args, mode, p)
    outputs = _Outputs(args.output, p.batch_size * p.n_iter, args.overwrite, args.format, args.quality)
    model, vae, embeddings, manager = _resolve_models(args, p, fields)
    _check_size(args, p, model=model, vae=vae)
    upscale_cli.check_hires_upscaler(p, manager)
    import sumie
    from sumie.checkpoints.hashes import FileHashes, default_cache_path

    hashes = manager.hashes if manager is not None else FileHashes(default_cache_path())  # type: ignore[attr-defined]
    loras = lora_cli.prepare(args, p, manager, hashes)  # type: ignore[arg-type]
    ip_cli.prepare(args, p, manager)  # type: ignore[arg-type]
    control_cli.prepare(args, p, manager)  # type: ignore[arg-type]
    times = {"load_start": time.time()}
    engine = sumie.load(model, dtype=dtype, device=device, vae=vae, prediction=args.prediction,  # type: ignore
                        embeddings_dir=embeddings, taesd=args.taesd, file_hash=hashes.model_hash,
                        manager=manager)
    times["load_end"] = time.time()
    lora_cli.attach(engine, loras, args)
    speed_cli.apply_engine_args(engine, args)
    _check_size(args, p, engine.models.vae.downscale)
    engine.show_progress = False if args.quiet else None  # tqdm on stderr when it is a terminal
    _check_model_hash(fields, engine)

    def show(event: object) -> None:
        if getattr(event, "preview", None):
            outputs.preview(event.preview)  # type: ignore[attr-defined]

    try:
        result = engine.generate(p, progress=show if args.preview else None,
                                 preview_every=args.preview_every if args.preview else 0)
    finally:
        outputs.remove_preview()
    times["generate_end"] = time.time()
    for message in result.warnings:
        if message not in said:  # _validate_early said those already, naming the flags
            _warn(message)
    for image, seed, text in zip(result.images, result.seeds, result.infotexts, strict=True):
        print(f"wrote {outputs.save(image, seed, text)}")
    times["written"] = time.time()
    if os.environ.get(TIMINGS_ENV):
        print(f"sumie: timings: {json.dumps(times)}", file=sys.stderr)
    return 0


def cmd_pnginfo(args: argparse.Namespace) -> int:
    """Print the generation parameters stored in an image (``--json``: parsed as A1111 parses them)."""
    from sumie.errors import SumieError
    from sumie.pipelines.infotext import parse_infotext
    from sumie.pipelines.output import read_png_info

    text = read_png_info(args.image)
    if not text:
        raise SumieError(f"{args.image}: the image holds no generation parameters")
    if args.json:
        print(json.dumps(parse_infotext(text), indent=2, ensure_ascii=False))
    else:
        print(text)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a VAE or a diffusion model from a TOML config; Ctrl-C saves a checkpoint (exit 130)."""
    from sumie.training.config import load_config
    from sumie.training.distributed import process_group
    from sumie.training.trainer import Trainer

    cfg = load_config(args.config)
    if cfg.train.threads:  # the process's setting, made by the application, not the library
        import torch

        torch.set_num_threads(cfg.train.threads)
    resume = None if args.resume is None else (args.resume or cfg.output.dir)
    with process_group(cfg.train.device) as env:  # under torchrun: data-parallel over its processes
        result = Trainer(cfg, resume=resume).run()
    if env is not None and env.rank != 0:
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"sumie: interrupted at step {result.step}; checkpoint: {result.checkpoint}; continue with: "
              f"sumie train {args.config} --resume {cfg.output.dir}", file=sys.stderr)
        return 130
    print(f"trained {result.step} steps; wrote {result.export}")
    return 0


def _hires_upscaler(text: str) -> str:
    """--hires-upscaler: the built-in names in any letter case, anything else as given (a model)."""
    return text.lower() if text.lower() in ("latent", "lanczos") else text


def _none_default(help_text: str, default: object) -> str:
    return f"{help_text} (default: {default})"


def _add_generation_args(p: argparse.ArgumentParser, mode: str) -> None:
    """The options every generation command shares; every default is None = "not given" (see _build_params)."""
    img = mode != "txt2img"
    g = p.add_argument_group("prompt and sampling")
    g.add_argument("-n", "--negative-prompt", help="negative prompt")
    g.add_argument("--steps", type=int, metavar="N", help=_none_default("sampling steps", 20))
    g.add_argument("--cfg-scale", type=float, metavar="X", help=_none_default("classifier-free guidance scale", 7))
    g.add_argument("--sampler", help=_none_default("sampler, A1111 or ComfyUI name (see `sumie samplers`)",
                                                   "DPM++ 2M"))
    g.add_argument("--scheduler", help=_none_default("schedule type (Karras, Exponential, ...)", "Automatic"))
    g.add_argument("--seed", type=int, metavar="N",
                   help=_none_default("seed, 0 to 2**64-1; image k of the run gets seed + k", "-1, random"))
    g.add_argument("--subseed", type=int, metavar="N", help=_none_default("variation seed", "-1, random"))
    g.add_argument("--subseed-strength", type=float, metavar="X", help=_none_default("variation strength in [0, 1]", 0))
    g.add_argument("--width", type=int, metavar="N", help=_none_default(
        "width, a multiple of the VAE's factor (8 for SD, 4 for sumie-tiny)",
        "the init image's" if img else "the model's native size"))
    g.add_argument("--height", type=int, metavar="N", help=_none_default(
        "height, a multiple of the VAE's factor", "the init image's" if img else "the model's native size"))
    g.add_argument("--batch-size", type=int, metavar="N", help=_none_default("images per batch", 1))
    g.add_argument("--n-iter", type=int, metavar="N", help=_none_default("number of batches", 1))
    g.add_argument("--clip-skip", type=int, metavar="N", help=_none_default("CLIP skip (1 = last layer)", 1))
    g.add_argument("--cfg-rescale", type=float, metavar="X", help=_none_default("CFG rescale phi", 0))
    g.add_argument("--eta", type=float, metavar="X",
                   help="eta of ancestral/SDE samplers and DDIM, in [0, 100] (default: the sampler's)")
    g.add_argument("--s-noise", type=float, metavar="X",
                   help="sigma noise multiplier of ancestral/SDE samplers and Restart, in [0, 100] (default: 1)")
    g.add_argument("--ensd", type=int, metavar="N", help=_none_default("A1111 eta noise seed delta", 0))
    g.add_argument("--convention", choices=["a1111", "diffusers"],
                   help=_none_default("reproduce A1111's or diffusers' numbers", "a1111"))
    if img:
        default = _MODE_DEFAULTS.get(mode, {}).get("denoising_strength", 0.75)
        g.add_argument("--denoising-strength", type=float, metavar="X",
                       help=_none_default("how much to change, in [0, 1]", default))
        g.add_argument("--resize-mode", choices=["just_resize", "crop_and_resize", "resize_and_fill"],
                       help=_none_default("how the image is fitted to --width/--height", "just_resize"))
    if mode in ("inpaint", "outpaint"):
        g.add_argument("--mask-blur", type=int, metavar="N", help=_none_default("mask blur in pixels", 4))
        g.add_argument("--inpainting-fill", choices=["fill", "original", "latent_noise", "latent_nothing"],
                       help=_none_default("masked content", "fill" if mode == "outpaint" else "original"))
        g.add_argument("--only-masked", action="store_true", default=None,
                       help="inpaint only the masked area at full resolution, then paste it back")
        g.add_argument("--only-masked-padding", type=int, metavar="N",
                       help=_none_default("padding of --only-masked, pixels", 32))
    if mode == "inpaint":
        g.add_argument("--invert-mask", action="store_true", default=None, help="repaint the black part instead")
        g.add_argument("--mask-resize", action="store_true", help="stretch a mask of another size to the image")
    if mode == "txt2img":
        h = p.add_argument_group("hires fix (on when any of these is given)")
        h.add_argument("--hires", action="store_true", help="hires fix with the defaults below")
        h.add_argument("--hires-scale", type=float, metavar="X", help=_none_default("upscale factor", 2))
        h.add_argument("--hires-steps", type=int, metavar="N", help=_none_default("second-pass steps (0 = --steps)", 0))
        h.add_argument("--hires-denoise", type=float, metavar="X",
                       help=_none_default("second-pass denoising strength", 0.7))
        h.add_argument("--hires-upscaler", type=_hires_upscaler, metavar="NAME",
                       help=_none_default("latent, lanczos, or an upscaler model (ESRGAN, Real-ESRGAN, SwinIR): a "
                                          "file, or a name in --models-dir's ESRGAN / RealESRGAN / SwinIR / "
                                          "upscale_models folder", "latent"))
    r = p.add_argument_group("SDXL refiner")
    r.add_argument("--refiner", metavar="PATH", help="refiner checkpoint that takes over at --refiner-switch-at "
                   "(a path, or a name in --models-dir)")
    r.add_argument("--refiner-switch-at", type=float, metavar="X", help=_none_default("fraction of the steps", 0.8))
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="PATH",
                   help="checkpoint file or diffusers folder, or a name in --models-dir (default: the embedded 64-px "
                        "model sumie-tiny; with --from-png and --models-dir: the image's model, found by its hash)")
    m.add_argument("--vae", metavar="PATH",
                   help="standalone VAE replacing the checkpoint's (or a name in --models-dir)")
    m.add_argument("--models-dir", metavar="DIR",
                   help="AUTOMATIC1111 or ComfyUI folder (or its models/ folder) where --model, --vae and --refiner "
                        "are looked up by name; --embeddings defaults to its embeddings folder")
    m.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type")
    m.add_argument("--dtype", choices=list(_DTYPES), help="weights dtype (default: fp16 on a GPU, fp32 on the CPU)")
    m.add_argument("--vae-dtype", choices=list(_DTYPES),
                   help="the VAE's dtype (default: --dtype; fp32 for SDXL under fp16; an fp16 VAE that overflows is "
                        "switched to fp32 with a warning)")
    m.add_argument("--text-encoder-dtype", choices=list(_DTYPES), help="the text encoders' dtype (default: --dtype)")
    m.add_argument("--vae-tiling", choices=["auto", "on", "off"], help=_none_default(
        "VAE decode/encode in overlapping tiles for big images; auto: only when the whole image would not fit", "auto"))
    m.add_argument("--vae-tile-size", type=int, metavar="PX", help=_none_default("VAE tile size in pixels", 512))
    m.add_argument("--device", help="cpu, cuda, cuda:N, mps (default: a GPU when there is one)")
    m.add_argument("--embeddings", metavar="DIR", help="textual-inversion embeddings folder")
    m.add_argument("--taesd", metavar="FILE", help="TAESD decoder weights for --preview")
    lora_cli.add_generation_args(p)
    ip_cli.add_generation_args(p)
    control_cli.add_generation_args(p)
    speed_cli.add_generation_args(p)
    o = p.add_argument_group("output")
    o.add_argument("-o", "--output", metavar="OUT",
                   help="folder (numbered 00000-<seed>.png) or, for one image, a .png, .jpg or .webp file "
                        "(default: outputs)")
    o.add_argument("--format", choices=["png", "jpg", "webp"],
                   help="file type of numbered images in a folder (default: png); with -o FILE it must match the "
                        "file's suffix, which decides on its own")
    o.add_argument("--quality", type=int, metavar="Q",
                   help="JPEG/WebP quality 1-100 (default: 80, A1111's; ignored with a warning for PNG); parameters "
                        "go in the EXIF UserComment")
    o.add_argument("--overwrite", action="store_true", help="replace an existing -o file")
    o.add_argument("--from-png", metavar="IMAGE",
                   help="re-create an image from its stored parameters; options given here override them")
    o.add_argument("--preview", action="store_true",
                   help="write the current prediction to preview.png in the output folder while sampling")
    o.add_argument("--preview-every", type=int, default=5, metavar="N", help="preview every N steps (default: 5)")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate, mode=mode)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="sumie", description="Stable Diffusion in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="describe a checkpoint file or diffusers folder")
    p.add_argument("model", nargs="?", help="a .safetensors/.ckpt file or a diffusers folder (default: sumie-tiny)")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the detected prediction type")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("random-checkpoint", help="write a random-weight checkpoint in the real layout (testing)")
    p.add_argument("family", choices=["sd1", "sd2", "sdxl", "sdxl_refiner"])
    p.add_argument("output", help="output .safetensors path")
    p.add_argument("--tiny", action="store_true", help="small widths, same key layout")
    p.add_argument("--inpainting", action="store_true", help="9-channel inpainting UNet")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_random_checkpoint)

    p = sub.add_parser("samplers", help="list samplers and schedules with their A1111 and ComfyUI names")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_samplers)

    p = sub.add_parser("generate", help="text to image")
    p.add_argument("prompt", nargs="?", help="prompt, A1111 syntax (default: empty, or the --from-png image's)")
    _add_generation_args(p, "txt2img")

    p = sub.add_parser("img2img", help="image to image")
    p.add_argument("image", help="init image")
    p.add_argument("prompt", nargs="?", help="prompt, A1111 syntax")
    _add_generation_args(p, "img2img")

    p = sub.add_parser("inpaint", help="repaint the white part of a mask")
    p.add_argument("image", help="init image")
    p.add_argument("mask", help="mask of the image's size, white = repaint (or transparent where to repaint)")
    p.add_argument("prompt", nargs="?", help="prompt, A1111 syntax")
    _add_generation_args(p, "inpaint")

    p = sub.add_parser("outpaint", help="extend an image on any side")
    p.add_argument("image", help="image to extend")
    p.add_argument("prompt", nargs="?", help="prompt, A1111 syntax")
    for side in ("left", "right", "top", "bottom"):
        p.add_argument(f"--{side}", type=int, default=0, metavar="PIXELS", help=f"pixels to add on the {side}")
    p.add_argument("--overlap", type=int, default=8, help="pixels of the old image repainted at each seam "
                   "(default: 8)")
    p.add_argument("--outpaint-fill", choices=["edge", "noise", "color"], default="edge",
                   help="what the new area starts as (default: edge, the border pixels repeated)")
    _add_generation_args(p, "outpaint")

    p = sub.add_parser("pnginfo", help="print the generation parameters stored in an image")
    p.add_argument("image", help="PNG (or A1111 JPEG/WebP) image")
    p.add_argument("--json", action="store_true", help="print the parsed fields as JSON")
    p.set_defaults(func=cmd_pnginfo)

    p = sub.add_parser("train", help="train a VAE or a diffusion model from a TOML config",
                       description="Train from a TOML config. Data-parallel on N processes: "
                       "torchrun --nproc_per_node N -m sumie train CONFIG (gloo on CPU, NCCL on CUDA; "
                       "[train] batch_size is the global batch, split over the processes).")
    p.add_argument("config", help="TOML file with [model], [data], [train], [output] sections")
    p.add_argument("--resume", nargs="?", const="", metavar="DIR",
                   help="continue from the newest checkpoint of a run folder (default: the config's output dir) "
                   "or from one checkpoint folder")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bake-vae", help="write a checkpoint with a standalone VAE baked in")
    p.add_argument("model", help="single-file checkpoint (.safetensors or .ckpt)")
    p.add_argument("vae", help="standalone VAE file (LDM or diffusers keys) of the model's architecture")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output .safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_bake_vae)

    p = sub.add_parser("convert", help="store a checkpoint's tensors in another dtype (token embeddings in fp8)")
    p.add_argument("model", help="single-file checkpoint (.safetensors or .ckpt)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output .safetensors file")
    p.add_argument("--dtype", choices=list(_DTYPES), help="store every floating tensor in this dtype")
    p.add_argument("--fp8-embeddings", action="store_true",
                   help="store the CLIP token embedding tables in float8 e4m3 (1 byte a value)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_convert)

    def model_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="checkpoint file or diffusers folder (default: the embedded sumie-tiny)")
        p.add_argument("--vae", metavar="PATH", help="standalone VAE replacing the checkpoint's")

    from sumie.cli import measure

    measure.add_parsers(sub, model_arg)
    lora_cli.add_parsers(sub)
    serve_cli.add_parsers(sub)
    preprocess_cli.add_parsers(sub)
    upscale_cli.add_parsers(sub)
    sd_upscale_cli.add_parsers(sub, _add_generation_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SumieError as e:
        print(f"sumie: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sumie: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and friends: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
