"""Prompt adherence on the synthetic shapes domain: a deterministic detector and its scores.

The detector (numpy only) reads a generated image the way :mod:`sumie.tiny.synthetic` draws one:

1. background: each border pixel votes for its nearest background colour; the winner's median border RGB is the
   background estimate;
2. foreground: pixels farther than ``FG_THRESHOLD`` (RGB distance) from that estimate; 4-connected components
   (min-label propagation with pointer jumping) smaller than ``MIN_AREA`` of the image are dropped as specks;
3. per component: colour = nearest palette colour to the median of its inner half (the pixels farthest from the
   background, so anti-aliased edges do not tint it); shape from the soft mask's moments: an upward triangle's mass
   is skewed down, an (unskewed) five-point star has a strong 5-fold moment (circle, square ~0), a square reaches
   farther along the diagonals than along the axes (circle does not); a box at least ``BAR_ASPECT`` times as wide
   as tall and filled to ``BAR_FILL`` is a bar (the other shapes' boxes are about square); size from the box side (small
   <= 0.15, large >= 0.22 of the image); position = the 3x3 grid cell of the box centre. Blobs larger than
   ``MAX_EXTENT`` or filling less than ``MIN_FILL`` of their box are clutter (noise, merged objects), not objects.

Scoring (:func:`score`) matches the prompt's objects to components by brute force (the assignment with the most
attributes right) and checks every stated attribute: colour, shape, size, position per object, the relation, the
background, and ``count`` (number of objects found == number asked for, "a" counting as one, and no clutter).
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from sumie.errors import ConfigError
from sumie.tiny.synthetic import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SceneSpec,
    bar_prompts,
    heldout_prompts,
    parse_caption,
    seen_prompts,
    star_prompts,
)

__all__ = ["Component", "Detection", "FG_THRESHOLD", "MIN_AREA", "SPLITS", "default_prompts", "detect", "evaluate",
           "run_adherence", "run_ceiling", "score"]

FG_THRESHOLD = 48.0  # RGB distance from the background above which a pixel is foreground
MIN_AREA = 0.0025  # least component area, as a fraction of the image (10 px at 64x64)
SIZE_THRESHOLD = 0.195  # bounding-box side (fraction of the image side) between small and large
MAX_EXTENT = 0.45  # larger blobs (box side, fraction of the image side) are clutter: objects span <= 0.26
MIN_FILL = 0.3  # blobs filling less of their box are clutter: a triangle fills 0.5
RELATION_MARGIN = 0.05  # least centre offset (fraction of the image side) for left of / right of / above / below
_TRIANGLE_SKEW = -0.25  # vertical skewness below which a shape is an (upward) triangle (triangle ~-0.57)
_SQUARE_ANISOTROPY = 0.25  # 4-fold anisotropy above which a shape is a square (square ~0.6, circle 0)
_STAR_FIVEFOLD = 0.5  # 5-fold moment above which an unskewed shape is a star (star 0.61-0.78 rendered, circle and
# square <= 0.04; triangles, rendered <= 0.33 and generated up to 0.53, are told by their skew first)
BAR_ASPECT = 2.0  # least box width / height of a bar (drawn 3; circles, squares, triangles and stars ~1)
BAR_FILL = 0.7  # least share of its box a bar's pixels fill (rendered >= 0.93, after a VAE round trip 0.76-0.98)
_MIN_MIX = 0.35  # least share of its colour a detected object's core is assumed to have
_ALPHA_FLOOR = 0.15  # coverage ignored as background noise when measuring shapes
_MAX_CANDIDATES = 3  # components considered for matching beyond the number of objects asked for

_COLOR_NAMES = list(COLORS)
_COLOR_RGB = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)
_BG_NAMES = list(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Component:
    """One detected object; centre and extent are fractions of the image side, box = (y0, x0, y1, x1) exclusive."""

    area: int
    box: tuple[int, int, int, int]
    cx: float
    cy: float
    extent: float
    color: str
    shape: str
    size: str
    position: str
    fill: float  # area / box area: circle ~0.785, square ~1, triangle ~0.5
    skew: float  # vertical skewness of the soft mass: triangle ~-0.57, circle and square 0
    anisotropy: float  # diagonal minus axis 4th moment / variance^2: square ~0.6, circle and triangle ~0
    fivefold: float = 0.0  # |sum a z^5| / sum a |z|^5 about the centroid: star ~0.7, triangle ~0.28, others ~0


@dataclass(frozen=True)
class Detection:
    """What the detector sees in one image: background and objects (largest first)."""

    background: str
    background_rgb: tuple[float, float, float]
    objects: tuple[Component, ...]
    clutter: int = 0  # foreground blobs too large or too ragged to be an object of the domain


def _as_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """PIL image, uint8 array [H, W, 3] or float tensor [3, H, W] in [-1, 1] -> float32 array [H, W, 3] in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ConfigError(f"image tensors must be [3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
        return ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ConfigError(f"image arrays must be [H, W, 3] RGB, got shape {arr.shape}")
    return arr.astype(np.float32)


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour of each RGB row: [N, 3] x [K, 3] -> [N]."""
    return np.argmin(((rgb[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)


def _object_color(rgb: np.ndarray, bg_rgb: np.ndarray) -> str:
    """The palette colour best explaining ``rgb`` as ``a * colour + (1 - a) * background``, a in [0.35, 1]."""
    # small or blurred objects never reach their full colour (a black dot on white looks gray): the mixing line
    # from the background names them where the nearest palette colour would not; colours too close to the
    # background to be drawn on it are no candidates
    d = _COLOR_RGB - bg_rgb  # [K, 3]
    norm2 = (d * d).sum(-1)
    a = np.clip((d @ (rgb - bg_rgb)) / np.maximum(norm2, 1e-6), _MIN_MIX, 1.0)
    residual = (((rgb - bg_rgb)[None] - a[:, None] * d) ** 2).sum(-1)
    residual[norm2 < (FG_THRESHOLD * 2) ** 2] = np.inf
    return _COLOR_NAMES[int(np.argmin(residual))]


def _background(arr: np.ndarray) -> tuple[str, np.ndarray]:
    """Background name (mode of the border pixels' nearest background colours) and its median border RGB."""
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    votes = _nearest(border, _BG_RGB)
    winner = int(np.bincount(votes, minlength=len(_BG_NAMES)).argmax())
    return _BG_NAMES[winner], np.median(border[votes == winner], axis=0)


def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean mask [H, W]: -1 off the mask, else the smallest pixel index."""
    h, w = mask.shape
    big = h * w
    flat_index = np.arange(big, dtype=np.int64).reshape(h, w)
    labels = np.where(mask, flat_index, big)
    while True:
        new = labels.copy()
        np.minimum(new[1:], labels[:-1], out=new[1:])
        np.minimum(new[:-1], labels[1:], out=new[:-1])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, big)
        # pointer jumping: a label names a pixel of the same component, whose own label is no larger
        flat = np.append(new.ravel(), big)
        new = np.where(mask, flat[new], big)
        if np.array_equal(new, labels):
            return np.where(mask, labels, -1)
        labels = new


def _shape(alpha: np.ndarray) -> tuple[str, float, float, float]:
    """Shape name, vertical skewness, 4-fold anisotropy and 5-fold moment of a soft coverage [h, w] (weights 0..1)."""
    # an upward triangle's mass lies low: vertical skewness ~-0.57 (circle, square 0); an axis-aligned square
    # reaches farther along the diagonals than along the axes: (mean diagonal - mean axis 4th moment) / variance^2
    # ~0.6 (circle 0). Blur by any isotropic kernel leaves the 3rd cumulant and that 4th-moment difference as they
    # are and only adds to the variance, so both cues survive soft edges. A five-point star has 5-fold symmetry:
    # the complex moment sum a z^5 (z = x + iy) vanishes for circles and squares (and for equilateral triangles;
    # the drawn isosceles ones reach ~0.3 of sum a |z|^5), a star reaches ~0.7; an isotropic blur leaves it as is.
    h, w = alpha.shape
    mass = float(alpha.sum())
    if mass <= 0:
        return "circle", 0.0, 0.0, 0.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    x = xx - float((alpha * xx).sum()) / mass
    y = yy - float((alpha * yy).sum()) / mass

    def moment(v: np.ndarray) -> float:
        return float((alpha * v).sum()) / mass

    var_x, var_y = moment(x * x), moment(y * y)
    skew = moment(y**3) / max(var_y, 1e-6) ** 1.5
    u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
    aniso = (moment(u**4) + moment(v**4) - moment(x**4) - moment(y**4)) / 2 / max((var_x + var_y) / 2, 1e-6) ** 2
    z = x + 1j * y
    five = float(abs((alpha * z**5).sum()) / max(float((alpha * np.abs(z) ** 5).sum()), 1e-6))
    if skew < _TRIANGLE_SKEW:  # first: generated triangles reach a 5-fold moment of 0.53 (stars are unskewed)
        name = "triangle"
    elif five > _STAR_FIVEFOLD:
        name = "star"
    elif aniso > _SQUARE_ANISOTROPY:
        name = "square"
    else:
        name = "circle"
    return name, skew, aniso, five


def detect(image: Image.Image | np.ndarray | torch.Tensor) -> Detection:
    """Background and objects of one image of the synthetic domain (deterministic)."""
    arr = _as_array(image)
    h, w, _ = arr.shape
    bg_name, bg_rgb = _background(arr)
    dist = np.sqrt(((arr - bg_rgb) ** 2).sum(-1))
    mask = dist > FG_THRESHOLD
    labels = label_components(mask)
    ids, counts = np.unique(labels[mask], return_counts=True)
    keep = [(int(c), int(i)) for i, c in zip(ids, counts, strict=True) if c >= MIN_AREA * h * w]
    keep.sort(key=lambda t: (-t[0], t[1]))
    side = float(max(h, w))
    pad = max(1, round(0.03 * side))
    objects = []
    clutter = 0
    for area, label in keep:
        ys, xs = np.nonzero(labels == label)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        d = dist[ys, xs]
        inner = arr[ys, xs][d >= np.median(d)]
        obj_rgb = np.median(inner, axis=0)
        color = _object_color(obj_rgb, bg_rgb)
        y0p, x0p, y1p, x1p = max(0, y0 - pad), max(0, x0 - pad), min(h, y1 + pad), min(w, x1 + pad)
        region = arr[y0p:y1p, x0p:x1p] - bg_rgb
        axis = obj_rgb - bg_rgb
        coverage = (region @ axis) / max(float(axis @ axis), FG_THRESHOLD**2)  # 0 = background, 1 = object
        alpha = np.clip((coverage - _ALPHA_FLOOR) / (1 - _ALPHA_FLOOR), 0.0, 1.0)
        own = labels[y0p:y1p, x0p:x1p]
        alpha[(own >= 0) & (own != label)] = 0.0  # another object's pixels
        shape, skew, aniso, five = _shape(alpha)
        fill = area / ((y1 - y0) * (x1 - x0))
        if x1 - x0 >= BAR_ASPECT * (y1 - y0) and fill >= BAR_FILL:
            shape = "bar"
        cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
        extent = max(y1 - y0, x1 - x0) / side
        cell = 3 * min(2, int(3 * cy)) + min(2, int(3 * cx))
        if extent > MAX_EXTENT or fill < MIN_FILL:
            clutter += 1
            continue
        objects.append(Component(area, (y0, x0, y1, x1), cx, cy, extent, color, shape,
                                 "small" if extent < SIZE_THRESHOLD else "large", POSITIONS[cell], fill, skew, aniso,
                                 five))
    return Detection(bg_name, tuple(float(v) for v in bg_rgb), tuple(objects), clutter)


def _relation_holds(rel: str, a: Component, b: Component) -> bool:
    m = RELATION_MARGIN
    return {"left of": a.cx < b.cx - m, "right of": a.cx > b.cx + m,
            "above": a.cy < b.cy - m, "below": a.cy > b.cy + m}[rel]


def _attributes(spec: SceneSpec, det: Detection, assigned: Sequence[Component | None],
                owner: Sequence[int]) -> dict[str, bool]:
    """Attribute checks of one assignment of the spec's instances (``owner[i]`` = object of instance i)."""
    out: dict[str, bool] = {}
    multi = len(spec.objects) > 1
    for k, o in enumerate(spec.objects):
        got = [c for c, j in zip(assigned, owner, strict=True) if j == k and c is not None]
        suffix = f"_{k + 1}" if multi else ""
        out["color" + suffix] = bool(got) and all(c.color == o.color for c in got)
        out["shape" + suffix] = bool(got) and all(c.shape == o.shape for c in got)
        if o.size is not None:
            out["size" + suffix] = bool(got) and all(c.size == o.size for c in got)
        if o.position is not None:
            out["position" + suffix] = bool(got) and all(c.position == o.position for c in got)
    out["count"] = len(det.objects) == len(owner) and det.clutter == 0
    if spec.relation is not None:
        a, b = assigned[owner.index(0)], assigned[owner.index(1)]
        out["relation"] = a is not None and b is not None and _relation_holds(spec.relation, a, b)
    if spec.background is not None:
        out["background"] = det.background == spec.background
    return out


def score(image: Image.Image | np.ndarray | torch.Tensor, spec: SceneSpec | str,
          detection: Detection | None = None) -> dict[str, bool]:
    """Stated attributes right or wrong: color/shape/size/position (``_1``/``_2`` for two objects), count, ..."""
    # keys: "color", "shape", "count" always; "size", "position", "relation", "background" when the prompt states
    # them; a spec may be given as a caption of the synthetic grammar
    if isinstance(spec, str):
        spec = parse_caption(spec)
    det = detection if detection is not None else detect(image)
    owner = [k for k, o in enumerate(spec.objects) for _ in range(o.count)]
    found = len(det.objects[: len(owner) + _MAX_CANDIDATES])
    cands: list[Component | None] = [*det.objects[:found], *([None] * len(owner))]
    best: dict[str, bool] | None = None
    best_right = -1
    for perm in itertools.permutations(range(len(cands)), len(owner)):
        missing = [i for i in perm if i >= found]
        if missing != list(range(found, found + len(missing))):
            continue  # the Nones (objects not found) are interchangeable: keep one order of them
        result = _attributes(spec, det, [cands[i] for i in perm], owner)
        right = sum(result.values())
        if right > best_right:
            best, best_right = result, right
    assert best is not None
    return best


def _attribute_type(key: str) -> str:
    return re.sub(r"_\d+$", "", key)


def _summary(scores: Sequence[dict[str, bool]]) -> dict[str, Any]:
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    for s in scores:
        for key, ok in s.items():
            t = _attribute_type(key)
            right[t] = right.get(t, 0) + int(ok)
            total[t] = total.get(t, 0) + 1
    n_attr = sum(total.values())
    return {
        "n_images": len(scores),
        "attributes_right": sum(right.values()) / n_attr if n_attr else float("nan"),
        "images_all_right": sum(all(s.values()) for s in scores) / len(scores) if scores else float("nan"),
        "per_attribute": {t: right[t] / total[t] for t in sorted(total)},
        "attribute_counts": {t: total[t] for t in sorted(total)},
    }


def evaluate(images: Sequence[Image.Image | np.ndarray | torch.Tensor], specs: Sequence[SceneSpec]) -> dict[str, Any]:
    """Adherence report: per-attribute accuracy and share of attributes right, for "one", "two" and "all" prompts."""
    if len(images) != len(specs):
        raise ConfigError(f"evaluate got {len(images)} images for {len(specs)} specs; pass one spec per image")
    scores = [score(img, spec) for img, spec in zip(images, specs, strict=True)]
    report: dict[str, Any] = {"all": _summary(scores)}
    for kind in ("one", "two"):
        group = [s for s, spec in zip(scores, specs, strict=True) if spec.kind == kind]
        if group:
            report[kind] = _summary(group)
    report["scores"] = scores
    return report


# star, bar: prompts with a shape sumie-tiny was not trained on (for adapters that teach it)
SPLITS = {"heldout": heldout_prompts, "seen": seen_prompts, "star": star_prompts, "bar": bar_prompts}


def default_prompts(n_one: int = 50, n_two: int = 50, seed: int = 0,
                    split: str = "heldout") -> list[tuple[str, SceneSpec]]:
    """``n_one`` one-object then ``n_two`` two-object prompts: held-out combinations (the standard set), "seen" ones
    or "star" / "bar" (prompts with five-point stars / bars, shapes sumie-tiny was not trained on)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown prompt split {split!r}; use {' or '.join(SPLITS)}")
    make = SPLITS[split]
    return make(n_one, "one", seed) + make(n_two, "two", seed)


def run_adherence(engine: Any, prompts: Sequence[tuple[str, SceneSpec] | str] | None = None,
                  cfg_scale: float | None = None, steps: int = 20, sampler: str = "DPM++ 2M", seed: int = 0, n: int = 1,
                  cfg_rescale: float = 0.0,
                  resolution: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Generate ``n`` images per prompt with ``engine.generate`` and score them: :func:`evaluate`'s report + extras."""
    # prompts: (caption, spec) pairs or captions of the synthetic grammar; None = default_prompts(seed=seed).
    # Image j of prompt i gets seed ``seed + n * i + j``; cfg_scale None = the model's default, resolution None = the
    # model's native size; cfg_rescale is the guidance rescale phi (Lin et al. 2023, 0 = off). The report
    # adds ``settings``, ``seconds_per_image`` (generation only) and per-image ``records`` (prompt, seed, scores).
    from sumie.pipelines.params import GenerationParams

    def make(caption: str, image_seed: int) -> Image.Image:
        params = GenerationParams(prompt=caption, width=resolution, height=resolution, cfg_scale=cfg_scale,
                                  cfg_rescale=cfg_rescale, steps=steps, sampler=sampler, seed=image_seed)
        return engine.generate(params).images[0]

    report = _score_images(make, prompts, seed, n, progress)
    report["settings"] = {"cfg_scale": engine.default_cfg_scale if cfg_scale is None else cfg_scale,
                          "cfg_rescale": cfg_rescale, "steps": steps, "sampler": sampler, "seed": seed, "n": n,
                          "resolution": resolution, "n_prompts": report["settings"]["n_prompts"]}
    return report


def run_ceiling(vae: Any, prompts: Sequence[tuple[str, SceneSpec] | str] | None = None, seed: int = 0, n: int = 1,
                resolution: int = 64, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Score ground-truth renders of the prompts after a round trip through ``vae`` (encode to the posterior mean,
    decode): the most any UNet, LoRA or embedding on that VAE could reach, since the VAE draws every image."""
    # image j of prompt i renders the caption with seed ``seed + n * i + j`` (its unstated attributes drawn from it)
    from sumie.pipelines import vae_io
    from sumie.pipelines.images import to_tensor
    from sumie.tiny.synthetic import render_caption

    def make(caption: str, image_seed: int) -> Image.Image:
        image, _ = render_caption(caption, resolution, seed=image_seed)
        with torch.no_grad():
            latent = vae_io.encode(vae, to_tensor(image))
            return vae_io.decode_images(vae, latent)[0]

    report = _score_images(make, prompts, seed, n, progress)
    report["settings"].update(reference="vae round trip of ground-truth renders", resolution=resolution)
    return report


def _score_images(make: Callable[[str, int], Image.Image], prompts: Sequence[tuple[str, SceneSpec] | str] | None,
                  seed: int, n: int, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """``make(caption, seed)`` for ``n`` images per prompt, scored: :func:`evaluate`'s report + records, timing."""
    if n < 1:
        raise ConfigError(f"images per prompt must be >= 1, got {n}")
    prompts = list(default_prompts(seed=seed) if prompts is None else prompts)
    if not prompts:
        raise ConfigError("no prompts to evaluate; pass at least one (caption, spec) pair")
    images, specs, records = [], [], []
    start = time.perf_counter()
    total = len(prompts) * n
    pairs = [(p, parse_caption(p)) if isinstance(p, str) else p for p in prompts]
    for i, (caption, spec) in enumerate(pairs):
        for j in range(n):
            image_seed = seed + n * i + j
            images.append(make(caption, image_seed))
            specs.append(spec)
            records.append({"prompt": caption, "seed": image_seed, "kind": spec.kind})
            if progress is not None:
                progress(len(images), total)
    elapsed = time.perf_counter() - start
    report = evaluate(images, specs)
    for record, s in zip(records, report.pop("scores"), strict=True):
        record["scores"] = s
    report["settings"] = {"seed": seed, "n": n, "n_prompts": len(prompts)}
    report["seconds_per_image"] = elapsed / total
    report["records"] = records
    return report
