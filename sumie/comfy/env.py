"""Where a ComfyUI graph runs: its output / input / temp folders, the model manager, and file-name safety.

ComfyUI's ``folder_paths``: files are only read from and written to the three folders (a ``subfolder`` or file name
that leads outside is refused), and an "annotated" name ``file.png [output]`` picks the folder by its suffix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sumie.checkpoints.manager import ModelManager
from sumie.errors import ConfigError

FolderType = Literal["output", "input", "temp"]
FOLDER_TYPES: tuple[FolderType, ...] = ("output", "input", "temp")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ComfyFolders:
    """The output, input and temp folders (created on first use)."""

    output: Path
    input: Path
    temp: Path

    @classmethod
    def under(cls, root: str | os.PathLike[str]) -> ComfyFolders:
        """``root/output``, ``root/input`` and ``root/temp`` (ComfyUI's layout)."""
        base = Path(root)
        return cls(base / "output", base / "input", base / "temp")

    def folder(self, kind: str) -> Path:
        """The folder of a type (``output``, ``input`` or ``temp``), absolute."""
        if kind not in FOLDER_TYPES:
            raise ConfigError(f"unknown folder type {kind!r}; use output, input or temp")
        return Path(os.path.abspath(getattr(self, kind)))

    def resolve(self, kind: str, filename: str, subfolder: str = "") -> Path:
        """``folder/subfolder/filename``, refused when it leads outside the folder (``..``, absolute names)."""
        base = self.folder(kind)
        if not filename or filename.startswith("/") or "\0" in filename or "\0" in subfolder:
            raise ConfigError(f"invalid file name {filename!r}")
        path = Path(os.path.abspath(base / subfolder / filename))
        if os.path.commonpath((str(base), str(path))) != str(base) or path == base:
            raise ConfigError(f"{subfolder}/{filename}: outside the {kind} folder; give a name inside it")
        return path

    def annotated(self, name: str, default: FolderType = "input") -> Path:
        """A LoadImage-style name: ``sub/file.png`` in ``default``, or ``file.png [output]`` / ``[input]`` /
        ``[temp]`` in that folder (ComfyUI ``get_annotated_filepath``)."""
        kind: str = default
        for k in FOLDER_TYPES:
            if name.endswith(f" [{k}]"):
                name, kind = name[: -len(k) - 3], k
                break
        return self.resolve(kind, name)

    def input_files(self) -> list[str]:
        """Files directly in the input folder, sorted (LoadImage's option list)."""
        base = self.folder("input")
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_file())


@dataclass
class ComfyEnvironment:
    """What nodes see of the world: the folders and the model manager (checkpoints, VAEs, LoRAs by name)."""

    folders: ComfyFolders
    manager: ModelManager

    def model_names(self, kind: str) -> list[str]:
        """Names of a model kind in the manager's folders (``/``-separated relative paths), sorted."""
        folders = self.manager.folders
        if folders is None:
            return []
        return sorted(f.name for f in folders.list(kind))

    def has_model_folder(self, kind: str) -> bool:
        """Whether the manager has a folder for this kind."""
        return self.manager.folders is not None and bool(self.manager.folders.dirs(kind))
