"""LoRA names -> files, as AUTOMATIC1111 1.10 finds them, and a cache of parsed files.

:class:`LoraLibrary` lists the LoRA folders (``--lora-dir`` folders, then an A1111 ``models/Lora`` /
``models/LyCORIS`` or ComfyUI ``models/loras`` folder) recursively for ``.safetensors``, ``.pt`` and ``.ckpt``
files. A file is known by its stem and by its alias, the ``ss_output_name`` its trainer wrote into the metadata
(only the safetensors header is read, cached by the file's size and mtime). A1111's rules (``networks.py``
``list_available_networks`` / ``load_networks``):

- folders are walked in order, each in natural sort order of folder and file names; when two files share a stem or
  an alias, the later one wins;
- an alias that an earlier file already uses as stem or alias is "forbidden": that name then only finds a file by
  its stem (``none`` is always forbidden);
- names are case-sensitive.

Sumie also takes a path to a file, says which file a shared name picked (a note the caller passes on as a
warning), and answers a missing name with a :class:`~sumie.errors.ConfigError` listing close matches.
"""

from __future__ import annotations

import difflib
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sumie.checkpoints.hashes import FileHashes
from sumie.checkpoints.io import file_metadata
from sumie.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from sumie.adapters.lora.file import LoraFile

__all__ = ["LORA_SUFFIXES", "LoraEntry", "LoraLibrary", "Resolved", "file_stamp", "natural_key"]

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")  # A1111's allowed_extensions for networks
_ALWAYS_FORBIDDEN = ("none",)
_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str) -> list[object]:
    """A1111's ``natural_sort_key``: digits compare as numbers, the rest case-insensitively."""
    return [int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(text)]


def file_stamp(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file: what decides that a cached reading is still valid."""
    try:
        st = path.stat()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the LoRA file: {e.strerror}") from None
    return st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class LoraEntry:
    """One LoRA file: ``name`` is its stem, ``alias`` its ``ss_output_name`` (the stem when it has none)."""

    name: str
    alias: str
    path: Path
    folder: Path | None = None  # the LoRA folder it was found in (None: given as a path)


@dataclass(frozen=True)
class Resolved:
    """A LoRA found by name: the entry, and a note when the name fit more than one file."""

    entry: LoraEntry
    note: str | None = None
    by_path: bool = False  # given as a path to the file, not a name


class LoraLibrary:
    """LoRA files by name over folders (see the module docstring), with a cache of parsed files; thread-safe.

    ``dirs``: the folders, searched in this order (missing ones are skipped); ``hashes``: the hash cache for
    ``Lora hashes``; ``max_cached``: parsed files kept in memory (least recently used dropped first).
    """

    def __init__(self, dirs: Iterable[str | os.PathLike[str]] = (), *, hashes: FileHashes | None = None,
                 max_cached: int = 8) -> None:
        self.dirs: list[Path] = []
        for d in dirs:
            p = Path(d).expanduser()
            if p not in self.dirs:
                self.dirs.append(p)
        self.hashes = hashes if hashes is not None else FileHashes()
        self.max_cached = max(int(max_cached), 0)
        self.reads = 0  # LoRA files parsed so far (cache misses)
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[tuple[int, int], str | None]] = {}  # path -> (stamp, ss_output_name)
        self._entries: list[LoraEntry] | None = None
        self._files: OrderedDict[str, tuple[tuple[int, int], LoraFile]] = OrderedDict()

    def __repr__(self) -> str:
        return f"LoraLibrary({[str(d) for d in self.dirs]!r})"

    # ---------------------------------------------------------------- listing
    def _alias(self, path: Path) -> str | None:
        """The ``ss_output_name`` of a .safetensors file (header only; cached by size and mtime)."""
        if path.suffix.lower() != ".safetensors":
            return None
        try:
            stamp = file_stamp(path)
        except CheckpointError:
            return None
        key = str(path)
        with self._lock:
            hit = self._meta.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        try:
            alias = file_metadata(path).get("ss_output_name") or None
        except (CheckpointError, OSError, ValueError):
            alias = None  # an unreadable header: known by its stem; reading it later says what is wrong
        with self._lock:
            self._meta[key] = (stamp, alias)
        return alias

    def _walk(self, folder: Path) -> list[Path]:
        """LoRA files under ``folder`` in A1111's order (``walk_files``: folders and files in natural order)."""
        if not folder.is_dir():
            return []
        found: list[tuple[str, list[str]]] = []
        seen: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:  # a symlink loop
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found.append((dirpath, filenames))
        out: list[Path] = []
        for dirpath, filenames in sorted(found, key=lambda x: natural_key(x[0])):
            for fn in sorted(filenames, key=natural_key):
                if not fn.startswith(".") and fn.lower().endswith(LORA_SUFFIXES) and os.path.isfile(
                        os.path.join(dirpath, fn)):
                    out.append(Path(dirpath) / fn)
        return out

    def entries(self, refresh: bool = False) -> list[LoraEntry]:
        """Every LoRA file of the folders, in search order (listed once, again with ``refresh``)."""
        with self._lock:
            cached = self._entries
        if cached is not None and not refresh:
            return list(cached)
        out = [LoraEntry(p.stem, self._alias(p) or p.stem, p, folder) for folder in self.dirs
               for p in self._walk(folder)]
        with self._lock:
            self._entries = out
        return list(out)

    # ---------------------------------------------------------------- names
    def _lookup(self, name: str, entries: Sequence[LoraEntry]) -> tuple[LoraEntry | None, list[LoraEntry]]:
        """A1111's lookup: (the winning entry or None, every entry the name fits)."""
        by_name: dict[str, LoraEntry] = {}
        by_alias: dict[str, LoraEntry] = {}
        forbidden = set(_ALWAYS_FORBIDDEN)
        for e in entries:
            by_name[e.name] = e
            if e.alias in by_alias:
                forbidden.add(e.alias.lower())
            by_alias[e.name] = e
            by_alias[e.alias] = e
        found = by_name.get(name) if name.lower() in forbidden else by_alias.get(name)
        fits = [e for e in entries if e.name == name or (e.alias == name and name.lower() not in forbidden)]
        return found, fits

    def resolve(self, name: str | os.PathLike[str]) -> Resolved:
        """The LoRA called ``name`` (stem, alias, or a path to a file); ConfigError with close matches if none."""
        text = os.fspath(name).strip()
        if not text:
            raise ConfigError("a LoRA needs a name: <lora:NAME:WEIGHT>")
        p = Path(text).expanduser()
        if p.is_file():
            return Resolved(self._entry_for_path(p), by_path=True)
        looks_like_path = p.suffix.lower() in LORA_SUFFIXES or "/" in text or os.sep in text
        entries = self.entries()
        found, fits = self._lookup(text, entries)
        if found is None or not found.path.is_file():  # A1111 lists the folders again when a name is unknown
            entries = self.entries(refresh=True)
            found, fits = self._lookup(text, entries)
        if found is None:
            if looks_like_path:
                raise ConfigError(f"LoRA {text!r}: no such file; check the path")
            raise ConfigError(self._missing(text, entries))
        note = None
        if len(fits) > 1:
            others = ", ".join(str(e.path) for e in fits if e is not found)
            note = (f"LoRA name {text!r} fits {len(fits)} files; using {found.path} (the last in folder order, "
                    f"as A1111 does), not {others}; rename one or give the path")
        return Resolved(found, note)

    def _entry_for_path(self, path: Path) -> LoraEntry:
        """The entry of a file given by path (its folder entry when it lies in a LoRA folder)."""
        real = path.resolve()
        for e in self.entries():
            if e.path.resolve() == real:
                return e
        return LoraEntry(path.stem, self._alias(path) or path.stem, path, None)

    def _missing(self, name: str, entries: Sequence[LoraEntry]) -> str:
        if not self.dirs:
            return (f"no LoRA named {name!r}: no LoRA folder is set; pass --lora-dir DIR or --models-dir (Python: "
                    "lora_dirs=[...]), or give the path to the file")
        where = ", ".join(str(d) for d in self.dirs)
        if not entries:
            return f"no LoRA named {name!r}: {where} holds no .safetensors/.pt/.ckpt files"
        keys: dict[str, str] = {}
        for e in entries:
            for k in (e.name, e.alias):
                keys.setdefault(k.lower(), k)
        close = difflib.get_close_matches(name.lower(), list(keys), n=5, cutoff=0.5)
        if close:
            return f"no LoRA named {name!r} in {where}; close matches: {', '.join(keys[c] for c in close)}"
        shown = [e.name for e in entries[:8]] + (["..."] if len(entries) > 8 else [])
        return f"no LoRA named {name!r} in {where}; it holds: {', '.join(shown)}"

    # ---------------------------------------------------------------- files
    def read(self, path: str | os.PathLike[str]) -> LoraFile:
        """The parsed LoRA file (cached by path, size and mtime: an edited file is read again)."""
        from sumie.adapters.lora.file import read_lora

        p = Path(path)
        stamp = file_stamp(p)
        key = str(p.resolve())
        with self._lock:
            hit = self._files.get(key)
            if hit is not None and hit[0] == stamp:
                self._files.move_to_end(key)
                return hit[1]
        lora = read_lora(p)
        with self._lock:
            self.reads += 1
            if self.max_cached:
                self._files[key] = (stamp, lora)
                self._files.move_to_end(key)
                while len(self._files) > self.max_cached:
                    self._files.popitem(last=False)
        return lora

    def shorthash(self, path: str | os.PathLike[str]) -> str:
        """The 12-hex hash A1111 writes in ``Lora hashes`` (cached in :attr:`hashes`)."""
        return self.hashes.lora_shorthash(path)
