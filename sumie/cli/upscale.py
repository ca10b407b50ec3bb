"""``sumie upscale IMAGE --upscaler NAME_OR_FILE [--scale S] [--tile N] -o OUT``: an image through an upscaler model
(ESRGAN, Real-ESRGAN, SwinIR), tiled, written atomically; and the early check of ``--hires-upscaler``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sumie.errors import ConfigError

if TYPE_CHECKING:
    from sumie.checkpoints.manager import ModelManager
    from sumie.pipelines.params import GenerationParams

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_parsers(sub: Any) -> None:
    """Register ``sumie upscale``."""
    p = sub.add_parser("upscale", help="upscale an image with an upscaler model (ESRGAN, Real-ESRGAN, SwinIR)",
                       description="Upscale IMAGE with an upscaler model, tile by tile with blended overlaps. The "
                       "architecture and scale are read from the file's weights.")
    p.add_argument("image", metavar="IMAGE", help="input image")
    p.add_argument("--upscaler", required=True, metavar="NAME_OR_FILE",
                   help="upscaler file (.pth / .safetensors), or a name in --models-dir's ESRGAN / RealESRGAN / "
                        "SwinIR (A1111) or upscale_models (ComfyUI) folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output image (.png, .jpg, .webp)")
    p.add_argument("--scale", type=float, metavar="S",
                   help="upscale factor (default: the model's; other factors: the model, then Lanczos)")
    p.add_argument("--tile", type=int, default=512, metavar="N", help="tile size in input pixels, 0 = no tiling "
                   "(default 512)")
    p.add_argument("--overlap", type=int, default=32, metavar="N", help="overlap of neighbouring tiles in input "
                   "pixels (default 32)")
    p.add_argument("--models-dir", metavar="DIR", help="AUTOMATIC1111 or ComfyUI folder to look names up in")
    p.add_argument("--device", metavar="DEV", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=list(_DTYPES), help="default: fp16 on a GPU, else fp32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_upscale)


def _manager(models_dir: str | None) -> ModelManager:
    from sumie.checkpoints.manager import ModelFolders, ModelManager

    return ModelManager(ModelFolders(models_dir) if models_dir else None, max_models=1)


def check_hires_upscaler(p: GenerationParams, manager: ModelManager | None) -> None:
    """Fail before the checkpoint loads when ``--hires-upscaler`` names a model that cannot be found."""
    from sumie.pipelines.hires import PIXEL_UPSCALERS
    from sumie.pipelines.upscale import resolve_upscaler

    if p.hires is not None and str(p.hires.upscaler) not in PIXEL_UPSCALERS:
        resolve_upscaler(manager if manager is not None else _manager(None), p.hires.upscaler)


def cmd_upscale(args: argparse.Namespace) -> int:
    """Read IMAGE, run the upscaler, write OUT atomically."""
    import math

    import torch

    from sumie.models.upscalers.detect import load_upscaler
    from sumie.pipelines.images import _open
    from sumie.pipelines.output import IMAGE_FORMATS, save_image
    from sumie.pipelines.upscale import resolve_upscaler, upscale

    out = Path(args.output)
    if out.suffix.lower() not in IMAGE_FORMATS:
        raise ConfigError(f"{out}: unknown image type {out.suffix or '(no suffix)'!r}; end the name in "
                          f"{', '.join(IMAGE_FORMATS)}")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} already exists; choose another name or pass --overwrite")
    if args.scale is not None and not (math.isfinite(args.scale) and 0 < args.scale <= 16):
        raise ConfigError(f"--scale {args.scale}: use a number in (0, 16]")
    if args.tile < 0:
        raise ConfigError(f"--tile {args.tile}: use 0 (no tiling) or a positive size")
    if args.overlap < 0 or (args.tile and 2 * args.overlap >= args.tile):
        raise ConfigError(f"--overlap {args.overlap}: use 0 or more, under half of --tile ({args.tile})")
    image = _open(args.image, "image")
    path = resolve_upscaler(_manager(args.models_dir), args.upscaler)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"--device {args.device}: not usable here ({str(e).splitlines()[0]}); use --device cpu "
                          "or an available GPU") from None
    dtype = getattr(torch, _DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "fp16")])
    model = load_upscaler(path, device=device, dtype=dtype)
    w, h = image.size
    target = (round(w * args.scale), round(h * args.scale)) if args.scale is not None else None
    if target is not None and min(target) < 1:
        raise ConfigError(f"--scale {args.scale} makes {w}x{h} empty; use a larger factor")
    result = upscale(model, image, args.scale, args.tile, args.overlap)
    save_image(result, out, None, overwrite=args.overwrite)
    print(f"wrote {out} ({model.spec.describe()}, {w}x{h} -> {result.width}x{result.height})")
    return 0
