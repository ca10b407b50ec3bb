"""The ``sumie`` command line: every sub-command drives the same library functions as the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from sumie.errors import SumieError

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
    from sumie.checkpoints.io import legacy_model_hash, model_hash
    from sumie.checkpoints.loader import inspect_checkpoint, stored_dtype

    path = Path(args.model)
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
                 "channel_mult": list(cfg.unet.channel_mult), "context_dim": cfg.unet.context_dim},
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


def cmd_random_checkpoint(args: argparse.Namespace) -> int:
    """Write a checkpoint with random weights in the real single-file layout (for tests and demos)."""
    from sumie.checkpoints.io import save_safetensors_atomic
    from sumie.checkpoints.save import random_single_file
    from sumie.configs import FAMILIES, TINY

    table = TINY if args.tiny else FAMILIES
    cfg = table[args.family]
    if args.inpainting:
        cfg = cfg.with_(unet=cfg.unet.__class__(**{**cfg.unet.__dict__, "in_channels": 9}))
    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise SumieError(f"{out}: already exists; pass --overwrite to replace it")
    save_safetensors_atomic(random_single_file(cfg, seed=args.seed), out)
    print(f"wrote {out} ({'tiny ' if args.tiny else ''}{args.family}, random weights)")
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(prog="sumie", description="Stable Diffusion in plain PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="describe a checkpoint file or diffusers folder")
    p.add_argument("model", help="a .safetensors/.ckpt file or a diffusers folder")
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
