"""Outpainting: the padded canvas and its mask (A1111's poor man's outpainting, generalised to any side)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from sumie.errors import ConfigError

OutpaintFill = Literal["edge", "noise", "color"]


def outpaint_mask(size: tuple[int, int], left: int, right: int, top: int, bottom: int, overlap: int) -> Image.Image:
    """Poor man's outpainting mask 'L' of ``size``: white except a black rectangle over the kept image, inset by
    ``overlap`` on every padded side. As A1111, the rectangle is PIL-inclusive: the right/bottom overlap is one
    pixel narrower than the left/top one."""
    w, h = size
    mask = Image.new("L", (w, h), "white")
    ImageDraw.Draw(mask).rectangle(
        (
            left + (overlap if left > 0 else 0),
            top + (overlap if top > 0 else 0),
            w - right - (overlap if right > 0 else 0),
            h - bottom - (overlap if bottom > 0 else 0),
        ),
        fill="black",
    )
    return mask


def outpaint_padding(
    image_w: int, image_h: int, left: int, right: int, top: int, bottom: int, multiple: int = 8
) -> tuple[int, int, int, int]:
    """Padding grown so the canvas is a multiple of ``multiple``, the extra shared as poor man's outpainting does
    (left gets ``left * extra // (left + right)``, right the rest); with no padding on an axis the extra goes to
    the right / bottom (A1111 would leave it black and unmasked)."""
    for name, v in (("left", left), ("right", right), ("top", top), ("bottom", bottom)):
        if not isinstance(v, int) or v < 0:
            raise ConfigError(f"outpaint {name} = {v!r} must be a non-negative integer")
    if left + right + top + bottom == 0:
        raise ConfigError("outpainting needs padding on at least one side (left, right, top or bottom > 0)")
    if multiple < 1:
        raise ConfigError(f"outpaint multiple {multiple} must be >= 1")

    def share(size: int, a: int, b: int) -> tuple[int, int]:
        target = math.ceil((size + a + b) / multiple) * multiple
        if b == 0 and a > 0:
            return target - size, 0
        a2 = a * (target - size) // (a + b) if a > 0 else 0
        return a2, target - size - a2

    left, right = share(image_w, left, right)
    top, bottom = share(image_h, top, bottom)
    return left, right, top, bottom


def outpaint_canvas(
    img: Image.Image,
    left: int,
    right: int,
    top: int,
    bottom: int,
    fill: OutpaintFill = "edge",
    overlap: int = 8,
    color: tuple[int, int, int] = (0, 0, 0),
    seed: int = 0,
    multiple: int = 8,
) -> tuple[Image.Image, Image.Image]:
    """(canvas RGB, mask 'L') for outpainting: the image padded on any side, the new area white in the mask.

    Padding grows so both sides are multiples of ``multiple`` (see :func:`outpaint_padding`; poor man's
    outpainting uses 64). The mask reaches ``overlap`` pixels into the old image on each padded side
    (:func:`outpaint_mask`). New pixels: "edge" repeats the border pixels, "noise" is uniform RGB noise from
    ``numpy.random.default_rng(seed)``, "color" is ``color`` (A1111's canvas is black). To match A1111's poor man's
    outpainting (UI mask blur b) on a canvas of one tile: ``multiple`` = 64, overlap = 2b, ``fill`` "color" black,
    then inpaint with ``mask_blur`` = 2b, masked content "fill" and latent mask
    ``outpaint_mask(canvas.size, *outpaint_padding(...), b // 2)``.
    """
    left, right, top, bottom = outpaint_padding(img.width, img.height, left, right, top, bottom, multiple)
    if overlap < 0:
        raise ConfigError(f"outpaint overlap {overlap} must be >= 0")
    if overlap * ((left > 0) + (right > 0)) >= img.width or overlap * ((top > 0) + (bottom > 0)) >= img.height:
        raise ConfigError(f"outpaint overlap {overlap} leaves nothing of the {img.width}x{img.height} image; lower it")
    src = np.asarray(img.convert("RGB"))
    pads = ((top, bottom), (left, right), (0, 0))
    if fill == "edge":
        canvas = np.pad(src, pads, mode="edge")
    elif fill == "color":
        if len(color) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in color):
            raise ConfigError(f"outpaint color {color!r} must be three integers in 0..255")
        canvas = np.empty((src.shape[0] + top + bottom, src.shape[1] + left + right, 3), dtype=np.uint8)
        canvas[:] = np.array(color, dtype=np.uint8)
        canvas[top : top + src.shape[0], left : left + src.shape[1]] = src
    elif fill == "noise":
        shape = (src.shape[0] + top + bottom, src.shape[1] + left + right, 3)
        canvas = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
        canvas[top : top + src.shape[0], left : left + src.shape[1]] = src
    else:
        raise ConfigError(f"outpaint fill {fill!r} is not valid; use 'edge', 'noise' or 'color'")
    out = Image.fromarray(canvas, mode="RGB")
    return out, outpaint_mask(out.size, left, right, top, bottom, overlap)
