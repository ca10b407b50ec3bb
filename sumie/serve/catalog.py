"""The server's model folders: names resolve only to files inside them (no paths, no traversal, no symlink escapes).

:class:`ServeFolders` is a :class:`~sumie.checkpoints.manager.ModelFolders` over the folders the server was given:
an AUTOMATIC1111 / ComfyUI folder's kind folders followed by the flat ``--ckpt-dir`` / ``--lora-dir`` / ... ones.
Listing and name matching (relative name, stem, A1111 model name or title, close matches on a miss) are
ModelFolders'; what is added is that a file whose real path is outside its folder (a symlink pointing out) is not
listed, and that a name shaped like a path that leaves the folder is refused before any lookup.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from sumie.checkpoints.embedded import DEFAULT_MODEL, embedded_path
from sumie.checkpoints.hashes import FileHashes
from sumie.checkpoints.manager import KINDS, ModelFile, ModelFolders, split_title
from sumie.errors import ConfigError
from sumie.serve.config import ServeConfig
from sumie.serve.errors import ApiError

__all__ = ["Catalog", "NameError_", "ServeFolders", "check_name"]


class NameError_(ConfigError):  # noqa: N801 - not the builtin NameError
    """A model name that is a path leaving its folder (answered 400)."""


def check_name(kind: str, name: str) -> str:
    """``name`` unchanged if it is a plain relative name; NameError_ for absolute paths and ``..`` parts."""
    text = str(name).replace("\\", "/")
    parts = PurePosixPath(text).parts
    if text.startswith("/") or (len(text) > 1 and text[1] == ":") or ".." in parts or "\x00" in text:
        raise NameError_(f"{kind} name {name!r} is a path; give the name of a file inside the configured {kind} "
                         "folders (see the list endpoints)")
    return name


class ServeFolders(ModelFolders):
    """The folders of each kind a server may read models from, in search order (models folder first)."""

    def __init__(self, config: ServeConfig) -> None:  # noqa: D107 - ModelFolders' layout detection is replaced
        base = ModelFolders(config.models_dir) if config.models_dir is not None else None
        self.root = base.root if base is not None else Path(".")
        self.models_dir = base.models_dir if base is not None else Path(".")
        self.layout = base.layout if base is not None else "a1111"
        extra = {"checkpoint": config.ckpt_dirs, "lora": config.lora_dirs, "embedding": config.embeddings_dirs,
                 "vae": config.vae_dirs, "controlnet": config.controlnet_dirs, "upscaler": config.upscaler_dirs,
                 "clip_vision": config.clip_vision_dirs, "ip_adapter": config.ipadapter_dirs}
        self._dirs: dict[str, list[Path]] = {}
        for kind in KINDS:
            found = base.dirs(kind) if base is not None else []
            for d in extra.get(kind, ()):
                p = Path(d).expanduser()
                if p not in found:
                    found.append(p)
            self._dirs[kind] = found

    def __repr__(self) -> str:
        return f"ServeFolders({ {k: [str(d) for d in v] for k, v in self._dirs.items() if v} })"

    def _candidates(self, kind: str) -> list[Path]:
        return list(self._dirs[kind])

    def dirs(self, kind: str) -> list[Path]:
        """The configured folders of ``kind`` that exist."""
        if kind not in self._dirs:
            raise ConfigError(f"unknown model kind {kind!r}; use one of: {', '.join(KINDS)}")
        return [d for d in self._dirs[kind] if d.is_dir()]

    def list(self, kind: str) -> list[ModelFile]:
        """ModelFolders' listing without files whose real path leaves every folder of the kind."""
        roots = [os.path.realpath(d) for d in self.dirs(kind)]
        return [f for f in super().list(kind)
                if any(os.path.commonpath([os.path.realpath(f.path), r]) == r for r in roots)]

    def resolve(self, kind: str, name: str) -> ModelFile:
        """The model file called ``name`` in the folders (never a path outside them)."""
        return super().resolve(kind, check_name(kind, name))


class Catalog:
    """Names the API shows and takes -> files: checkpoints (the embedded sumie-tiny when the folders hold none),
    VAEs, LoRAs, embeddings; errors are :class:`ApiError` s naming the request field."""

    def __init__(self, folders: ServeFolders, hashes: FileHashes) -> None:
        self.folders, self.hashes = folders, hashes

    def checkpoints(self) -> list[ModelFile]:
        """The checkpoints listed by ``/sd-models`` (the embedded model when no folder holds one)."""
        found = self.folders.list("checkpoint")
        if found:
            return found
        path = embedded_path()
        return [ModelFile("checkpoint", path.name, path)]

    def title(self, f: ModelFile) -> str:
        """A1111's title: ``name [sha256 first 10]`` once the hash is known (after a load), else the name."""
        short = self.short_hash(f)
        return f"{f.name} [{short}]" if short else f.name

    def short_hash(self, f: ModelFile) -> str | None:
        """The first 10 hex digits of the file's sha256 if known (the embedded model's is computed: it is small)."""
        if not f.path.is_file():
            return None
        full = self.hashes.cached(f.path) or (self.hashes.sha256(f.path) if f.path == embedded_path() else None)
        return full[:10] if full else None

    def checkpoint(self, name: str | None, field: str) -> ModelFile:
        """The checkpoint called ``name`` (name, stem, model name or title); the first one for None / ""."""
        listed = self.checkpoints()
        if name is None or not str(name).strip():
            return listed[0]
        if self.folders.list("checkpoint"):
            return self._resolve("checkpoint", name, field)
        text, _ = split_title(str(name))
        f = listed[0]
        if text in (f.name, f.stem, f.model_name, DEFAULT_MODEL) or name == self.title(f):
            return f
        self._guard("checkpoint", name, field)
        raise ApiError(422, f"{field}: no checkpoint named {name!r}; this server has: {self.title(f)}", field=field)

    def vae(self, name: str | None, field: str) -> Path | None:
        """None for "Automatic" / "None" / empty (the checkpoint's own VAE), else the VAE file."""
        if name is None or str(name).strip() in ("", "Automatic", "None"):
            return None
        return self._resolve("vae", name, field).path

    def model(self, kind: str, name: str, field: str) -> Path:
        """The file of a ``kind`` model called ``name`` in the configured folders (4xx naming ``field``)."""
        return self._resolve(kind, name, field).path

    def _guard(self, kind: str, name: str, field: str) -> None:
        try:
            check_name(kind, name)
        except NameError_ as e:
            raise ApiError(400, f"{field}: {e}", field=field) from None

    def _resolve(self, kind: str, name: str, field: str) -> ModelFile:
        self._guard(kind, name, field)
        try:
            return self.folders.resolve(kind, name)
        except ConfigError as e:
            raise ApiError(422, f"{field}: {e}", field=field) from None
