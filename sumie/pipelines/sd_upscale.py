"""SD upscale (AUTOMATIC1111 1.10 ``scripts/sd_upscale.py``, the core of "Ultimate SD Upscale"): upscale, then
img2img tile by tile, the tiles blended back together.

1. the image is flattened and upscaled by ``scale`` to ``int(w * scale) // 8 * 8`` x ``int(h * scale) // 8 * 8``
   (A1111 ``Upscaler.upscale``): "lanczos" resizes to ``int(w * scale)`` x ``int(h * scale)`` then, when that differs,
   Lanczos again to the target; an upscaler model runs (tiled) while smaller than the target, then Lanczos; "none"
   keeps the image as it is;
2. :func:`split_grid` cuts it into ``width`` x ``height`` tiles (the request's size is the tile size, as A1111's
   img2img sliders are) overlapping by at least ``overlap`` (A1111 ``images.split_grid``);
3. every tile is an img2img init image; tiles go in batches of ``batch_size``, batch i of upscale n starting at seed
   ``seed + n + i`` (A1111 sets ``p.seed = processed.seed + 1`` after each batch), image k of a batch at seed + k;
4. :func:`combine_grid` pastes the results back (A1111 ``images.combine_grid``): row by row, each tile's first
   ``overlap`` columns (then each row's first ``overlap`` lines) blended over what is there with a linear mask
   ``uint8(i * 255 / overlap)``, the rest pasted as is.

``n_iter`` upscales run from seeds ``seed + n``. A ControlNet unit without an image takes each tile as its image
(the tile ControlNet's use); tiles then run one per call, at the seeds the batches would give them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from sumie.errors import ConfigError
from sumie.pipelines.images import flatten
from sumie.pipelines.params import GenerationParams
from sumie.pipelines.upscale import resolve_upscaler, upscale
from sumie.pipelines.variation import fixed_seed

if TYPE_CHECKING:
    from sumie.pipelines.engine import Engine, GenerationResult

__all__ = ["Grid", "SDUpscaleResult", "combine_grid", "sd_upscale", "split_grid", "target_size", "upscale_image"]

BUILTIN = ("lanczos", "none")


@dataclass
class Grid:
    """Tiles of an image: ``rows`` of (y, tile height, [(x, tile width, tile image)]) and the sizes."""

    rows: list[tuple[int, int, list[tuple[int, int, Image.Image]]]]
    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int

    @property
    def tiles(self) -> list[Image.Image]:
        """The tile images, row by row."""
        return [t for _, _, row in self.rows for _, _, t in row]

    def with_tiles(self, tiles: list[Image.Image]) -> Grid:
        """The same grid holding ``tiles`` (row by row) instead."""
        it = iter(tiles)
        rows = [(y, h, [(x, w, next(it)) for x, w, _ in row]) for y, h, row in self.rows]
        return dataclasses.replace(self, rows=rows)


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    """A1111's tile starts along one side: ceil((n - overlap) / (tile - overlap)) tiles spread evenly, the last
    (and any that would reach the end) moved to end exactly at ``n``."""
    count = math.ceil((n - overlap) / (tile - overlap))
    step = (n - tile) / (count - 1) if count > 1 else 0
    return [n - tile if int(i * step) + tile >= n else int(i * step) for i in range(count)]


def split_grid(image: Image.Image, tile_w: int = 512, tile_h: int = 512, overlap: int = 64) -> Grid:
    """``image`` cut into tile_w x tile_h tiles overlapping by at least ``overlap`` (A1111 ``split_grid``)."""
    w, h = image.size
    rows = [(y, tile_h, [(x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))) for x in _starts(w, tile_w, overlap)])
            for y in _starts(h, tile_h, overlap)]
    return Grid(rows, tile_w, tile_h, w, h, overlap)


def _ramp(overlap: int, axis: int, size: int) -> Image.Image:
    """The seam mask: ``uint8(i * 255 / overlap)`` for i in 0..overlap-1 along ``axis`` (1: columns), ``size`` long
    the other way."""
    r = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    arr = np.repeat(r[None, :], size, 0) if axis == 1 else np.repeat(r[:, None], size, 1)
    return Image.fromarray(arr, "L")


def combine_grid(grid: Grid) -> Image.Image:
    """The tiles pasted back, seams blended over ``grid.overlap`` pixels (A1111 ``combine_grid``)."""
    o = grid.overlap
    out = Image.new("RGB", (grid.image_w, grid.image_h))
    for y, h, row in grid.rows:
        line = Image.new("RGB", (grid.image_w, h))
        for x, w, tile in row:
            if x == 0 or o == 0:
                line.paste(tile, (x, 0))
                continue
            line.paste(tile.crop((0, 0, o, h)), (x, 0), mask=_ramp(o, 1, h))
            line.paste(tile.crop((o, 0, w, h)), (x + o, 0))
        if y == 0 or o == 0:
            out.paste(line, (0, y))
            continue
        out.paste(line.crop((0, 0, grid.image_w, o)), (0, y), mask=_ramp(o, 0, grid.image_w))
        out.paste(line.crop((0, o, grid.image_w, h)), (0, y + o))
    return out


def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A1111's upscale target: each side times ``scale``, rounded down to a multiple of 8."""
    return int((width * scale) // 8 * 8), int((height * scale) // 8 * 8)


def upscale_image(image: Image.Image, scale: float, upscaler: str, engine: Engine | None = None) -> Image.Image:
    """Step 1 of the module docstring: ``upscaler`` is "lanczos", "none" or an upscaler model (name or path, looked
    up through ``engine``'s model manager)."""
    name = upscaler.strip()
    if name.lower() == "none":
        return image
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"SD upscale factor must be a positive number, got {scale}")
    tw, th = target_size(image.width, image.height, scale)
    if tw < 8 or th < 8:
        raise ConfigError(f"SD upscale by {scale} makes {image.width}x{image.height} smaller than 8 pixels")
    if image.width >= tw and image.height >= th:  # A1111 runs no upscaler pass then, only the resize
        return image.resize((tw, th), Image.Resampling.LANCZOS) if image.size != (tw, th) else image
    if name.lower() == "lanczos":
        out = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.LANCZOS)
        return out if out.size == (tw, th) else out.resize((tw, th), Image.Resampling.LANCZOS)
    if engine is None:
        raise ConfigError(f"upscaler {upscaler!r} is a model: SD upscale needs the engine to load it")
    model = engine.manager.get("upscaler", resolve_upscaler(engine.manager, name))
    return upscale(model, image, size=(tw, th), device=engine.device)


@dataclass
class SDUpscaleResult:
    """The upscaled images (one per ``n_iter``), their infotexts and start seeds, and the tile grid's shape."""

    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    grid: tuple[int, int]  # (columns, rows)
    warnings: list[str] = field(default_factory=list)


def _tile_runs(n_tiles: int, batch_size: int, per_tile: bool) -> list[tuple[int, int, int]]:
    """(first tile, tile count, seed offset) of each generate call: A1111 batches of ``batch_size`` at offsets
    0, 1, 2, ...; ``per_tile``: one tile a call, at the offset its batch and place would give it."""
    runs = []
    for i in range(math.ceil(n_tiles / batch_size)):
        first, count = i * batch_size, min(batch_size, n_tiles - i * batch_size)
        runs.extend([(first + k, 1, i + k) for k in range(count)] if per_tile else [(first, count, i)])
    return runs


def sd_upscale(engine: Engine, image: Image.Image, params: GenerationParams, *, scale: float = 2.0,
               upscaler: str = "lanczos", overlap: int = 64,
               on_tile: Callable[[int, int], None] | None = None) -> SDUpscaleResult:
    """SD upscale of ``image`` (see the module docstring) with ``params`` as the img2img request of every tile.

    ``params.width`` / ``height``: the tile size (None: 512); ``denoising_strength``, prompts, sampler, ControlNet
    units ... as for img2img; ``seed`` / ``subseed`` -1 are fixed first. ``on_tile(done, total)`` follows progress.
    """
    if params.init_images or params.inpaint is not None or params.hires is not None:
        raise ConfigError("SD upscale takes the image itself; leave init_images, inpaint and hires unset")
    tile_w, tile_h = params.width or 512, params.height or 512
    if overlap < 0 or overlap >= min(tile_w, tile_h):
        raise ConfigError(f"SD upscale overlap {overlap}: use 0 or more, under the tile size ({tile_w}x{tile_h})")
    big = upscale_image(flatten(image), scale, upscaler, engine)
    if big.width < tile_w or big.height < tile_h:
        raise ConfigError(f"the upscaled image ({big.width}x{big.height}) is smaller than a {tile_w}x{tile_h} tile; "
                          "use a larger scale or smaller tiles (--width / --height)")
    grid = split_grid(big, tile_w, tile_h, overlap)
    tiles = grid.tiles
    seed, subseed = fixed_seed(params.seed), fixed_seed(params.subseed)
    per_tile = any(u.image is None for u in params.controlnets)
    runs = _tile_runs(len(tiles), params.batch_size, per_tile)
    key = upscaler.strip().lower()
    name = {"none": "None", "lanczos": "Lanczos"}.get(key) or resolve_upscaler(engine.manager, upscaler).stem
    images: list[Image.Image] = []
    infotexts: list[str] = []
    seeds: list[int] = []
    warnings: list[str] = []
    info, done = "", 0
    for n in range(params.n_iter):
        results: list[Image.Image] = []
        for first, count, offset in runs:
            part = tiles[first : first + count]
            units = [u if u.image is not None else dataclasses.replace(u, image=part[0]) for u in params.controlnets]
            request = dataclasses.replace(params, init_images=part, batch_size=count, n_iter=1, width=tile_w,
                                          height=tile_h, seed=seed + n + offset, subseed=subseed, controlnets=units)
            out: GenerationResult = engine.generate(request)
            warnings.extend(w for w in out.warnings if w not in warnings)
            results.extend(out.images)
            if n == 0 and first == 0:
                info = out.infotexts[0]
            done += count
            if on_tile is not None:
                on_tile(done, len(tiles) * params.n_iter)
        images.append(combine_grid(grid.with_tiles(results)))
        seeds.append(seed + n)
        infotexts.append(f"{info}, SD upscale overlap: {overlap}, SD upscale upscaler: {name}")
    for im, text in zip(images, infotexts, strict=True):
        im.info["parameters"] = text
    return SDUpscaleResult(images, infotexts, seeds, (len(grid.rows[0][2]), len(grid.rows)), warnings)
