"""Textual-inversion embeddings (Gal et al. 2022) as AUTOMATIC1111 loads and matches them.

A file's stem is the word that calls it in a prompt (``EasyNegative.safetensors`` -> ``EasyNegative``); it is
matched as the token sequence the CLIP tokenizer makes of that name, so matching follows the tokenizer's
lowercasing. Accepted layouts, as A1111's ``create_embedding_from_data``:

- A1111 ``.pt``: ``{"string_to_param": {"*": Tensor[n, D]}, "name": ..., "step": ...}`` (read with torch's
  weights-only unpickler and Sumie's allow-list, never plain ``torch.load``);
- SDXL: ``{"clip_l": Tensor[n, 768], "clip_g": Tensor[n, 1280]}`` (usually ``.safetensors``);
- one tensor under any key: ``{"emb_params": Tensor[n, D]}`` or diffusers' ``{"<token>": Tensor[D]}``.

An embedding fits a model when its total width equals the sum of the model's text-encoder widths (A1111's
``expected_shape``); a model with several encoders needs a vector set per encoder, under the encoder's name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from sumie.checkpoints.io import PICKLE_EXT, SAFETENSORS_EXT, _load_pickle, load_state_dict
from sumie.configs import ModelConfig, TextEncoderConfig
from sumie.errors import CheckpointError, ConfigError
from sumie.prompts.tokenizer import CLIPTokenizer

__all__ = ["Embedding", "EmbeddingLibrary", "embedding_from_data", "load_embedding_file"]

SINGLE = "*"  # key of the one vector set of a single-tensor embedding
MAX_VECTORS = 75  # one prompt chunk: A1111 cannot place a longer embedding either
EMBEDDING_EXT = {".pt", ".bin", ".safetensors"}  # A1111 also reads images with embedded data; Sumie does not


@dataclass(frozen=True, eq=False)
class Embedding:
    """Named learned token vectors: ``vectors[encoder name or "*"]`` is a float32 tensor [n, width]."""

    name: str
    vectors: Mapping[str, Tensor]
    path: str | None = None
    step: int | None = None

    @property
    def num_vectors(self) -> int:
        """How many prompt tokens the embedding takes (A1111 ``vectors``: the clip_g count for SDXL files)."""
        if "clip_g" in self.vectors:
            return int(self.vectors["clip_g"].shape[0])
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def width(self) -> int:
        """Total vector width (A1111 ``shape``): D, or clip_l + clip_g widths for an SDXL file."""
        if SINGLE in self.vectors:
            return int(self.vectors[SINGLE].shape[-1])
        if "clip_l" in self.vectors and "clip_g" in self.vectors:
            return int(self.vectors["clip_l"].shape[-1] + self.vectors["clip_g"].shape[-1])
        return sum(int(v.shape[-1]) for v in self.vectors.values())

    def for_encoder(self, encoder: TextEncoderConfig) -> Tensor:
        """The vectors [n, width] to place in ``encoder``'s token embeddings."""
        vec = self.vectors.get(encoder.name, self.vectors.get(SINGLE))
        if vec is None:
            raise ConfigError(
                f"embedding {self.name!r} has no vectors for text encoder {encoder.name!r} "
                f"(it has {', '.join(sorted(self.vectors))}); use an embedding made for this model"
            )
        if vec.shape[-1] != encoder.width:
            raise ConfigError(
                f"embedding {self.name!r} has vectors of width {vec.shape[-1]} but text encoder {encoder.name!r} "
                f"is {encoder.width} wide; it was made for another model family"
            )
        return vec

    def check(self, config: ModelConfig) -> None:
        """Raise :class:`ConfigError` unless the embedding fits every text encoder of ``config``."""
        widths = [t.width for t in config.text_encoders]
        if self.width != sum(widths):
            raise ConfigError(
                f"embedding {self.name!r} is {self.width} wide but {config.family} models take "
                f"{'+'.join(map(str, widths))} = {sum(widths)}; it was made for another model family"
            )
        if self.num_vectors > MAX_VECTORS:
            raise ConfigError(
                f"embedding {self.name!r} has {self.num_vectors} vectors; a prompt chunk holds at most {MAX_VECTORS}"
            )
        for enc in config.text_encoders:
            vec = self.for_encoder(enc)
            if vec.shape[0] != self.num_vectors:
                raise ConfigError(
                    f"embedding {self.name!r} has {vec.shape[0]} vectors for {enc.name} but {self.num_vectors} "
                    "for another encoder; the file is inconsistent"
                )


def _as_matrix(t: object, what: str) -> Tensor:
    if not isinstance(t, Tensor) or t.ndim not in (1, 2) or not t.is_floating_point() or t.numel() == 0:
        desc = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise CheckpointError(f"{what}: expected a float tensor [n, width], found {desc}")
    t = t.detach().to(torch.float32)
    return t.unsqueeze(0) if t.ndim == 1 else t


def embedding_from_data(data: Mapping[str, object], name: str, path: str | None = None) -> Embedding:
    """Build an :class:`Embedding` from a loaded file's top-level dict (layouts in the module docstring)."""
    where = path or f"embedding {name!r}"
    step = data.get("step")
    step = step if isinstance(step, int) else None
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping):
            raise CheckpointError(f"{where}: 'string_to_param' is a {type(params).__name__}, not a dict")
        if len(params) != 1:
            raise CheckpointError(f"{where}: embedding file has {len(params)} terms in it; expected exactly one")
        vec = _as_matrix(next(iter(params.values())), where)
        return Embedding(name, {SINGLE: vec}, path, step)
    if "clip_g" in data and "clip_l" in data:
        tensors = {k: _as_matrix(v, f"{where} [{k}]") for k, v in data.items() if isinstance(v, Tensor)}
        return Embedding(name, tensors, path, step)
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if len(tensors) == 1 and len(data) == 1:
        return Embedding(name, {SINGLE: _as_matrix(next(iter(tensors.values())), where)}, path, step)
    if tensors and len(data) == 1:
        raise CheckpointError(f"{where}: embedding file has multiple terms in it")
    raise CheckpointError(
        f"{where}: not a textual-inversion embedding (no 'string_to_param', no clip_l/clip_g, not a single tensor)"
    )


def load_embedding_file(path: str | os.PathLike[str]) -> Embedding:
    """Read one ``.pt`` / ``.bin`` / ``.safetensors`` embedding; its name is the file stem."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext in SAFETENSORS_EXT:
        data: Mapping[str, object] = load_state_dict(p)
    elif ext in PICKLE_EXT:
        if not p.is_file():
            raise CheckpointError(f"{p}: no such file; check the path")
        data = _load_pickle(p)
    else:
        raise CheckpointError(f"{p}: not an embedding file (use .pt, .bin or .safetensors)")
    return embedding_from_data(data, p.stem, str(p))


@dataclass
class EmbeddingLibrary:
    """The embeddings one model can use, found in prompts by token sequence (A1111 ``EmbeddingDatabase``).

    ``skipped`` maps names that did not load or do not fit the model to the reason.
    """

    config: ModelConfig
    tokenizer: CLIPTokenizer = field(default_factory=CLIPTokenizer)
    embeddings: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    _by_first_id: dict[int, list[tuple[tuple[int, ...], Embedding]]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike[str], config: ModelConfig, tokenizer: CLIPTokenizer | None = None
    ) -> EmbeddingLibrary:
        """Every embedding under ``folder`` (recursively) that fits ``config``; the others go to ``skipped``."""
        lib = cls(config, tokenizer or CLIPTokenizer())
        lib.load_folder(folder)
        return lib

    def add(self, embedding: Embedding) -> None:
        """Register an embedding under its name (replacing one of the same name); ConfigError if it does not fit."""
        embedding.check(self.config)
        ids = tuple(self.tokenizer.encode(embedding.name))
        if not ids:
            raise ConfigError(f"embedding name {embedding.name!r} has no tokens; rename the file")
        self.remove(embedding.name)
        bucket = self._by_first_id.setdefault(ids[0], [])
        bucket.append((ids, embedding))
        bucket.sort(key=lambda entry: len(entry[0]), reverse=True)  # stable: longest name first, then oldest
        self.embeddings[embedding.name] = embedding
        self.skipped.pop(embedding.name, None)

    def remove(self, name: str) -> None:
        """Forget the embedding called ``name`` (no error if absent)."""
        if self.embeddings.pop(name, None) is None:
            return
        for first, bucket in list(self._by_first_id.items()):
            kept = [entry for entry in bucket if entry[1].name != name]
            if kept:
                self._by_first_id[first] = kept
            else:
                del self._by_first_id[first]

    def load_file(self, path: str | os.PathLike[str]) -> Embedding:
        """Load and register one file; CheckpointError if unreadable, ConfigError if it does not fit the model."""
        embedding = load_embedding_file(path)
        self.add(embedding)
        return embedding

    def load_folder(self, folder: str | os.PathLike[str]) -> None:
        """Load every embedding file under ``folder`` in sorted order; what fails or does not fit is skipped."""
        root = Path(folder)
        if not root.is_dir():
            raise ConfigError(f"{root}: embeddings folder does not exist")
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames.sort()
            for fn in sorted(filenames):
                path = Path(dirpath) / fn
                if path.suffix.lower() not in EMBEDDING_EXT:
                    continue
                try:
                    if path.stat().st_size == 0:
                        continue
                    self.load_file(path)
                except (CheckpointError, ConfigError) as e:
                    self.skipped[path.stem] = str(e)
                except OSError as e:
                    self.skipped[path.stem] = f"{path}: cannot read: {e.strerror}"

    def find_at(self, tokens: list[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens start at ``tokens[position]`` (longest first) and its token count."""
        for ids, embedding in self._by_first_id.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return embedding, len(ids)
        return None

    def __contains__(self, name: object) -> bool:
        return name in self.embeddings

    def __len__(self) -> int:
        return len(self.embeddings)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.embeddings, key=str.lower))
