"""ControlNet on the command line: ``--controlnet FILE_OR_NAME --control-image IMG [--control-weight W] ...``.

Each ``--controlnet`` opens a unit; the ``--control-*`` options after it (until the next ``--controlnet``) belong to
it. With ``--from-png`` the image's units are restored from its infotext; their control images are not in the PNG:
give them as ``--control-image`` options before any ``--controlnet``, one per unit, in order (a ``--controlnet``
replaces the restored units). In img2img and inpainting a unit without ``--control-image`` takes the init image.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sumie.cli import finite_number

if TYPE_CHECKING:
    from sumie.checkpoints.manager import ModelManager
    from sumie.pipelines.params import ControlUnit, GenerationParams

# option -> ControlUnit field
OPTIONS = {"--controlnet": "model", "--control-image": "image", "--control-weight": "weight",
           "--control-start": "start", "--control-end": "end", "--control-mode": "mode",
           "--control-resize": "resize_mode", "--control-module": "module"}
_FLOATS = ("weight", "start", "end")


class _InOrder(argparse.Action):
    """Collect every control option as (option, value) in command-line order (grouped later, with clear errors)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        items.append((option_string, values))
        setattr(namespace, self.dest, items)


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The ControlNet options of the generation commands."""
    g = p.add_argument_group("ControlNet (each --controlnet opens a unit; the --control-* options after it belong "
                             "to it; repeat for several)")
    helps = {
        "--controlnet": ("FILE_OR_NAME", "ControlNet file, or a name in --models-dir's ControlNet folder (img2img: "
                                         "without --control-image it takes the init image)"),
        "--control-image": ("IMG", "the control image (an edge map, pose, depth map...; with --from-png before any "
                                   "--controlnet: the restored units' images, in order)"),
        "--control-weight": ("W", "weight in [0, 2] (default 1)"),
        "--control-start": ("S", "fraction of the steps where it starts (default 0)"),
        "--control-end": ("E", "fraction of the steps where it ends (default 1)"),
        "--control-mode": ("MODE", "balanced (default), prompt ('My prompt is more important') or controlnet "
                                   "('ControlNet is more important'); also A1111's names or 0/1/2"),
        "--control-resize": ("MODE", "crop-and-resize (default), just-resize or resize-and-fill (or 0/1/2)"),
        "--control-module": ("KIND", "preprocessor run on the image first (default none: the image is the map)"),
    }
    for opt, (metavar, text) in helps.items():
        g.add_argument(opt, action=_InOrder, dest="control", default=None, metavar=metavar, help=text)


def _mode(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def units_from_args(items: list[tuple[str, str]], restored: list[ControlUnit],
                    init_image: bool = False) -> list[ControlUnit]:
    """The units of the command line (``items`` in order), or the restored ones with their images filled in;
    ``init_image``: img2img, where a unit without an image takes the init image (as in A1111's extension)."""
    import dataclasses

    from sumie.adapters.control.units import check_unit, module_settings, prepare_image
    from sumie.errors import ConfigError
    from sumie.pipelines.params import ControlUnit

    groups: list[dict[str, Any]] = []
    bare_images: list[str] = []
    for opt, value in items:
        name = OPTIONS[opt]
        if name == "model":
            groups.append({"model": value, "_opts": {opt}})
            continue
        if not groups:
            if name == "image" and restored:
                bare_images.append(value)
                continue
            raise ConfigError(f"{opt} {value}: comes before any --controlnet; put each unit's --control-* options "
                              "after its --controlnet FILE_OR_NAME")
        group = groups[-1]
        if opt in group["_opts"]:
            raise ConfigError(f"{opt} given twice for --controlnet {group['model']}; each unit takes it once")
        group["_opts"].add(opt)
        group[name] = finite_number(opt, value) if name in _FLOATS else _mode(value) if name in ("mode",
                                                                                           "resize_mode") else value
    if groups:
        if bare_images:
            raise ConfigError("--control-image before any --controlnet fills the units of --from-png; with "
                              "--controlnet units, give each image after its --controlnet")
        units = []
        for g in groups:
            if "image" not in g and not init_image:
                raise ConfigError(f"--controlnet {g['model']} has no --control-image; give one after it")
            units.append(ControlUnit(**{k: v for k, v in g.items() if k != "_opts"}))
    else:
        if len(bare_images) > len(restored):
            raise ConfigError(f"{len(bare_images)} --control-image for {len(restored)} ControlNet unit(s) of "
                              "--from-png")
        units = [dataclasses.replace(u, image=im) for u, im in zip(restored, bare_images, strict=False)]
        units += restored[len(bare_images):]
    for i, u in enumerate(units):
        check_unit(float(u.weight), float(u.start), float(u.end), u.mode, u.resize_mode)
        if u.image is None and not init_image:
            raise ConfigError(f"the image used ControlNet {i} ({u.model}); its control image is not stored in the PNG: "
                              "give it with --control-image IMG (one per unit, in order)")
        if u.image is not None:
            u.image = prepare_image(Path(str(u.image)).expanduser() if isinstance(u.image, str) else u.image, "none")
        if u.module not in ("none", ""):
            module_settings(u.module, u.processor_res, u.threshold_a, u.threshold_b)  # a known module, image input
    return units


def prepare(args: argparse.Namespace, p: GenerationParams, manager: ModelManager | None) -> None:
    """Put the command's units into the request and check names, files, numbers and images before the model loads."""
    from sumie.errors import ConfigError, SumieError

    items = getattr(args, "control", None) or []
    if not items and not p.controlnets:
        return
    p.controlnets = units_from_args(items, p.controlnets, init_image=bool(p.init_images))
    for u in p.controlnets:
        name = str(u.model)
        try:
            if manager is not None:
                manager.resolve("controlnet", name)
            elif not Path(name).expanduser().is_file():
                raise ConfigError(f"ControlNet {name}: no such file; give a path, or --models-dir with a ControlNet "
                                  "folder to find it by name")
        except SumieError as e:
            raise ConfigError(f"ControlNet {name}: {e}") from None
