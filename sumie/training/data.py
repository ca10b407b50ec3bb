"""Training data: image folders with same-name captions (kohya convention), aspect buckets, resumable batch order.

A folder is checked completely before training starts: no images, images without a caption file and unreadable
images are :class:`DataError` s naming the files. Every dataset here is "indexable": ``len(data)``,
``data.bucket_of(i) -> (width, height)`` and ``data.load(i, flip, crop_seed) -> (image [3, H, W] in [-1, 1],
caption)``, a pure function of its arguments, so the batch order alone (:class:`BatchStream`, a function of the
seed, the epoch and the position in it) fixes every batch and a resumed run sees exactly the batches the
uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from sumie.errors import ConfigError, SumieError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_SUFFIX",
    "Batch",
    "BatchStream",
    "DataError",
    "FolderDataset",
    "IndexedData",
    "LatentCache",
    "MapDataset",
    "Sample",
    "make_buckets",
    "nearest_bucket",
    "resize_and_crop",
    "shard_span",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MASK_SUFFIX = ".mask.png"  # cat.png + cat.mask.png: where the subject is, for [train] foreground_weight
_SHOW = 5  # file names shown in an error message


class DataError(SumieError):
    """Training data that cannot be used as it is (empty folder, missing captions, unreadable images)."""


class IndexedData(Protocol):
    """What the trainer reads: sizes per item and a deterministic loader."""

    def __len__(self) -> int: ...

    def bucket_of(self, index: int) -> tuple[int, int]:
        """(width, height) of item ``index`` after cropping."""
        ...

    def load(self, index: int, flip: bool = False, crop_seed: int = 0) -> tuple[Tensor, str]:
        """(image [3, H, W] float32 in [-1, 1], caption)."""
        ...

    def load_mask(self, index: int, flip: bool = False, crop_seed: int = 0) -> Tensor | None:
        """Where the subject of item ``index`` is: [1, H, W] float32 in [0, 1], or None when it has no mask."""
        ...

    def has_masks(self) -> bool:
        """Whether any item can have a mask (foreground-weighted training needs some)."""
        ...

    def describe(self) -> str:
        """A string that changes whenever the items do (for cache fingerprints)."""
        ...


def _names(paths: Sequence[Path], root: Path) -> str:
    shown = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths[:_SHOW]]
    more = f" and {len(paths) - _SHOW} more" if len(paths) > _SHOW else ""
    return ", ".join(shown) + more


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (NovelAI/kohya): (w, h) multiples of ``step`` with w*h <= resolution**2, w/h <= ratio."""
    area = resolution * resolution
    out: set[tuple[int, int]] = {(resolution // step * step or step,) * 2}
    w = step
    while w <= area // step:
        h = min(area // w // step * step, w * max_ratio // step * step)
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.add((w, int(h)))
            out.add((int(h), w))
        w += step
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log ratio) to that of ``size`` = (w, h); ties -> larger area."""
    r = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - r), -b[0] * b[1]))


def resize_and_crop(img: Image.Image, size: tuple[int, int], crop: str = "center", crop_seed: int = 0) -> Tensor:
    """Resize so the image covers ``size`` = (w, h) (Lanczos), crop to it -> [3, h, w] float32 in [-1, 1]."""
    img = img.convert("RGB")
    tw, th = size
    w, h = img.size
    scale = max(tw / w, th / h)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    if crop == "random":
        g = np.random.default_rng(crop_seed)
        left, top = int(g.integers(0, nw - tw + 1)), int(g.integers(0, nh - th + 1))
    else:
        left, top = (nw - tw) // 2, (nh - th) // 2
    img = img.crop((left, top, left + tw, top + th))
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float() / 127.5 - 1.0


class FolderDataset:
    """Images with same-name caption files (``cat.png`` + ``cat.txt``), searched recursively, checked up front."""

    def __init__(self, folder: str | Path, resolution: int, *, crop: str = "center", buckets: bool = False,
                 bucket_step: int = 64, bucket_max_ratio: float = 2.0, caption_extension: str = ".txt",
                 missing_captions: str = "error") -> None:
        root = Path(folder)
        if not root.is_dir():
            raise DataError(f"{root}: no such folder; set [data] folder to a folder of images with .txt captions")
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                       and not p.name.lower().endswith(MASK_SUFFIX)
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not paths:
            raise DataError(f"{root}: no images found ({', '.join(IMAGE_EXTENSIONS)}); add images with same-name "
                            f"{caption_extension} caption files")
        captions: list[str] = []
        missing: list[Path] = []
        bad_text: list[Path] = []
        for p in paths:
            cp = p.with_suffix(caption_extension)
            try:
                captions.append(" ".join(cp.read_text(encoding="utf-8").split()))
            except FileNotFoundError:
                missing.append(p)
                captions.append("")
            except (OSError, UnicodeDecodeError):
                bad_text.append(cp)
                captions.append("")
        if missing and missing_captions == "error":
            raise DataError(f"{len(missing)} of {len(paths)} images in {root} have no {caption_extension} caption "
                            f"file: {_names(missing, root)}; add the captions or set [data] missing_captions = "
                            "\"empty\"")
        if bad_text:
            raise DataError(f"{len(bad_text)} caption file(s) in {root} are not readable UTF-8 text: "
                            f"{_names(bad_text, root)}; fix or delete them")
        sizes: list[tuple[int, int]] = []
        bad: list[Path] = []
        for p in paths:
            try:
                with Image.open(p) as im:
                    im.load()
                    sizes.append(im.size)
            except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
                bad.append(p)
        if bad:
            raise DataError(f"{len(bad)} of {len(paths)} images in {root} cannot be read: {_names(bad, root)}; "
                            "fix or delete them")
        self.root = root
        self.paths = paths
        self.captions = captions
        self.sizes = sizes
        self.crop = crop
        if buckets:
            self.buckets = make_buckets(resolution, bucket_step, bucket_max_ratio)
            self._bucket = [nearest_bucket(s, self.buckets) for s in sizes]
        else:
            self.buckets = [(resolution, resolution)]
            self._bucket = [(resolution, resolution)] * len(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def bucket_of(self, index: int) -> tuple[int, int]:
        """(width, height) the item is cropped to."""
        return self._bucket[index]

    def load(self, index: int, flip: bool = False, crop_seed: int = 0) -> tuple[Tensor, str]:
        """(image [3, H, W] in [-1, 1], caption); a file changed since the check is a DataError."""
        p = self.paths[index]
        try:
            with Image.open(p) as im:
                x = resize_and_crop(im, self._bucket[index], self.crop, crop_seed)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"{p}: cannot be read any more ({e}); fix or delete it and resume") from None
        return (x.flip(-1) if flip else x), self.captions[index]

    def _mask_path(self, index: int) -> Path:
        p = self.paths[index]
        return p.with_name(p.stem + MASK_SUFFIX)

    def load_mask(self, index: int, flip: bool = False, crop_seed: int = 0) -> Tensor | None:
        """``<name>.mask.png`` beside the image (white = subject), cropped as the image is; None without one."""
        mp = self._mask_path(index)
        if not mp.is_file():
            return None
        try:
            with Image.open(mp) as im:
                x = resize_and_crop(im.convert("L").convert("RGB"), self._bucket[index], self.crop, crop_seed)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"{mp}: the mask cannot be read ({e}); fix or delete it and resume") from None
        m = x[:1].add(1.0).div(2.0).clamp(0.0, 1.0)
        return m.flip(-1) if flip else m

    def has_masks(self) -> bool:
        """Whether any image has a ``<name>.mask.png``."""
        return any(self._mask_path(i).is_file() for i in range(len(self.paths)))

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        return self.load(index)

    def describe(self) -> str:
        """Paths, sizes, modification times and captions of all items."""
        h = hashlib.sha256()
        for p, c, b in zip(self.paths, self.captions, self._bucket, strict=True):
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}|{c}|{b}|{self.crop}\n".encode())
        return f"folder:{self.root}:{h.hexdigest()}"


class MapDataset:
    """Any map-style dataset of ``(image [3, H, W] in [-1, 1], caption)`` (e.g. the synthetic shapes) as IndexedData.

    Items must be a pure function of the index; ``flip`` mirrors the image (and swaps left/right in the caption
    when ``swap_left_right``, so positional captions stay true).
    """

    def __init__(self, dataset: Any, name: str, swap_left_right: bool = True) -> None:
        if len(dataset) < 1:
            raise DataError(f"{name}: the dataset is empty")
        x, caption = dataset[0]
        if not (isinstance(x, Tensor) and x.ndim == 3 and x.shape[0] == 3 and isinstance(caption, str)):
            raise DataError(f"{name}: items must be (image tensor [3, H, W], caption str), got "
                            f"({type(x).__name__} {tuple(getattr(x, 'shape', ()))}, {type(caption).__name__})")
        self.dataset = dataset
        self.name = name
        self.size = (int(x.shape[2]), int(x.shape[1]))
        self.buckets = [self.size]
        self.swap_left_right = swap_left_right

    def __len__(self) -> int:
        return len(self.dataset)

    def bucket_of(self, index: int) -> tuple[int, int]:
        """Every item has the first item's size."""
        return self.size

    def load(self, index: int, flip: bool = False, crop_seed: int = 0) -> tuple[Tensor, str]:
        """The dataset's item as float32, mirrored if ``flip``."""
        x, caption = self.dataset[index]
        x = x.float()
        if tuple(x.shape[1:]) != (self.size[1], self.size[0]):
            raise DataError(f"{self.name}: item {index} has size {tuple(x.shape[1:])}, item 0 {self.size[::-1]}")
        if flip:
            x = x.flip(-1)
            if self.swap_left_right:
                caption = _swap_left_right(caption)
        return x, caption

    def load_mask(self, index: int, flip: bool = False, crop_seed: int = 0) -> Tensor | None:
        """The dataset's ``mask(index)`` [1, H, W] in [0, 1] (mirrored if ``flip``), or None if it has none."""
        if not self.has_masks():
            return None
        m = self.dataset.mask(index).float()
        return m.flip(-1) if flip else m

    def has_masks(self) -> bool:
        """Whether the dataset draws masks (the synthetic shapes do)."""
        return callable(getattr(self.dataset, "mask", None))

    def describe(self) -> str:
        """The dataset's repr and length (its items are a function of the constructor arguments)."""
        return f"map:{self.name}:{len(self)}:{self.size}"


def _swap_left_right(caption: str) -> str:
    words = caption.split(" ")
    swap = {"left": "right", "right": "left", "Left": "Right", "Right": "Left"}
    return " ".join(swap.get(w, w) for w in words)


SYNTHETIC_KEYS = ("length", "seed", "resolution", "mix", "color_words", "heldout")


def synthetic_dataset(options: dict[str, Any], resolution: int) -> MapDataset:
    """The built-in captioned shapes (:class:`sumie.tiny.synthetic.TrainSet`): ``length``, ``seed`` and ``mix``
    (:class:`~sumie.tiny.synthetic.SceneMix`, e.g. ``{ one = 0.3, count = 0.1, two = 0.6 }``) options.

    The held-out attribute combinations of :data:`~sumie.tiny.synthetic.DEFAULT_HELDOUT` never appear, unless
    ``heldout = false`` (every combination: e.g. to teach an adapter the ones the base model never saw).
    """
    from sumie.tiny.synthetic import SceneMix, TrainSet

    for key in options:
        if key not in SYNTHETIC_KEYS:
            raise ConfigError(f"unknown key {key!r} in [data] synthetic; valid keys: {', '.join(SYNTHETIC_KEYS)}")
    kwargs = {"resolution": resolution, **options}
    if "heldout" in kwargs:
        if not isinstance(kwargs["heldout"], bool):
            raise ConfigError(f"[data] synthetic heldout must be true or false, got {kwargs['heldout']!r}")
        if kwargs["heldout"]:
            del kwargs["heldout"]  # the default split, spelt as the default (the name keys the latent cache)
        else:
            kwargs["heldout"] = None
    if "mix" in kwargs:  # one spelling per mix in the name, which keys the latent cache
        kwargs["mix"] = SceneMix.from_options(kwargs["mix"])
    return MapDataset(TrainSet(**kwargs), f"synthetic{sorted(kwargs.items())}", swap_left_right=True)


@dataclass(frozen=True)
class Sample:
    """One item of a batch as the order decided it."""

    index: int
    flip: bool
    crop_seed: int


@dataclass
class Batch:
    """Loaded items: ``images`` [B, 3, H, W] in [-1, 1], ``captions`` (B strings), the samples they came from.

    Under data parallelism a rank's batch is rows ``offset .. offset + B`` of a global batch of ``total`` items.
    """

    images: Tensor
    captions: list[str]
    samples: list[Sample]
    offset: int = 0
    total: int = -1  # -1: the batch is the whole global batch

    def __post_init__(self) -> None:
        if self.total < 0:
            self.total = len(self.samples)


def _epoch_batches(buckets: Sequence[tuple[int, int]], batch_size: int, seed: int, epoch: int, shuffle: bool,
                   flip: bool) -> list[list[Sample]]:
    """Batches of one epoch: items grouped by bucket, shuffled (seed, epoch), full batches first per bucket."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919) % (2**63))
    groups: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(buckets):
        groups.setdefault(b, []).append(i)
    batches: list[list[int]] = []
    for key in sorted(groups):
        idx = groups[key]
        if shuffle:
            idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        full = len(idx) // batch_size * batch_size
        # a ragged last batch is dropped unless the bucket has no full batch at all
        for s in range(0, full if full else len(idx), batch_size):
            batches.append(idx[s:s + batch_size])
    if shuffle and len(batches) > 1:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
    n = sum(len(b) for b in batches)
    flips = (torch.rand(n, generator=g) < 0.5).tolist() if flip else [False] * n
    crops = torch.randint(0, 2**31 - 1, (n,), generator=g).tolist()
    out, k = [], 0
    for b in batches:
        out.append([Sample(i, bool(flips[k + j]), int(crops[k + j])) for j, i in enumerate(b)])
        k += len(b)
    return out


def collate(data: IndexedData, samples: Sequence[Sample], span: tuple[int, int] | None = None) -> Batch:
    """Load and stack the items of one batch (all in one bucket), or only rows ``span`` = [lo, hi) of it."""
    lo, hi = span if span is not None else (0, len(samples))
    loaded = [data.load(s.index, s.flip, s.crop_seed) for s in samples[lo:hi]]
    return Batch(torch.stack([x for x, _ in loaded]), [c for _, c in loaded], list(samples[lo:hi]), lo, len(samples))


def shard_span(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous part [lo, hi) of a global batch of ``n`` items (sizes differ by at most one)."""
    return rank * n // world_size, (rank + 1) * n // world_size


def _identity(batch: Batch) -> Batch:
    return batch


class _EpochLoader(torch.utils.data.Dataset):
    """Batches of one epoch as a dataset for a multi-worker DataLoader (``batch_size=None``)."""

    def __init__(self, data: IndexedData, batches: list[list[Sample]], rank: int = 0, world_size: int = 1) -> None:
        self.data, self.batches, self.rank, self.world_size = data, batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Batch:
        b = self.batches[i]
        return collate(self.data, b, shard_span(len(b), self.rank, self.world_size))


class BatchStream:
    """Endless batches in a fixed order; ``state_dict()`` = (epoch, position), enough to continue exactly.

    With ``world_size`` > 1 every rank walks the same global order and loads only its contiguous part of each
    batch (:func:`shard_span`; what ``DistributedSampler`` does per epoch, here per batch so that the global batch
    is the one a single process would see).
    """

    def __init__(self, data: IndexedData, batch_size: int, seed: int, *, shuffle: bool = True, flip: bool = False,
                 num_workers: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.flip = flip
        self.num_workers = num_workers
        self.rank, self.world_size = rank, world_size
        self._buckets = [data.bucket_of(i) for i in range(len(data))]
        self.epoch = 0
        self.position = 0
        self._batches: list[list[Sample]] | None = None
        self._iter: Iterator[Batch] | None = None

    def batches_of(self, epoch: int) -> list[list[Sample]]:
        """The batch order of an epoch."""
        return _epoch_batches(self._buckets, self.batch_size, self.seed, epoch, self.shuffle, self.flip)

    def next_samples(self) -> list[Sample]:
        """The samples of the next batch without loading images (advances the stream)."""
        if self._batches is None:
            self._batches = self.batches_of(self.epoch)
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches, self._iter = self.batches_of(self.epoch), None
        samples = self._batches[self.position]
        self.position += 1
        return samples

    def span(self, n: int) -> tuple[int, int]:
        """This rank's rows of a global batch of ``n``."""
        return shard_span(n, self.rank, self.world_size)

    def smallest_batch(self) -> int:
        """The size of the smallest batch an epoch can hold (a bucket with fewer items than ``batch_size``)."""
        counts: dict[tuple[int, int], int] = {}
        for b in self._buckets:
            counts[b] = counts.get(b, 0) + 1
        return min(min(c, self.batch_size) for c in counts.values())

    def __next__(self) -> Batch:
        if self.num_workers == 0:
            samples = self.next_samples()
            return collate(self.data, samples, self.span(len(samples)))
        if self._iter is None or self._batches is None or self.position >= len(self._batches):
            if self._batches is not None and self.position >= len(self._batches):
                self.epoch, self.position = self.epoch + 1, 0
            self._batches = self.batches_of(self.epoch)
            loader = torch.utils.data.DataLoader(
                _EpochLoader(self.data, self._batches[self.position:], self.rank, self.world_size), batch_size=None,
                shuffle=False,
                num_workers=self.num_workers, collate_fn=_identity)
            self._iter = iter(loader)
        self.position += 1
        return next(self._iter)

    def __iter__(self) -> BatchStream:
        return self

    def state_dict(self) -> dict[str, int]:
        """Where the stream is: epoch and batches consumed in it."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position (the order is recomputed from the seed)."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches, self._iter = None, None


class LatentCache:
    """Posterior moments of every item (and its mirror image when flipping) under a frozen VAE.

    ``mean`` and ``std`` per (index, flip) as float32; :meth:`sample` draws z = mean + std * eps (the posterior
    sample diffusion is trained on, Rombach et al. 2022) with the trainer's generator.
    """

    def __init__(self, moments: dict[tuple[int, bool], tuple[Tensor, Tensor]], captions: dict[tuple[int, bool], str],
                 fingerprint: str) -> None:
        self.moments = moments
        self.captions = captions
        self.fingerprint = fingerprint

    @classmethod
    @torch.no_grad()
    def build(cls, data: IndexedData, vae: torch.nn.Module, flips: bool, batch_size: int, fingerprint: str,
              progress: bool = False) -> LatentCache:
        """Encode every item in fixed batches (float32, no autocast) so the cache is reproducible."""
        from tqdm.auto import tqdm

        keys = [(i, f) for i in range(len(data)) for f in ((False, True) if flips else (False,))]
        by_bucket: dict[tuple[int, int], list[tuple[int, bool]]] = {}
        for k in keys:
            by_bucket.setdefault(data.bucket_of(k[0]), []).append(k)
        moments: dict[tuple[int, bool], tuple[Tensor, Tensor]] = {}
        captions: dict[tuple[int, bool], str] = {}
        bar = tqdm(total=len(keys), desc="caching latents", disable=not progress, leave=False)
        device = next(vae.parameters()).device
        for group in by_bucket.values():
            for s in range(0, len(group), batch_size):
                chunk = group[s:s + batch_size]
                loaded = [data.load(i, f) for i, f in chunk]
                post = vae.encode(torch.stack([x for x, _ in loaded]).to(device))  # type: ignore[operator]
                for j, k in enumerate(chunk):
                    moments[k] = (post.mean[j].float().cpu().clone(), post.std[j].float().cpu().clone())
                    captions[k] = loaded[j][1]
                bar.update(len(chunk))
        bar.close()
        return cls(moments, captions, fingerprint)

    def caption(self, sample: Sample) -> str:
        """The caption of a cached item."""
        return self.captions[(sample.index, sample.flip)]

    def sample(self, samples: Sequence[Sample], generator: torch.Generator, offset: int = 0,
               total: int | None = None) -> Tensor:
        """z ~ q(z|x) for a batch: [B, C, h, w] float32 (unscaled VAE latents).

        ``samples`` may be rows ``offset ..`` of a global batch of ``total``: eps is drawn for all of it and sliced,
        so every rank of a data-parallel run gets the rows a single process would.
        """
        mean = torch.stack([self.moments[(s.index, s.flip)][0] for s in samples])
        std = torch.stack([self.moments[(s.index, s.flip)][1] for s in samples])
        n = len(samples) if total is None else total
        eps = torch.randn((n, *mean.shape[1:]), generator=generator, dtype=torch.float32)
        return mean + std * eps[offset:offset + len(samples)]

    def save(self, path: str | Path) -> None:
        """Write the cache (atomically) with its fingerprint."""
        import os

        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        keys = sorted(self.moments)
        torch.save({"fingerprint": self.fingerprint, "keys": torch.tensor([[i, int(f)] for i, f in keys]),
                    "mean": [self.moments[k][0] for k in keys], "std": [self.moments[k][1] for k in keys],
                    "captions": [self.captions[k] for k in keys]}, tmp)
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str) -> LatentCache | None:
        """A saved cache if it exists and was made from the same data and VAE, else None."""
        p = Path(path)
        if not p.is_file():
            return None
        try:
            d = torch.load(p, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            return None
        if not isinstance(d, dict) or d.get("fingerprint") != fingerprint:
            return None
        keys = [(int(i), bool(f)) for i, f in d["keys"].tolist()]
        return cls({k: (m, s) for k, m, s in zip(keys, d["mean"], d["std"], strict=True)},
                   dict(zip(keys, d["captions"], strict=True)), fingerprint)
