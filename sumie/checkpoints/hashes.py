"""Model file hashes as AUTOMATIC1111 writes them into infotexts, computed once and cached on disk.

* ``Model hash`` (checkpoints): the first 10 hex digits of the file's SHA-256 (A1111 ``CheckpointInfo.shorthash``);
  before A1111 1.0 it was an 8-hex hash of 64 KiB at offset 1 MiB (:func:`sumie.checkpoints.io.legacy_model_hash`).
* ``Lora hashes`` (A1111 1.10 ``network.NetworkOnDisk``): ``name: shorthash`` with the first 12 hex digits of the
  kohya "addnet" hash for a .safetensors file (SHA-256 of the tensor data after the safetensors header, so a metadata
  edit keeps it), of the plain SHA-256 for other files; the ``sshs_model_hash`` metadata that kohya's trainer writes
  is taken when present, as A1111 does.

:class:`FileHashes` keeps every hash it computed in a JSON file keyed by the file's resolved path, size and
``mtime_ns`` (A1111's ``cache.json`` keys by title and mtime): a changed file is hashed again, an unchanged one never.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from sumie.checkpoints.io import SAFETENSORS_EXT, file_metadata, file_sha256, legacy_model_hash
from sumie.errors import CheckpointError

Algo = Literal["sha256", "addnet"]
_VERSION = 1


def _safetensors_data_offset(path: Path) -> int:
    """Where a safetensors file's tensor data begins: 8 + the header length."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    return 8 + struct.unpack("<Q", head)[0]


def compute_hash(path: str | os.PathLike[str], algo: Algo = "sha256") -> str:
    """Hash a file without any cache: ``sha256`` of the whole file, or ``addnet`` (data after the header)."""
    p = Path(path)
    if algo == "addnet":
        if p.suffix.lower() not in SAFETENSORS_EXT:
            raise CheckpointError(f"{p}: the addnet hash is defined for .safetensors files only")
        return file_sha256(p, _safetensors_data_offset(p))
    return file_sha256(p)


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/sumie/hashes.json`` (``~/.cache/sumie/hashes.json`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sumie" / "hashes.json"


class FileHashes:
    """SHA-256 / addnet hashes of model files, each computed once per file version; thread-safe.

    ``cache_path``: the JSON file that keeps them between runs (written through a temporary file and a rename, so
    a crash never leaves it half-written); None keeps them in memory only. A damaged cache file is reported with a
    warning and rebuilt. Entries are keyed by resolved path and stamped with size and ``mtime_ns``: a file that
    changed is hashed again. Two processes writing the same cache at once lose nothing but each other's new entries.
    """

    def __init__(self, cache_path: str | os.PathLike[str] | None = None) -> None:
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, object]] | None = None

    # ---------------------------------------------------------------- the cache file
    def _load(self) -> dict[str, dict[str, object]]:
        """The entries, read from the cache file on first use (caller holds the lock)."""
        if self._entries is not None:
            return self._entries
        self._entries = {}
        if self.cache_path is None or not self.cache_path.exists():
            return self._entries
        try:
            data = json.loads(self.cache_path.read_text(encoding="utf-8"))
            files = data["files"] if isinstance(data, dict) and data.get("version") == _VERSION else None
            if not isinstance(files, dict):
                raise ValueError("not a Sumie hash cache")
            self._entries = {str(k): v for k, v in files.items() if isinstance(v, dict)}
        except (OSError, UnicodeDecodeError, ValueError, KeyError) as e:
            warnings.warn(f"hash cache {self.cache_path} is unreadable ({e}); hashes are computed again and the "
                          "file rewritten", stacklevel=3)
        return self._entries

    def _save(self) -> None:
        """Write every entry atomically (caller holds the lock)."""
        if self.cache_path is None or self._entries is None:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_name(f".{self.cache_path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            tmp.write_text(json.dumps({"version": _VERSION, "files": self._entries}, indent=1, sort_keys=True),
                           encoding="utf-8")
            os.replace(tmp, self.cache_path)
        except OSError as e:
            warnings.warn(f"cannot write the hash cache {self.cache_path} ({e.strerror}); hashes are kept for this "
                          "run only", stacklevel=3)
        finally:
            tmp.unlink(missing_ok=True)

    # ---------------------------------------------------------------- lookups
    @staticmethod
    def _stamp(path: Path) -> tuple[str, int, int]:
        try:
            st = path.stat()
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read the file: {e.strerror}") from None
        return str(path.resolve()), st.st_size, st.st_mtime_ns

    def cached(self, path: str | os.PathLike[str], algo: Algo = "sha256") -> str | None:
        """The cached hash of the file as it is now, or None (never reads the file's data)."""
        key, size, mtime = self._stamp(Path(path))
        with self._lock:
            entry = self._load().get(key)
            if entry is None or entry.get("size") != size or entry.get("mtime_ns") != mtime:
                return None
            value = entry.get(algo)
            return value if isinstance(value, str) else None

    def hash(self, path: str | os.PathLike[str], algo: Algo = "sha256") -> str:
        """The file's full hex hash: from the cache when the file is unchanged, else computed and cached."""
        p = Path(path)
        found = self.cached(p, algo)
        if found is not None:
            return found
        key, size, mtime = self._stamp(p)
        try:
            value = compute_hash(p, algo)
        except OSError as e:
            raise CheckpointError(f"{p}: cannot read the file: {e.strerror}") from None
        with self._lock:
            entries = self._load()
            entry = entries.get(key)
            if entry is None or entry.get("size") != size or entry.get("mtime_ns") != mtime:
                entry = {"size": size, "mtime_ns": mtime}
            entry[algo] = value
            entries[key] = entry
            self._save()
        return value

    def sha256(self, path: str | os.PathLike[str]) -> str:
        """The file's SHA-256 (64 hex digits)."""
        return self.hash(path, "sha256")

    def model_hash(self, path: str | os.PathLike[str]) -> str:
        """A1111's ``Model hash``: the first 10 hex digits of the SHA-256."""
        return self.sha256(path)[:10]

    def _declared(self, path: Path) -> str | None:
        """The ``sshs_model_hash`` a LoRA .safetensors file declares (64 hex digits), else None."""
        if path.suffix.lower() not in SAFETENSORS_EXT:
            return None
        declared = file_metadata(path).get("sshs_model_hash", "").strip().lower()
        return declared if len(declared) == 64 and all(c in "0123456789abcdef" for c in declared) else None

    def lora_hash(self, path: str | os.PathLike[str]) -> str:
        """A1111 1.10's LoRA hash: ``sshs_model_hash`` metadata, else addnet (.safetensors) or SHA-256 (others)."""
        p = Path(path)
        declared = self._declared(p)
        if declared is not None:
            return declared
        return self.hash(p, "addnet") if p.suffix.lower() in SAFETENSORS_EXT else self.sha256(p)

    def lora_shorthash(self, path: str | os.PathLike[str]) -> str:
        """The 12 hex digits A1111 writes in ``Lora hashes``."""
        return self.lora_hash(path)[:12]

    def find(self, paths: Iterable[str | os.PathLike[str]], short_hash: str, *, lora: bool = False) -> Path | None:
        """The first file whose hash starts with ``short_hash`` (A1111's 10-hex model / 12-hex LoRA hash).

        Cached (or, for LoRA, declared) hashes are tried first; the other files are hashed (and cached) only if none
        of those matches, and the search stops at the first match. An 8-hex checkpoint hash that matches no SHA-256
        is also tried as the pre-1.0 legacy hash (64 KiB read per file). Unreadable files are passed over.
        """
        want = short_hash.strip().lower()
        if not want or any(c not in "0123456789abcdef" for c in want):
            return None
        files = [Path(p) for p in paths if Path(p).is_file()]

        def algo(p: Path) -> Algo:
            return "addnet" if lora and p.suffix.lower() in SAFETENSORS_EXT else "sha256"

        def known(p: Path) -> str | None:
            return (self._declared(p) if lora else None) or self.cached(p, algo(p))

        def legacy(p: Path) -> str | None:
            return legacy_model_hash(p) if p.stat().st_size >= 0x110000 else None

        def computed(p: Path) -> str | None:
            return None if known(p) is not None else self.lora_hash(p) if lora else self.sha256(p)

        passes = [known] + ([legacy] if not lora and len(want) == 8 else []) + [computed]
        for value_of in passes:
            for p in files:
                try:
                    value = value_of(p)
                except (CheckpointError, OSError):
                    continue
                if value is not None and value.startswith(want):
                    return p
        return None
