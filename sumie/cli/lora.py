"""LoRA on the command line: ``--lora-dir`` / ``--lora`` / ``--strict-lora`` for generation, ``sumie lora info``
and ``sumie lora merge``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sumie.adapters.lora.library import LoraLibrary
    from sumie.checkpoints.hashes import FileHashes
    from sumie.checkpoints.manager import ModelManager
    from sumie.pipelines.params import GenerationParams

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
LORA_KINDS = ("lora", "lyco")


def _warn(message: str) -> None:
    print(f"sumie: warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ generation


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The LoRA options of the generation commands."""
    g = p.add_argument_group("LoRA (prompt tags <lora:NAME:W> or <lora:NAME:TE:UNET>)")
    g.add_argument("--lora-dir", action="append", default=[], metavar="DIR",
                   help="folder of LoRA files, searched recursively (repeatable; besides --models-dir's "
                        "models/Lora, models/LyCORIS or models/loras)")
    g.add_argument("--lora", action="append", default=[], metavar="NAME[:W[:UNET]]",
                   help="apply a LoRA without a prompt tag: a name in the LoRA folders or a path, with the weight "
                        "(default 1; a second number is the UNet weight); repeatable")
    g.add_argument("--strict-lora", action="store_true",
                   help="fail when a LoRA has modules that match nothing in the model (default: skip them with a "
                        "warning)")


def library_for(args: argparse.Namespace, manager: ModelManager | None, hashes: FileHashes) -> LoraLibrary:
    """The LoRA folders of a command: the models folder's, then every --lora-dir (a name in both: --lora-dir's)."""
    from sumie.adapters.lora.library import LoraLibrary
    from sumie.errors import ConfigError

    for d in args.lora_dir:
        if not Path(d).expanduser().is_dir():
            raise ConfigError(f"--lora-dir {d}: no such folder")
    folders = manager.folders.dirs("lora") if manager is not None and manager.folders is not None else []
    return LoraLibrary([*folders, *args.lora_dir], hashes=hashes)


def prepare(args: argparse.Namespace, p: GenerationParams, manager: ModelManager | None,
            hashes: FileHashes) -> LoraLibrary:
    """Add --lora / --strict-lora to the request and look every LoRA name up before the model loads (a typo fails
    in a second, with close matches)."""
    from sumie.adapters.lora.handler import parse_lora_arg, spec_from_tag
    from sumie.pipelines.extra_networks import collect_tags

    library = library_for(args, manager, hashes)
    p.loras = [*p.loras, *(parse_lora_arg(a) for a in args.lora)]
    p.strict_lora = p.strict_lora or args.strict_lora
    tags = collect_tags(p.prompt, p.negative_prompt)
    specs = [spec_from_tag(t)[0] for kind in LORA_KINDS for t in tags.get(kind, [])]
    for spec in [*specs, *p.loras]:
        library.resolve(spec.name)
    return library


def attach(engine: Any, library: LoraLibrary, args: argparse.Namespace) -> None:
    """Make the engine's LoRA handler use the command's folders (and the hash cache on disk)."""
    from sumie.adapters.lora.handler import LoraHandler, register

    register(engine, LoraHandler(library, strict=args.strict_lora))


# ------------------------------------------------------------------------------------------------ sumie lora


def add_parsers(sub: Any) -> None:
    """Register ``sumie lora info`` and ``sumie lora merge``."""
    p = sub.add_parser("lora", help="inspect LoRA files or merge them into a checkpoint")
    lora_sub = p.add_subparsers(dest="lora_command", required=True, metavar="COMMAND")

    i = lora_sub.add_parser("info", help="format, model family, rank/alpha per block, targets and training "
                            "metadata of a LoRA file")
    i.add_argument("file", help="LoRA file (.safetensors, .pt, .ckpt)")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_lora_info)

    m = lora_sub.add_parser("merge", help="write a checkpoint with LoRAs merged into its weights")
    m.add_argument("model", help="checkpoint file or diffusers folder (or a name in --models-dir)")
    m.add_argument("loras", nargs="+", metavar="LORA[:W[:UNET]]",
                   help="LoRA name (in --lora-dir / --models-dir) or path, with its weight (default 1; a second "
                        "number is the UNet weight)")
    m.add_argument("-o", "--output", required=True, metavar="OUT", help="output .safetensors file")
    m.add_argument("--lora-dir", action="append", default=[], metavar="DIR", help="folder of LoRA files (repeatable)")
    m.add_argument("--models-dir", metavar="DIR", help="AUTOMATIC1111 or ComfyUI folder (model and LoRA names)")
    m.add_argument("--dtype", choices=list(_DTYPES),
                   help="stored dtype of the merged file (default: the model file's); the merge is computed in fp32")
    m.add_argument("--strict-lora", action="store_true", help="fail when a LoRA module matches nothing")
    m.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    m.set_defaults(func=cmd_lora_merge)


def _text_info(info: dict[str, Any]) -> list[str]:
    """``sumie lora info`` as lines: scalars first, then nested tables, then the ss_* metadata."""
    lines: list[str] = []
    nested: dict[str, Any] = {}
    for key, value in info.items():
        if key == "metadata":
            continue
        if isinstance(value, dict | list) and value:
            nested[key] = value
        else:
            lines.append(f"{key + ':':<14}{'-' if value in (None, '', [], {}) else value}")
    for key, value in nested.items():
        lines.append(f"{key}:")
        if isinstance(value, dict):
            for k, v in value.items():
                lines.append(f"  {k}: {json.dumps(v) if isinstance(v, dict | list) else v}")
        else:
            for v in value:
                lines.append(f"  {json.dumps(v) if isinstance(v, dict | list) else v}")
    meta = info.get("metadata") or {}
    if meta:
        lines.append("metadata:")
        for k, v in meta.items():
            text = str(v).replace("\n", " ")
            lines.append(f"  {k}: {text if len(text) <= 200 else text[:197] + '...'}")
    return lines


def cmd_lora_info(args: argparse.Namespace) -> int:
    """Describe a LoRA file (the core's :func:`~sumie.adapters.lora.file.lora_info`)."""
    from sumie.adapters.lora.file import lora_info
    from sumie.errors import ConfigError

    path = Path(args.file).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; give the path to a LoRA file")
    info = lora_info(path)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False, default=str))
    else:
        print("\n".join(_text_info(info)))
    return 0


def cmd_lora_merge(args: argparse.Namespace) -> int:
    """Merge LoRAs into a checkpoint and write a new single-file checkpoint (atomic)."""
    import torch

    from sumie.adapters.lora.handler import parse_lora_arg
    from sumie.adapters.lora.merge import save_merged
    from sumie.checkpoints.embedded import resolve_model
    from sumie.checkpoints.hashes import FileHashes, default_cache_path
    from sumie.checkpoints.io import SAFETENSORS_EXT, file_metadata
    from sumie.checkpoints.loader import load_models, stored_dtype
    from sumie.errors import ConfigError, SumieError

    out = Path(args.output)
    if out.suffix.lower() not in SAFETENSORS_EXT:
        raise ConfigError(f"-o {out}: the merged checkpoint is written as .safetensors; name it "
                          f"{out.with_suffix('.safetensors').name}")
    if out.exists() and not args.overwrite:
        raise SumieError(f"{out}: already exists; pass --overwrite to replace it")
    specs = [parse_lora_arg(a) for a in args.loras]
    hashes = FileHashes(default_cache_path())
    manager = None
    if args.models_dir:
        from sumie.checkpoints.manager import ModelFolders, ModelManager

        manager = ModelManager(ModelFolders(args.models_dir), hashes=hashes)
        model = manager.resolve("checkpoint", args.model)
    else:
        model = resolve_model(args.model)
    library = library_for(args, manager, hashes)
    for spec in specs:  # names first: a typo fails before the model loads
        library.resolve(spec.name)
    stored = stored_dtype(model)
    dtype = getattr(torch, _DTYPES[args.dtype] if args.dtype else stored if stored in _DTYPES.values() else "float32")
    models = load_models(model, dtype=torch.float32, file_hash=hashes.model_hash)
    meta = file_metadata(model) if Path(model).is_file() else {}
    result = save_merged(models, specs, out, library=library, dtype=dtype, strict=args.strict_lora,
                         source_metadata=meta)
    for note in result.notes:
        _warn(note)
    done = ", ".join(f"{a.name} (te {a.te}, unet {a.unet})" for a in result.loras if a.applied)
    print(f"wrote {out} ({Path(model).name} + {done}; {str(dtype).removeprefix('torch.')})")
    return 0
