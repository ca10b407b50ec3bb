"""``sumie upscale-sd IMAGE [PROMPT] --scale 2 --upscaler lanczos|none|MODEL --overlap 64 [img2img options]``:
A1111's "SD upscale" script (:mod:`sumie.pipelines.sd_upscale`); --width / --height are the tile size, as the
img2img sliders are in A1111, and every img2img option (sampler, steps, --denoising-strength, --controlnet ...)
applies to each tile (--width / --height default to 512; --denoising-strength to 0.3)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from sumie.errors import ConfigError


def add_parsers(sub: Any, add_generation_args: Any) -> None:
    """Register ``sumie upscale-sd`` (``add_generation_args``: the img2img options of ``sumie.cli.main``)."""
    p = sub.add_parser("upscale-sd", help="SD upscale (A1111's script): upscale, then img2img tile by tile with "
                       "blended seams", description=__doc__)
    p.add_argument("image", help="image to upscale")
    p.add_argument("prompt", nargs="?", help="prompt, A1111 syntax")
    s = p.add_argument_group("SD upscale")
    s.add_argument("--scale", type=float, default=2.0, metavar="X", help="upscale factor, sides rounded down to a "
                   "multiple of 8 (default: 2)")
    s.add_argument("--upscaler", default="lanczos", metavar="NAME",
                   help="lanczos, none (the image is already big), or an upscaler model: a file or a name in "
                        "--models-dir's ESRGAN / RealESRGAN / SwinIR / upscale_models folder (default: lanczos)")
    s.add_argument("--overlap", type=int, default=64, metavar="PX", help="tile overlap in pixels (default: 64)")
    add_generation_args(p, "upscale_sd")
    p.set_defaults(func=cmd_upscale_sd)


def cmd_upscale_sd(args: argparse.Namespace) -> int:
    """Load the image and the model, run SD upscale, write one image per --n-iter."""
    import sumie
    from sumie.checkpoints.hashes import FileHashes, default_cache_path
    from sumie.cli import control as control_cli
    from sumie.cli import ip_adapter as ip_cli
    from sumie.cli import lora as lora_cli
    from sumie.cli import main as cli
    from sumie.pipelines import images as img_ops
    from sumie.pipelines.sd_upscale import BUILTIN, sd_upscale
    from sumie.pipelines.upscale import resolve_upscaler

    if not (math.isfinite(args.scale) and 0 < args.scale <= 16):
        raise ConfigError(f"--scale {args.scale}: use a number in (0, 16]")
    if args.overlap < 0:
        raise ConfigError(f"--overlap {args.overlap}: use 0 or more pixels")
    if args.preview:
        cli._warn("--preview is ignored by upscale-sd (tiles are written only as the combined image)")
    p, fields = cli._build_params(args, "upscale_sd")
    said = cli._validate_early(p)
    device, dtype = cli._device_and_dtype(args)
    image = img_ops.load_image(args.image)
    outputs = cli._Outputs(args.output, p.n_iter, args.overwrite, args.format, args.quality)
    model, vae, embeddings, manager = cli._resolve_models(args, p, fields)
    cli._check_size(args, p, model=model, vae=vae)
    if args.upscaler.strip().lower() not in BUILTIN:  # a model that cannot be found fails before the checkpoint loads
        resolve_upscaler(manager if manager is not None else cli.upscale_cli._manager(None), args.upscaler)
    hashes = manager.hashes if manager is not None else FileHashes(default_cache_path())  # type: ignore[attr-defined]
    loras = lora_cli.prepare(args, p, manager, hashes)  # type: ignore[arg-type]
    ip_cli.prepare(args, p, manager)  # type: ignore[arg-type]
    p.init_images = [image]  # control units without an image need an init image to pass the CLI's checks
    control_cli.prepare(args, p, manager)  # type: ignore[arg-type]
    p.init_images = []
    engine = sumie.load(model, dtype=dtype, device=device, vae=vae, prediction=args.prediction,  # type: ignore
                        embeddings_dir=embeddings, taesd=args.taesd, file_hash=hashes.model_hash, manager=manager)
    lora_cli.attach(engine, loras, args)
    cli.speed_cli.apply_engine_args(engine, args)
    cli._check_size(args, p, engine.models.vae.downscale)
    engine.show_progress = False if args.quiet else None

    def tile_done(done: int, total: int) -> None:
        if not args.quiet:
            print(f"tile {done}/{total}", flush=True)

    result = sd_upscale(engine, image, p, scale=args.scale, upscaler=args.upscaler, overlap=args.overlap,
                        on_tile=tile_done)
    for message in result.warnings:
        if message not in said:
            cli._warn(message)
    cols, rows = result.grid
    for im, seed, text in zip(result.images, result.seeds, result.infotexts, strict=True):
        print(f"wrote {outputs.save(im, seed, text)} ({image.width}x{image.height} -> {im.width}x{im.height}, "
              f"{cols}x{rows} tiles)")
    return 0
