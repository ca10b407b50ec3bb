"""LoRA on the command line: ``--lora-dir`` / ``--lora`` / ``--strict-lora`` for generation, ``sumie lora info``
and ``sumie lora merge``."""

from __future__ import annotations

import argparse
import json
import re
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


_BLOCK = re.compile(r"^(?P<block>(?:lora_unet|unet)_(?:(?:down|up)_blocks_\d+|(?:input|output)_blocks_\d+|mid_block|"
                    r"middle_block(?:_\d+)?)|lora_te\d?|text_encoder(?:_\d)?)_(?P<rest>.+)$")
_INDICES = re.compile(r"(?:^\d+|(?:^|_)(?:attentions_\d+|resnets_\d+|transformer_blocks_\d+|"
                      r"text_model_encoder_layers_\d+|text_model|encoder_layers_\d+|layers_\d+))(?=_|$)")


def _block_and_target(name: str) -> tuple[str, str]:
    """``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`` -> (``lora_unet_down_blocks_1``,
    ``attn1_to_q``): the block a module sits in and what kind of layer it is."""
    m = _BLOCK.match(name.replace(".", "_"))
    if m is None:
        return "other", name
    return m.group("block"), _INDICES.sub("", m.group("rest")).strip("_") or m.group("rest")


def _fmt(values: set[Any]) -> str:
    shown = sorted(v for v in values if v is not None)
    return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in shown) or "-"


def _text_info(info: dict[str, Any]) -> list[str]:
    """``sumie lora info`` as lines: the file, rank/alpha per block, the layer kinds targeted, ss_* metadata."""
    family = info.get("family")
    lines = [f"file:     {info.get('path')}", f"format:   {info.get('format')}",
             f"family:   {info.get('family_name') or 'unknown'}" + (f" ({family})" if family else "")]
    modules: dict[str, dict[str, Any]] = info.get("modules") or {}
    counts = info.get("module_counts") or {}
    lines.append(f"modules:  {len(modules)}" + (f" ({', '.join(f'{v} {k}' for k, v in counts.items())})"
                                                if counts else ""))
    blocks: dict[str, list[dict[str, Any]]] = {}
    targets: dict[str, set[str]] = {}
    for name, m in modules.items():
        block, target = _block_and_target(name)
        blocks.setdefault(block, []).append(m)
        targets.setdefault(str(m.get("component", "?")), set()).add(target)
    if blocks:
        lines.append("blocks:   (modules, kind, rank, alpha)")
        width = max(len(b) for b in blocks)
        for block, ms in blocks.items():
            kinds = _fmt({m.get("kind") for m in ms})
            dora = " dora" if any(m.get("dora") for m in ms) else ""
            lines.append(f"  {block:<{width}}  {len(ms):>4}  {kinds}{dora}  rank {_fmt({m.get('rank') for m in ms})}"
                         f"  alpha {_fmt({m.get('alpha') for m in ms})}")
    for comp, names in targets.items():
        lines.append(f"targets ({comp}): {', '.join(sorted(names))}")
    if info.get("unknown_keys"):
        unknown = list(info["unknown_keys"])
        lines.append(f"unknown keys: {len(unknown)} ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})")
    meta = info.get("metadata") or {}
    if meta:
        lines.append("metadata:")
        for k, v in meta.items():
            text = str(v).replace("\n", " ")
            lines.append(f"  {k}: {text if len(text) <= 160 else text[:157] + '...'}")
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
