"""LoRA in a request: ``<lora:NAME:W>`` tags and ``GenerationParams.loras``, patched into the model, not reloaded.

Tags follow A1111 1.10 (``extra_networks_lora.py``): ``<lora:NAME>`` (weight 1), ``<lora:NAME:W>`` (W for the text
encoder and the UNet), ``<lora:NAME:TE:UNET>`` (text-encoder weight first), keywords ``te=`` / ``unet=`` (they win
over positions), negative weights allowed. ``<lyco:...>`` is the same (A1111's alias). Several LoRAs add their
deltas. A name given twice is A1111's way too: one network per name, listed once per tag, every listing with the
weights of the name's last tag (``<lora:x:0.5> <lora:x:1>`` adds x's delta twice at weight 1).

:class:`LoraHandler` is the engine's ``lora`` extra-network handler. The engine calls it on every request, tags or
not: it builds the request's patch set on a clone of ``engine.patcher`` and patches the model; the patch stays in
after the request, so the next request with the same set (same files, unchanged on disk, same weights) costs
nothing; another set replaces it (the patcher restores the original tensors, then patches), and a request without
LoRA restores the original weights, bit for bit. The checkpoint is never reloaded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sumie.adapters.lora.library import LoraLibrary, file_stamp
from sumie.adapters.patcher import ModelPatcher
from sumie.errors import ConfigError
from sumie.pipelines.params import LoraSpec
from sumie.prompts.parser import ExtraNetwork

if TYPE_CHECKING:
    from sumie.adapters.lora.file import LoraPatches
    from sumie.checkpoints.loader import StableDiffusionModels
    from sumie.pipelines.engine import Engine
    from sumie.pipelines.job import Job

__all__ = ["AppliedLora", "LoraHandler", "LoraSet", "build_lora_patcher", "lora_hashes_text", "parse_lora_arg",
           "spec_from_tag"]

_KNOWN_KEYS = ("te", "unet", "dyn")
SHOWN_SKIPPED = 3  # module names a skipped-modules warning lists


def _weight(text: str, what: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{tag}: the {what} weight {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{tag}: the {what} weight must be a finite number, got {text!r}")
    return value


def spec_from_tag(tag: ExtraNetwork) -> tuple[LoraSpec, list[str]]:
    """``<lora:NAME:TE:UNET:DYN>`` (or ``te=``/``unet=``/``dyn=``) -> (spec, notes about ignored parts)."""
    text = f"<{tag.kind}:{':'.join((tag.name, *tag.args))}>"
    if not tag.name.strip():
        raise ConfigError(f"{text}: the tag names no LoRA; write <lora:NAME:WEIGHT>")
    pos, named = tag.positional, tag.named
    te = _weight(pos[0], "text-encoder", text) if len(pos) > 0 else 1.0
    te = _weight(named["te"], "text-encoder", text) if "te" in named else te
    unet = _weight(pos[1], "UNet", text) if len(pos) > 1 else te
    unet = _weight(named["unet"], "UNet", text) if "unet" in named else unet
    notes = []
    if len(pos) > 2 or "dyn" in named:
        notes.append(f"{text}: the dynamic dimension (dyn) is not supported and was ignored; the LoRA is applied at "
                     "its full rank")
    unknown = [k for k in named if k not in _KNOWN_KEYS]
    if unknown:
        notes.append(f"{text}: unknown setting(s) {', '.join(unknown)} ignored (a LoRA tag takes te=, unet=)")
    return LoraSpec(tag.name, te, unet), notes


def parse_lora_arg(text: str) -> LoraSpec:
    """``NAME``, ``NAME:W`` or ``NAME:TE:UNET`` (the CLI's ``--lora``; a path may hold ``:`` only before the last
    weights, so ``C:/x.safetensors:0.8`` works)."""
    parts = text.split(":")
    weights: list[float] = []
    while len(parts) > 1 and len(weights) < 2:
        try:
            value = float(parts[-1])
        except ValueError:
            break
        weights.insert(0, value)
        parts.pop()
    name = ":".join(parts)
    if not name.strip():
        raise ConfigError(f"--lora {text!r}: give NAME, NAME:WEIGHT or NAME:TE_WEIGHT:UNET_WEIGHT")
    for w in weights:
        if not math.isfinite(w):
            raise ConfigError(f"--lora {text!r}: weights must be finite numbers")
    if not weights:
        return LoraSpec(name)
    return LoraSpec(name, weights[0], weights[1] if len(weights) > 1 else None)


def as_spec(value: object) -> LoraSpec:
    """A ``GenerationParams.loras`` item: a LoraSpec, or a name / path (weight 1)."""
    if isinstance(value, LoraSpec):
        return value
    if isinstance(value, str | os.PathLike):
        return LoraSpec(value)
    raise ConfigError(f"GenerationParams.loras takes LoraSpec(name, te=1.0, unet=None) items or names, got "
                      f"{type(value).__name__}")


def lora_tag(name: str, te: float, unet: float) -> str:
    """The prompt tag of a LoRA: ``<lora:name:0.8>`` or ``<lora:name:0.8:0.5>``."""
    return f"<lora:{name}:{te}>" if unet == te else f"<lora:{name}:{te}:{unet}>"


# ------------------------------------------------------------------------------------------------ patch sets


@dataclass(frozen=True)
class AppliedLora:
    """One LoRA of a patch set: its name (as mentioned; a path's file stem), file, weights, modules applied."""

    name: str
    mentioned: str
    path: Path
    te: float
    unet: float
    text_keys: int
    unet_keys: int
    skipped: tuple[str, ...]
    family: str | None = None

    @property
    def applied(self) -> bool:
        """True when any module of the file matched the model."""
        return bool(self.text_keys or self.unet_keys)


@dataclass
class LoraSet:
    """A resolved patch set: a patcher holding it (not yet patched), what it holds, and notes for the user."""

    patcher: ModelPatcher
    loras: list[AppliedLora]
    notes: list[str]


def _plan(items: Sequence[tuple[str, LoraSpec]]) -> list[tuple[str, LoraSpec]]:
    """A1111's listing: one entry per mention, each with the weights of that name's last mention."""
    last: dict[str, LoraSpec] = {}
    for name, spec in items:
        last[name] = spec
    return [(name, last[name]) for name, _ in items]


def build_lora_patcher(base: ModelPatcher, models: StableDiffusionModels, specs: Sequence[LoraSpec],
                       library: LoraLibrary, *, strict: bool = False) -> LoraSet:
    """Resolve ``specs``, read the files (cached) and add their patches to a clone of ``base`` (nothing patched yet).

    Text-encoder patches get the ``te`` weight and UNet patches the ``unet`` weight. Modules that match nothing in
    the model are listed in a note, or raise a ConfigError when ``strict``. A file for another model family raises
    (the file reader's ConfigError names both families).
    """
    patcher = base.clone()
    notes: list[str] = []
    loras: list[AppliedLora] = []
    resolved: dict[str, tuple[Path, str]] = {}
    built: dict[Path, LoraPatches] = {}
    warned: set[str] = set()
    resolved_empty: set[str] = set()
    for name, spec in _plan([(os.fspath(s.name), s) for s in specs]):
        if name not in resolved:
            found = library.resolve(name)
            if found.note:
                notes.append(found.note)
            resolved[name] = found.entry.path, found.entry.name if found.by_path else name
        path, shown = resolved[name]
        if path not in built:
            built[path] = library.read(path).patches(models)
        p = built[path]
        te, unet = float(spec.te), float(spec.unet_weight)
        if p.skipped and name not in warned:
            warned.add(name)
            first = ", ".join(p.skipped[:SHOWN_SKIPPED]) + (", ..." if len(p.skipped) > SHOWN_SKIPPED else "")
            what = (f"LoRA {shown!r}: {len(p.skipped)} of its module(s) match nothing in this "
                    f"{models.config.family} model and were skipped ({first})")
            if strict:
                raise ConfigError(f"{what}; the file does not fit this model (strict LoRA checking is on: "
                                  "without --strict-lora / strict_lora they are skipped with a warning)")
            notes.append(what)
        if not p.text and not p.unet and name not in resolved_empty:
            resolved_empty.add(name)
            if strict:
                raise ConfigError(f"LoRA {shown!r}: nothing in the file matches this model")
            notes.append(f"LoRA {shown!r}: nothing in the file matches this model; it was not applied")
        if te != 0.0 and p.text:
            patcher.add_patches(p.text, strength=te)
        if unet != 0.0 and p.unet:
            patcher.add_patches(p.unet, strength=unet)
        loras.append(AppliedLora(shown, name, path, te, unet, len(p.text), len(p.unet), tuple(p.skipped),
                                 p.family))
    return LoraSet(patcher, loras, notes)


def lora_hashes_text(loras: Sequence[AppliedLora], library: LoraLibrary) -> str | None:
    """A1111 1.10's ``Lora hashes`` value, ``name: hash, name2: hash2`` (each name once, ``:`` and ``,`` removed),
    for the LoRAs that applied; None when there are none."""
    out: dict[str, str] = {}
    for a in loras:
        if a.applied:
            out[a.name.replace(":", "").replace(",", "")] = library.shorthash(a.path)
    return ", ".join(f"{k}: {v}" for k, v in out.items()) or None


class LoraHandler:
    """The ``lora`` (and ``lyco``) extra-network handler of an engine: see the module docstring.

    ``library``: where names are looked up and parsed files cached; ``strict``: modules that match nothing are an
    error for every request (``GenerationParams.strict_lora`` asks it for one request).
    """

    def __init__(self, library: LoraLibrary | None = None, *, strict: bool = False) -> None:
        self.library = library if library is not None else LoraLibrary()
        self.strict = strict
        self.builds = 0  # patch sets built so far (requests that changed the set)
        self._key: tuple[object, ...] | None = None
        self._set: LoraSet | None = None

    @property
    def current(self) -> list[AppliedLora]:
        """The LoRAs of the patch set held now (patched into the model while :attr:`is_patched`)."""
        return list(self._set.loras) if self._set is not None else []

    @property
    def is_patched(self) -> bool:
        """True while this handler's LoRA weights are in the model."""
        return self._set is not None and self._set.patcher.is_patched

    def activate(self, engine: Engine, job: Job, tags: Sequence[ExtraNetwork]) -> None:
        """Apply the request's LoRAs (tags, then ``params.loras``), or restore the original weights if it has none."""
        specs: list[LoraSpec] = []
        for tag in tags:
            spec, notes = spec_from_tag(tag)
            specs.append(spec)
            for n in notes:
                job.warn(n)
        extra = [as_spec(s) for s in job.params.loras]
        specs.extend(extra)
        lora_set = self.apply(engine, specs, strict=self.strict or job.params.strict_lora)
        for n in lora_set.notes if lora_set is not None else []:
            job.warn(n)
        if lora_set is None:
            return
        text = lora_hashes_text(lora_set.loras, self.library)
        if text:
            job.extra["Lora hashes"] = text
        by_mention = {a.mentioned: a for a in lora_set.loras}
        for spec in extra:  # A1111 writes LoRAs that were not tags into the prompt (its "sd_lora" option)
            a = by_mention[os.fspath(spec.name)]
            job.infotext_tags.append(lora_tag(a.name, a.te, a.unet))

    def deactivate(self, engine: Engine, job: Job) -> None:
        """Nothing: the patch stays in for the next request (which replaces or removes it)."""

    def apply(self, engine: Engine, specs: Sequence[LoraSpec], *, strict: bool | None = None) -> LoraSet | None:
        """Make ``specs`` the patch set in the engine's model (None: no LoRA, the original weights)."""
        strict = self.strict if strict is None else strict
        if not specs:
            self.unpatch()
            return None
        paths = [self.library.resolve(os.fspath(s.name)).entry.path for s in specs]
        files = tuple((str(p.resolve()), *file_stamp(p), float(s.te), float(s.unet_weight), os.fspath(s.name))
                      for p, s in zip(paths, specs, strict=True))
        key = (id(engine.models), id(engine.patcher), files, strict)
        if key != self._key or self._set is None:
            built = build_lora_patcher(engine.patcher, engine.models, specs, self.library, strict=strict)
            self._key, self._set = key, built
            self.builds += 1
        try:
            self._set.patcher.patch()  # restores the original tensors of another set first; a no-op for this set
        except BaseException:
            self._key, self._set = None, None
            raise
        return self._set

    def unpatch(self) -> None:
        """Restore the original weights (bit for bit) and forget the patch set."""
        if self._set is not None:
            self._set.patcher.unpatch()
        self._key, self._set = None, None


def register(engine: Engine, handler: LoraHandler) -> None:
    """Make ``handler`` the engine's ``lora`` and ``lyco`` handler (A1111 reads ``<lyco:...>`` as ``<lora:...>``)."""
    engine.extra_networks["lora"] = handler
    engine.extra_networks["lyco"] = handler
