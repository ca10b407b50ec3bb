"""Reading model files safely: safetensors (validated header), pickles only through torch's weights-only loader."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from sumie.errors import CheckpointError, SumieError

SAFETENSORS_EXT = {".safetensors", ".sft"}
PICKLE_EXT = {".ckpt", ".pt", ".pth", ".bin"}

_ST_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


class _Opaque:
    """Inert stand-in for training-state objects found in old .ckpt files: it stores its state, runs nothing."""

    def __setstate__(self, state: object) -> None:
        self._state = state


def _standin(qualname: str) -> type:
    module, name = qualname.rsplit(".", 1)
    return type(name, (_Opaque,), {"__module__": module})


def _allowed_pickle_globals() -> list[object]:
    """What an SD .ckpt may reference besides tensors: lightning callback records and numpy scalars."""
    from numpy._core import multiarray

    allowed: list[object] = [_standin("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")]
    for obj in (multiarray.scalar, np.dtype):
        allowed.append(obj)
        allowed.append((obj, f"numpy.core.multiarray.{obj.__name__}"))
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        if isinstance(cls, type) and name.endswith("DType"):
            allowed.append(cls)
    return allowed


def _names_of(allowed: list[object]) -> set[str]:
    names = set()
    for obj in allowed:
        if isinstance(obj, tuple):
            names.add(obj[1])
        else:
            names.add(f"{obj.__module__}.{obj.__qualname__}")  # type: ignore[union-attr]
    return names


def read_safetensors_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data: (tensor entries, metadata)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes); the file is truncated")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header claims {n} bytes, file has {size}); "
                    "download or copy it again"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(
            f"{path}: corrupt safetensors header (not valid JSON); the file is damaged or not a safetensors file"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for key, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            width = _ST_DTYPES[entry["dtype"]]
            count = int(np.prod(entry["shape"], dtype=np.int64))
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {key!r}") from None
        if not 0 <= start <= end <= data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {key!r} ends at byte {end} of {data_size}; "
                "download or copy it again"
            )
        if end - start != count * width:
            raise CheckpointError(f"{path}: corrupt safetensors file: tensor {key!r} has the wrong byte length")
    return header, {str(k): str(v) for k, v in metadata.items()}


def _load_safetensors(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    header, _ = read_safetensors_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in (keys if keys is not None else header)}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: cannot read safetensors data: {e}") from None


def _load_pickle(path: Path) -> dict[str, object]:
    """torch.load(weights_only=True) with a short allow-list; anything else is refused before loading."""
    allowed = _allowed_pickle_globals()
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    refused = sorted(needed - _names_of(allowed))
    if refused:
        raise CheckpointError(
            f"{path}: refused: this pickle needs code that Sumie will not run ({', '.join(refused[:5])}); "
            "only plain tensors load from .ckpt/.pt files; ask for a .safetensors file"
        )
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{path}: refused or unreadable pickle ({type(e).__name__}): {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a model file, keys as stored (a .ckpt's nested ``state_dict`` is unwrapped; a pickle whose
    tensors all sit one level down in named groups gives ``group.key``)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a folder, not a model file")
    ext = p.suffix.lower()
    if ext in SAFETENSORS_EXT:
        return _load_safetensors(p)
    if ext in PICKLE_EXT:
        obj = _load_pickle(p)
        inner = obj.get("state_dict")
        if isinstance(inner, dict):
            obj = inner
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if not tensors:  # tensors grouped one level down (IP-Adapter .bin: {"image_proj": {...}, ...}): "group.key"
            tensors = {f"{g}.{k}": v for g, d in obj.items() if isinstance(d, dict)
                       for k, v in d.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise CheckpointError(f"{p}: contains no tensors")
        return tensors
    raise CheckpointError(
        f"{p}: unknown model file type {ext or '(none)'!r}; use .safetensors (or .ckpt/.pt/.pth/.bin pickles)"
    )


def tensor_shapes(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Meta tensors (shape and dtype, no data) for every tensor of a file, plus safetensors metadata."""
    p = Path(path)
    if p.suffix.lower() in SAFETENSORS_EXT and p.is_file():
        header, metadata = read_safetensors_header(p)
        dtypes = {
            "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
            "BOOL": torch.bool,
        }
        return {
            k: torch.empty(e["shape"], dtype=dtypes.get(e["dtype"], torch.float32), device="meta")
            for k, e in header.items()
        }, metadata
    sd = load_state_dict(p)
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()}, {}


def file_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} for other formats)."""
    p = Path(path)
    return read_safetensors_header(p)[1] if p.suffix.lower() in SAFETENSORS_EXT else {}


def file_sha256(path: str | os.PathLike[str], start: int = 0) -> str:
    """SHA-256 (64 hex digits) of a file's bytes from ``start`` to the end, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_hash(path: str | os.PathLike[str]) -> str:
    """A1111's model hash: the first 10 hex digits of the file's SHA-256 (uncached; see :mod:`.hashes`)."""
    return file_sha256(path)[:10]


def legacy_model_hash(path: str | os.PathLike[str]) -> str:
    """A1111's old 8-hex hash: SHA-256 of the 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file through a temporary file and a rename, so no half-written file remains.

    Missing folders of ``path`` are created (as for images and diffusers' ``save_pretrained``) and removed again
    when the write fails; any failure is a :class:`SumieError` naming the path, with nothing left behind.
    """
    from safetensors.torch import save_file

    p = Path(path)
    if p.is_dir():
        raise SumieError(f"{p} is a folder; give a file name ending in .safetensors")
    created = [d for d in (p.parent, *p.parent.parents) if not d.exists()]  # deepest first
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        # the temporary name is ours (O_EXCL) and its mode is what the umask gives a new file
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = tmp.stat().st_mode & 0o777
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)  # safetensors writes 0600 files; follow the user's umask like any tool
        os.replace(tmp, p)
    except (OSError, SafetensorError) as e:
        what = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split(" at path ")[0]
        raise SumieError(f"cannot write {p}: {what}; check that the folder is writable and the disk has space") from e
    finally:
        if tmp.exists():
            tmp.unlink()
        if not p.exists():
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()
