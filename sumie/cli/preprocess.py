"""``sumie preprocess KIND IMAGE -o OUT``: a control image from a picture (or a pose JSON), with the preprocessors
of A1111's ControlNet extension that need no weights; ``sumie preprocess --list`` shows them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sumie.errors import ConfigError

# CLI flags of the settings that are not plain numbers: the pose is IMAGE itself, the mask a file, drawing switches
_SPECIAL = {"pose", "mask", "body", "hands", "face"}


def _settings() -> dict[str, Any]:
    """Every numeric setting of every preprocessor by name (one flag each; the same name means the same kind of
    value in every preprocessor that has it)."""
    from sumie.preprocess import KINDS

    out: dict[str, Any] = {}
    for kind in KINDS.values():
        for p in kind.params:
            if p.name not in _SPECIAL:
                out.setdefault(p.name, p)
    return out


def add_parsers(sub: Any) -> None:
    """Register ``sumie preprocess``."""
    p = sub.add_parser("preprocess", help="make a control image (canny, scribble, shuffle, tile, colour grid, "
                       "inpaint mask, OpenPose skeleton from a pose JSON, ...)",
                       description="Make a control image with a preprocessor of A1111's ControlNet extension "
                       "(the ones that need no downloaded weights). Settings a preprocessor does not take are "
                       "refused; see --list.")
    p.add_argument("kind", nargs="?", metavar="KIND", help="preprocessor (see --list)")
    p.add_argument("image", nargs="?", metavar="IMAGE", help="input image (openpose: the pose JSON file)")
    p.add_argument("-o", "--output", metavar="OUT", help="output image (.png; .jpg / .webp except for inpaint)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--list", action="store_true", help="list the preprocessors with their settings and exit")
    p.add_argument("--json", action="store_true", help="with --list: print JSON")
    for name, param in _settings().items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int if param.type == "int" else float,
                       default=argparse.SUPPRESS, metavar="N", help=param.help)
    p.add_argument("--mask", dest="mask", default=argparse.SUPPRESS, metavar="FILE",
                   help="inpaint: mask image of IMAGE's size, white = repaint")
    for part in ("body", "hands", "face"):
        p.add_argument(f"--no-{part}", dest=part, action="store_false", default=argparse.SUPPRESS,
                       help=f"openpose: do not draw the {part}")
    p.set_defaults(func=cmd_preprocess)


def _list(as_json: bool) -> int:
    """Print the preprocessors, their settings with defaults and what each matches."""
    from sumie.preprocess import KINDS

    rows = [{"name": k.name, "for": k.for_model, "input": k.needs,
             "settings": {p.name: p.default for p in k.params if p.type != "pose"},
             "matches": k.matches} for k in KINDS.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for k, r in zip(KINDS.values(), rows, strict=True):
        settings = " ".join(_usage(p) for p in k.params if p.type != "pose")
        print(f"{r['name']:<18} {r['for']:<20} {settings}")
        print(f"{'':<18} {r['matches'].replace('`', '')}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    """Run one preprocessor on IMAGE and write OUT atomically."""
    from sumie.pipelines.images import _open
    from sumie.pipelines.output import save_image
    from sumie.preprocess import KINDS, run

    if args.list:
        return _list(args.json)
    if not args.kind:
        raise ConfigError(f"preprocess: name a preprocessor ({', '.join(KINDS)}) or pass --list")
    kind = KINDS.get(args.kind)
    if kind is None:
        raise ConfigError(f"unknown preprocessor {args.kind!r}; known: {', '.join(KINDS)}")
    if not args.image:
        raise ConfigError(f"preprocess {kind.name}: give the input {'pose JSON' if kind.needs == 'pose' else 'image'}")
    if not args.output:
        raise ConfigError("preprocess: give the output file (-o OUT.png)")
    out = Path(args.output)
    if kind.needs == "mask" and out.suffix.lower() not in (".png", ".webp"):
        raise ConfigError(f"{out}: the inpaint result keeps the mask as alpha; write a .png (or lossless .webp)")
    known = {p.name for p in kind.params}
    given = {n: getattr(args, n) for n in [*_settings(), *_SPECIAL] if hasattr(args, n)}
    refused = [n for n in given if n not in known]
    if refused:
        takes = ", ".join(_flag(p.name, p.type) for p in kind.params if p.name != "pose") or "no settings"
        raise ConfigError(f"preprocessor {kind.name!r} takes {takes}; not "
                          f"{', '.join(_flag(n, 'bool' if n in ('body', 'hands', 'face') else '') for n in refused)}")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out} already exists; choose another name or pass --overwrite")
    image = None
    if kind.needs == "pose":
        given["pose"] = Path(args.image)
    else:
        image = _open(args.image, "image")
    if "mask" in given:
        given["mask"] = _open(given["mask"], "mask")
    result = run(kind.name, image, **given)
    save_image(result, out, None, overwrite=args.overwrite)
    print(f"wrote {out} ({kind.name}, {result.width}x{result.height})")
    return 0


def _usage(p: Any) -> str:
    """A setting as ``--name DEFAULT`` for --list."""
    if p.type == "bool":
        return f"[--no-{p.name}]"
    if p.type == "image":
        return f"--{p.name} FILE"
    return f"--{p.name.replace('_', '-')} {'N' if p.default is None else p.default}"


def _flag(name: str, kind: str) -> str:
    """A setting's command-line flag."""
    return f"--no-{name}" if kind == "bool" else f"--{name.replace('_', '-')}"
