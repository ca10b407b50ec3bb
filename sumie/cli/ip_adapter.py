"""IP-Adapter on the command line: ``--ip-adapter FILE --ip-image IMG [--ip-weight W] [--ip-start S] [--ip-end E]
[--clip-vision FILE]``; each ``--ip-adapter`` opens a unit and the options after it (up to the next
``--ip-adapter``) belong to it; ``--ip-image`` may be given several times per unit."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sumie.cli import finite_number

if TYPE_CHECKING:
    from sumie.checkpoints.manager import ModelManager
    from sumie.pipelines.params import GenerationParams, IPAdapterUnit

_UNIT_FLAGS = ("--ip-image", "--ip-weight", "--ip-start", "--ip-end", "--clip-vision")


class _InOrder(argparse.Action):
    """Record (flag, value) in command-line order; units are built (and checked) in :func:`prepare`."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        seen = list(getattr(namespace, "ip_args", None) or [])
        seen.append((option_string, values))
        namespace.ip_args = seen


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The IP-Adapter options of the generation commands."""
    g = p.add_argument_group("IP-Adapter (image prompt; each --ip-adapter opens a unit, the options after it are its)")
    g.set_defaults(ip_args=[])
    g.add_argument("--ip-adapter", action=_InOrder, metavar="FILE",
                   help="IP-Adapter file (.bin / .safetensors), or a name in --models-dir's models/ipadapter "
                        "(ComfyUI) or models/ControlNet (A1111); repeatable for several units")
    g.add_argument("--ip-image", action=_InOrder, metavar="IMG",
                   help="reference image of the unit (repeatable: several images' tokens are concatenated)")
    g.add_argument("--ip-weight", action=_InOrder, metavar="W", help="weight of the unit (default 1)")
    g.add_argument("--ip-start", action=_InOrder, metavar="S",
                   help="fraction of the noise schedule where the unit starts (default 0)")
    g.add_argument("--ip-end", action=_InOrder, metavar="E", help="fraction where it ends (default 1)")
    g.add_argument("--clip-vision", action=_InOrder, metavar="FILE",
                   help="CLIP vision encoder of the unit (default: an image_encoder folder next to the adapter or a "
                        "fitting file of the clip_vision folder)")


def _image(path: str) -> Any:
    from PIL import Image

    from sumie.errors import ConfigError

    try:
        with Image.open(Path(path).expanduser()) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError) as e:
        raise ConfigError(f"--ip-image {path}: cannot read the image ({type(e).__name__}: {e})") from None


def units_from_args(ip_args: list[tuple[str, str]], manager: ModelManager | None = None) -> list[IPAdapterUnit]:
    """The units of the recorded options (files looked up now: a typo fails before the model loads)."""
    from sumie.errors import ConfigError
    from sumie.pipelines.params import IPAdapterUnit

    units: list[IPAdapterUnit] = []
    for flag, value in ip_args:
        if flag == "--ip-adapter":
            units.append(IPAdapterUnit(model=_resolve(manager, "ip_adapter", value, flag)))
            continue
        if not units:
            raise ConfigError(f"{flag} {value}: give --ip-adapter FILE before the unit's options")
        unit = units[-1]
        if flag == "--ip-image":
            unit.images.append(_image(value))
        elif flag == "--ip-weight":
            unit.weight = finite_number(flag, value)
        elif flag == "--ip-start":
            unit.start = finite_number(flag, value)
        elif flag == "--ip-end":
            unit.end = finite_number(flag, value)
        elif flag == "--clip-vision":
            unit.encoder = _resolve(manager, "clip_vision", value, flag)
    for i, unit in enumerate(units):
        if not unit.images:
            raise ConfigError(f"--ip-adapter {unit.model}: no --ip-image after it (unit {i})")
    return units


def _resolve(manager: ModelManager | None, kind: str, name: str, flag: str) -> str:
    from sumie.errors import ConfigError

    if manager is not None:
        return str(manager.resolve(kind, name))
    p = Path(name).expanduser()
    if not p.exists():
        raise ConfigError(f"{flag} {name}: no such file; give a path (or a name with --models-dir)")
    return str(p)


def prepare(args: argparse.Namespace, p: GenerationParams, manager: ModelManager | None) -> None:
    """Add the command's IP-Adapter units to the request."""
    p.ip_adapters = [*p.ip_adapters, *units_from_args(list(getattr(args, "ip_args", []) or []), manager)]
