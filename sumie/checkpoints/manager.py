"""Model folders (A1111 and ComfyUI layouts) and the model manager: names -> files -> loaded models, LRU-cached.

:class:`ModelFolders` finds the files of each kind (checkpoint, lora, vae, embedding, controlnet, upscaler, ip_adapter,
clip_vision) in either layout, whether it is given the web UI / ComfyUI folder or its ``models/`` folder:

=========== ======================================================== ==========================
kind        AUTOMATIC1111                                            ComfyUI
=========== ======================================================== ==========================
checkpoint  ``models/Stable-diffusion``                              ``models/checkpoints``
lora        ``models/Lora``, ``models/LyCORIS``                      ``models/loras``
vae         ``models/VAE``                                           ``models/vae``
embedding   ``embeddings`` (web UI root), ``models/embeddings``      ``models/embeddings``
controlnet  ``models/ControlNet``                                    ``models/controlnet``
upscaler    ``models/ESRGAN``, ``models/RealESRGAN``, ``SwinIR``     ``models/upscale_models``
ip_adapter  ``models/ControlNet`` (the ControlNet extension's)        ``models/ipadapter``
clip_vision ``models/clip_vision``                                   ``models/clip_vision``
=========== ======================================================== ==========================

A model is named by its path relative to its folder (``sdxl/juggernaut.safetensors``, A1111's checkpoint name),
that path without the suffix, the file stem, A1111's model name (``sdxl_juggernaut``) or A1111's title
``name [hash]``. :class:`ModelManager` loads what is asked on demand and keeps it in an LRU cache bounded by a memory
budget (bytes of parameters and buffers actually held), with one load at a time per manager.
"""

from __future__ import annotations

import difflib
import gc
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sumie.checkpoints.embedded import resolve_model
from sumie.checkpoints.hashes import FileHashes
from sumie.checkpoints.io import SAFETENSORS_EXT, read_safetensors_header
from sumie.checkpoints.loader import StableDiffusionModels, load_models, load_vae
from sumie.checkpoints.precision import Precision
from sumie.errors import CheckpointError, ConfigError
from sumie.memory import trim_heap
from sumie.models.packed import PackingMode, check_packing_mode, set_weight_packing

__all__ = ["KINDS", "LoadRequest", "LoadedModel", "ModelFile", "ModelFolders", "ModelManager", "held_bytes",
           "split_title"]

KINDS = ("checkpoint", "lora", "vae", "embedding", "controlnet", "upscaler", "ip_adapter", "clip_vision")
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")

_LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "a1111": {"checkpoint": ("Stable-diffusion",), "lora": ("Lora", "LyCORIS"), "vae": ("VAE",),
              "embedding": ("embeddings",), "controlnet": ("ControlNet",),
              "upscaler": ("ESRGAN", "RealESRGAN", "SwinIR"),
              "ip_adapter": ("ControlNet",), "clip_vision": ("clip_vision",)},
    "comfyui": {"checkpoint": ("checkpoints",), "lora": ("loras",), "vae": ("vae",), "embedding": ("embeddings",),
                "controlnet": ("controlnet",), "upscaler": ("upscale_models",), "ip_adapter": ("ipadapter",),
                "clip_vision": ("clip_vision",)},
}
_LAYOUT_NAMES = {"a1111": "AUTOMATIC1111", "comfyui": "ComfyUI"}
_TITLE = re.compile(r"(.+?)\s*\[([0-9a-fA-F]{8,64})\]")
MiB = 1 << 20


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown model kind {kind!r}; use one of: {', '.join(KINDS)}")


def _child(folder: Path, name: str) -> Path | None:
    """The subfolder ``name`` of ``folder`` (exact spelling first, then any letter case), or None."""
    exact = folder / name
    if exact.is_dir():
        return exact
    try:
        for entry in sorted(folder.iterdir()):
            if entry.name.lower() == name.lower() and entry.is_dir():
                return entry
    except OSError:
        pass
    return None


def split_title(name: str) -> tuple[str, str | None]:
    """A1111's title ``"name [hash]"`` -> ``("name", "hash")``; any other name -> ``(name, None)``."""
    m = _TITLE.fullmatch(name.strip())
    return (m.group(1), m.group(2).lower()) if m else (name.strip(), None)


@dataclass(frozen=True)
class ModelFile:
    """One model of a folder: ``name`` is its path relative to the kind's folder, ``/``-separated, with suffix."""

    kind: str
    name: str
    path: Path

    @property
    def stem(self) -> str:
        """The file (or diffusers folder) name without suffix."""
        return Path(self.name).stem if self.path.is_file() else Path(self.name).name

    @property
    def bare(self) -> str:
        """The relative name without the suffix."""
        return self.name[: -len(self.path.suffix)] if self.path.is_file() and self.path.suffix else self.name

    @property
    def model_name(self) -> str:
        """A1111's model name: the relative name without suffix, folders joined by ``_``."""
        return self.bare.replace("/", "_")


class ModelFolders:
    """The model folders of an AUTOMATIC1111 or ComfyUI install (``root`` = the install or its ``models/``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        given = Path(root).expanduser()
        if not given.is_dir():
            raise ConfigError(f"models folder {given}: no such folder; give an AUTOMATIC1111 or ComfyUI folder or "
                              "its models/ folder")
        looked: list[str] = []
        sub = _child(given, "models")
        for candidate in ([sub] if sub is not None else []) + [given]:
            for layout, kinds in _LAYOUTS.items():
                marker = kinds["checkpoint"][0]
                looked.append(str(candidate / marker))
                if _child(candidate, marker) is not None:
                    self.root, self.models_dir, self.layout = given, candidate, layout
                    return
        raise ConfigError(f"models folder {given}: neither an AUTOMATIC1111 nor a ComfyUI layout; looked for "
                          f"{', '.join(dict.fromkeys(looked))}")

    def __repr__(self) -> str:
        return f"ModelFolders({str(self.root)!r}, layout={self.layout!r})"

    def _candidates(self, kind: str) -> list[Path]:
        """Every folder where models of ``kind`` may be, existing or not, in search order."""
        _check_kind(kind)
        names = _LAYOUTS[self.layout][kind]
        out = [self.models_dir / n for n in names]
        if kind == "embedding" and self.layout == "a1111":
            webui = self.models_dir.parent if self.models_dir.name.lower() == "models" else None
            out = ([webui / "embeddings"] if webui is not None else []) + out
        return out

    def dirs(self, kind: str) -> list[Path]:
        """The existing folders of ``kind`` (any letter case), in search order."""
        out = []
        for c in self._candidates(kind):
            found = _child(c.parent, c.name)
            if found is not None and found not in out:
                out.append(found)
        return out

    def list(self, kind: str) -> list[ModelFile]:
        """Every model file of ``kind`` (recursively; diffusers folders count as checkpoints, transformers folders
        as clip_vision models), sorted per folder."""
        out: list[ModelFile] = []
        for base in self.dirs(kind):
            found: list[ModelFile] = []
            visited: set[str] = set()
            for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
                here = Path(dirpath)
                real = os.path.realpath(dirpath)
                if real in visited:  # a symlink loop
                    dirnames[:] = []
                    continue
                visited.add(real)
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                folder_marker = {"checkpoint": "model_index.json", "clip_vision": "config.json"}.get(kind)
                if folder_marker is not None:  # diffusers pipelines / transformers image_encoder folders
                    pipelines = [d for d in dirnames if (here / d / folder_marker).is_file()]
                    found.extend(ModelFile(kind, (here / d).relative_to(base).as_posix(), here / d) for d in pipelines)
                    dirnames[:] = [d for d in dirnames if d not in pipelines]
                for fn in sorted(filenames):
                    low = fn.lower()
                    if fn.startswith(".") or not low.endswith(MODEL_SUFFIXES):
                        continue
                    if kind == "checkpoint" and any(low.endswith(".vae" + s) for s in MODEL_SUFFIXES):
                        continue  # A1111 keeps VAEs named like their checkpoint next to it
                    found.append(ModelFile(kind, (here / fn).relative_to(base).as_posix(), here / fn))
            out.extend(sorted(found, key=lambda f: f.name))
        return out

    def resolve(self, kind: str, name: str) -> ModelFile:
        """The model called ``name`` (relative path with or without suffix, stem, A1111 model name or title)."""
        text, _ = split_title(str(name).replace("\\", "/"))
        files = self.list(kind)
        tiers: list[Callable[[ModelFile], Iterable[str]]] = [
            lambda f: (f.name, f.bare), lambda f: (f.stem, f.model_name),
            lambda f: (f.name.lower(), f.bare.lower(), f.stem.lower(), f.model_name.lower()),
        ]
        for i, keys in enumerate(tiers):
            want = text.lower() if i == 2 else text
            hits = list({f.path: f for f in files if want in keys(f)}.values())
            if len(hits) == 1:
                return hits[0]
            if hits:
                raise ConfigError(f"{kind} name {name!r} is ambiguous: {', '.join(f.name for f in hits)}; "
                                  "give the relative path")
        raise ConfigError(self._missing(kind, str(name), text, files))

    def _missing(self, kind: str, name: str, text: str, files: list[ModelFile]) -> str:
        dirs = self.dirs(kind)
        if not dirs:
            wanted = ", ".join(str(c) for c in self._candidates(kind))
            return f"no {kind} {name!r}: this {_LAYOUT_NAMES[self.layout]} folder has no {kind} folder ({wanted})"
        where = ", ".join(str(d) for d in dirs)
        if not files:
            return f"no {kind} {name!r}: {where} holds no model files"
        by_key: dict[str, str] = {}
        for f in files:
            for key in (f.name, f.stem):
                by_key.setdefault(key.lower(), f.name)
        close = difflib.get_close_matches(text.lower(), list(by_key), n=5, cutoff=0.5)
        names = list(dict.fromkeys(by_key[c] for c in close))
        if names:
            return f"no {kind} named {name!r} in {where}; close matches: {', '.join(names)}"
        shown = [f.name for f in files[:8]] + (["..."] if len(files) > 8 else [])
        return f"no {kind} named {name!r} in {where}; it holds: {', '.join(shown)}"


# ------------------------------------------------------------------------------------------------ the manager


@dataclass(frozen=True)
class LoadRequest:
    """What a loader gets: the file, where and in which dtype to load it, the caller's options, the manager."""

    kind: str
    path: Path
    device: torch.device
    dtype: Precision
    options: Mapping[str, Any]
    manager: ModelManager


Loader = Callable[[LoadRequest], object]


@dataclass(frozen=True)
class LoadedModel:
    """One cache entry as :meth:`ModelManager.loaded` lists it."""

    kind: str
    name: str
    path: Path
    size_bytes: int
    options: tuple[tuple[str, Any], ...] = ()


@dataclass
class _Entry:
    kind: str
    name: str
    path: Path
    options: tuple[tuple[str, Any], ...]
    value: object
    size: int
    derived: dict[Any, object] = field(default_factory=dict)


def _leaves(obj: object) -> Iterable[torch.Tensor | nn.Module]:
    """The tensors and top modules in a module, a StableDiffusionModels, an Upscaler, a tensor or a container."""
    if isinstance(obj, torch.Tensor | nn.Module):
        yield obj
    elif isinstance(obj, StableDiffusionModels):
        for m in obj.modules().values():
            yield from _leaves(m)
    elif isinstance(getattr(obj, "module", None), nn.Module):  # an Upscaler
        yield obj.module  # type: ignore[attr-defined]
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _leaves(v)


def _tensors(obj: object) -> Iterable[torch.Tensor]:
    """Every parameter and buffer held by a module, a StableDiffusionModels, a tensor or a container of those."""
    for leaf in _leaves(obj):
        if isinstance(leaf, torch.Tensor):
            yield leaf
        else:
            yield from leaf.parameters()
            yield from leaf.buffers()


def _set_packing(obj: object, mode: PackingMode) -> None:
    for leaf in _leaves(obj):
        if isinstance(leaf, nn.Module):
            set_weight_packing(leaf, mode)


def held_bytes(obj: object) -> int:
    """Bytes of tensor storage an object holds (each storage counted once; meta tensors count 0)."""
    seen: set[tuple[int, str]] = set()
    total = 0
    for t in _tensors(obj):
        if t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), str(t.device))
        if storage.data_ptr() and key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _estimate_bytes(path: Path, dtype: torch.dtype | Precision) -> int:
    """What loading a file will hold, before loading it: floating tensors at ``dtype``; file size if unknown."""
    if path.is_file() and path.suffix.lower() in SAFETENSORS_EXT:
        try:
            header, _ = read_safetensors_header(path)
        except CheckpointError:
            return 0
        width = torch.empty((), dtype=Precision.of(dtype).unet).element_size()
        total = 0
        for e in header.values():
            start, end = e["data_offsets"]
            total += math.prod(e["shape"]) * width if e["dtype"] in ("F64", "F32", "F16", "BF16") else end - start
        return total
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _freeze(value: object) -> object:
    """A hashable stand-in of an option value for the cache key."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _load_checkpoint(req: LoadRequest) -> StableDiffusionModels:
    return load_models(req.path, dtype=req.dtype, device=req.device, prediction=req.options.get("prediction"),
                       vae=req.options.get("vae"), file_hash=req.manager.hashes.model_hash)


def _load_standalone_vae(req: LoadRequest) -> nn.Module:
    return load_vae(req.path, dtype=req.dtype.vae or req.dtype.unet, device=req.device,
                    scaling_factor=req.options.get("scaling_factor"),
                    fallback=req.options.get("fallback"))


def _load_upscaler(req: LoadRequest) -> object:
    from sumie.models.upscalers.detect import load_upscaler

    up = load_upscaler(req.path, device=req.device, dtype=req.dtype.unet)
    up.name = req.manager._display_name("upscaler", req.path)
    return up


class ModelManager:
    """Loads models by name on demand and keeps them in an LRU cache bounded by a memory budget; thread-safe.

    ``folders``: where names are looked up (None: paths only); ``memory_budget_bytes``: bytes of parameters and
    buffers the cache may hold (None: unbounded); ``max_models``: at most this many entries (None: unbounded);
    ``hashes``: the hash cache (default: in memory). Least recently used entries are evicted first; a model larger
    than the budget still loads, alone, and a note goes to :attr:`warnings`. Loads are serialized: one at a time per
    manager, and a thread asking for a model another thread is loading waits for that load instead of repeating it.
    A caller that keeps a reference to an evicted model keeps its memory until it lets go.

    Loaders per kind: checkpoints -> :class:`~sumie.checkpoints.loader.StableDiffusionModels`, VAEs ->
    :class:`~sumie.models.vae.AutoencoderKL`, upscalers -> :class:`~sumie.models.upscalers.detect.Upscaler`; other
    kinds give the resolved path until a loader is registered
    (:meth:`register_loader`).
    """

    def __init__(self, folders: ModelFolders | None = None, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype | Precision = torch.float32, memory_budget_bytes: int | None = None,
                 max_models: int | None = None, hashes: FileHashes | None = None) -> None:
        if memory_budget_bytes is not None and memory_budget_bytes < 0:
            raise ConfigError(f"the memory budget must be >= 0 bytes, got {memory_budget_bytes}")
        if max_models is not None and max_models < 1:
            raise ConfigError(f"max_models must be at least 1, got {max_models}")
        self.folders = folders
        self.device = torch.device(device)
        self.dtype = Precision.of(dtype)
        self.memory_budget_bytes = memory_budget_bytes
        self.max_models = max_models
        self.hashes = hashes if hashes is not None else FileHashes()
        self.warnings: list[str] = []
        self.loads = 0  # models loaded from disk so far (cache misses)
        self.weight_packing: PackingMode = "auto"  # CPU convolutions' and linear layers' prepacked weights
        self._loaders: dict[str, Loader] = {"checkpoint": _load_checkpoint, "vae": _load_standalone_vae,
                                            "upscaler": _load_upscaler}
        self._cache: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
        self._lock = threading.Lock()  # the cache and the counters
        self._load_lock = threading.RLock()  # one load at a time (a loader may get() what it needs)

    def set_weight_packing(self, mode: PackingMode) -> None:
        """The packing mode of the CPU convolutions and linear layers (:mod:`sumie.models.packed`: "auto", the
        default, "on" or "off") in every model loaded now and later."""
        self.weight_packing = check_packing_mode(mode)
        with self._lock:
            entries = list(self._cache.values())
        for entry in entries:
            _set_packing(entry.value, mode)

    def register_loader(self, kind: str, loader: Loader | None) -> None:
        """Load ``kind`` with ``loader(LoadRequest) -> object`` from now on (None: give the resolved path)."""
        _check_kind(kind)
        with self._lock:
            if loader is None:
                self._loaders.pop(kind, None)
            else:
                self._loaders[kind] = loader

    def has_loader(self, kind: str) -> bool:
        """Whether ``kind`` has a loader (else ``get`` gives the resolved path)."""
        with self._lock:
            return kind in self._loaders

    # ---------------------------------------------------------------- names
    def resolve(self, kind: str, name: str | os.PathLike[str] | None) -> Path:
        """A model's file: an existing path as given, else a name in :attr:`folders` (close matches on a miss).

        Checkpoints: None or ``sumie-tiny`` is the embedded model. An A1111 title ``name [hash]`` whose name is
        unknown is looked up by its hash.
        """
        _check_kind(kind)
        if kind == "checkpoint" and (name is None or not Path(name).exists()):
            embedded = resolve_model(name)
            if name is None or embedded != Path(name):
                return embedded
        if name is None or not str(name).strip():
            raise ConfigError(f"no {kind} name given")
        p = Path(name).expanduser()
        if p.exists() or self.folders is None:
            if not p.exists():
                raise CheckpointError(f"{p}: no such file or folder; check the path")
            return p
        try:
            return self.folders.resolve(kind, str(name)).path
        except ConfigError:
            _, short = split_title(str(name))
            found = self.find_by_hash(kind, short) if short else None
            if found is None:
                raise
            return found

    def find_by_hash(self, kind: str, short_hash: str) -> Path | None:
        """The file of ``kind`` whose A1111 hash starts with ``short_hash`` (hashes cached; None if no match)."""
        _check_kind(kind)
        if self.folders is None:
            return None
        files = [f.path for f in self.folders.list(kind) if f.path.is_file()]
        return self.hashes.find(files, short_hash, lora=kind == "lora")

    def _display_name(self, kind: str, path: Path) -> str:
        if self.folders is not None:
            for base in self.folders.dirs(kind):
                for inner, outer in ((path, base), (path.resolve(), base.resolve())):  # symlinked files: as named
                    if inner.is_relative_to(outer):
                        return inner.relative_to(outer).as_posix()
        return str(path)

    # ---------------------------------------------------------------- loading
    def _options(self, kind: str, options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        opts = {k: v for k, v in options.items() if v is not None}
        if kind == "checkpoint" and "vae" in opts:
            opts["vae"] = str(self.resolve("vae", opts["vae"]))
        return tuple(sorted((k, _freeze(v)) for k, v in opts.items()))

    def get(self, kind: str, name: str | os.PathLike[str] | None, **options: Any) -> Any:
        """The loaded model (from the cache, else loaded now); the resolved path for kinds without a loader.

        Checkpoint options: ``vae`` (a VAE name or path replacing the built-in one), ``prediction`` ("eps"/"v");
        VAE options: ``scaling_factor``, ``fallback`` (see :func:`~sumie.checkpoints.loader.load_vae`). Each
        distinct set of options is its own entry.
        """
        path = self.resolve(kind, name)
        if kind not in self._loaders:
            return path
        return self._entry(kind, path, self._options(kind, options)).value

    def derived(self, kind: str, name: str | os.PathLike[str] | None, key: Any, build: Callable[[Any], object],
                **options: Any) -> Any:
        """``build(model)`` for a cached model, kept with its entry and dropped when the entry is evicted."""
        path = self.resolve(kind, name)
        if kind not in self._loaders:
            raise ConfigError(f"{kind} models are not loaded by the manager, so nothing can be derived from them")
        entry = self._entry(kind, path, self._options(kind, options))
        with self._lock:
            if key in entry.derived:
                return entry.derived[key]
        value = build(entry.value)
        with self._lock:
            return entry.derived.setdefault(key, value)

    def _entry(self, kind: str, path: Path, opts: tuple[tuple[str, Any], ...]) -> _Entry:
        key = (kind, str(path.resolve()), opts)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        with self._load_lock:
            with self._lock:
                if key in self._cache:  # loaded by the thread we waited for
                    self._cache.move_to_end(key)
                    return self._cache[key]
                freed = self._make_room(_estimate_bytes(path, self.dtype), keep=None)
                loader = self._loaders[kind]
            if freed:
                self._release_memory()
            request = LoadRequest(kind, path, self.device, self.dtype, dict(opts), self)
            value = loader(request)
            _set_packing(value, self.weight_packing)
            entry = _Entry(kind, self._display_name(kind, path), path, opts, value, held_bytes(value))
            with self._lock:
                self._cache[key] = entry
                self.loads += 1
                freed = self._make_room(0, keep=key)
                budget = self.memory_budget_bytes
                if budget is not None and entry.size > budget:
                    self.warnings.append(f"{entry.name} holds {entry.size / MiB:.1f} MiB, more than the memory "
                                         f"budget of {budget / MiB:.1f} MiB; it is loaded alone")
            if freed:
                self._release_memory()
            return entry

    def _make_room(self, needed: int, keep: tuple[Any, ...] | None) -> int:
        """Evict least recently used entries (never ``keep``) until ``needed`` more bytes fit (caller holds lock)."""
        evicted = 0

        def over() -> bool:
            extra = 1 if keep is None else 0
            if self.max_models is not None and len(self._cache) + extra > self.max_models:
                return True
            budget = self.memory_budget_bytes
            return budget is not None and sum(e.size for e in self._cache.values()) + needed > budget

        while over():
            victim = next((k for k in self._cache if k != keep), None)
            if victim is None:
                break
            del self._cache[victim]
            evicted += 1
        return evicted

    def _release_memory(self) -> None:
        """Let evicted models go now (reference cycles) and hand freed heap pages and cached CUDA blocks back."""
        gc.collect()
        trim_heap()
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- state
    def unload(self, name: str | os.PathLike[str], kind: str | None = None) -> int:
        """Drop every entry of that model (name, stem, or path; any options); returns how many were dropped."""
        text = os.fspath(name)
        try:
            target = str(Path(text).expanduser().resolve()) if Path(text).expanduser().exists() else None
        except OSError:
            target = None
        with self._lock:
            keys = [k for k, e in self._cache.items() if (kind is None or e.kind == kind) and (
                text in (e.name, str(e.path), e.path.name, e.path.stem, Path(e.name).stem)
                or target == str(e.path.resolve()))]
            for k in keys:
                del self._cache[k]
        if keys:
            self._release_memory()
        return len(keys)

    def unload_all(self) -> int:
        """Drop every entry; returns how many there were."""
        with self._lock:
            n = len(self._cache)
            self._cache.clear()
        if n:
            self._release_memory()
        return n

    def loaded(self) -> list[LoadedModel]:
        """The cache entries, least recently used first."""
        with self._lock:
            return [LoadedModel(e.kind, e.name, e.path, e.size, e.options) for e in self._cache.values()]

    def total_bytes(self) -> int:
        """Bytes held by all cache entries."""
        with self._lock:
            return sum(e.size for e in self._cache.values())
