"""Images in and out of the pipeline, as A1111 1.10 computes them: resizing (three resize modes), loading (EXIF
rotation, transparency flattened), image <-> tensor, and the uint8 conversion of decoded samples.

Sources (A1111 1.10): ``modules/images.py`` (``resize_image``, ``flatten``, ``read``) and the uint8 conversion in
``modules/processing.py``. The PIL operations are the same PIL calls, so they agree with A1111 to the byte on the same
Pillow version. Masks: :mod:`sumie.pipelines.masks`; inpainting: :mod:`sumie.pipelines.inpaint`; outpainting:
:mod:`sumie.pipelines.outpaint`.

Quirks kept on purpose (each is what A1111 does):

* "Resize and fill" fills the empty bands with a bicubic resize of a zero-height box at the edge, which is
  ``1.125 * edge row - 0.125 * next row`` rather than a plain copy of the edge row.
* A1111 truncates decoded images to uint8 (``(255. * x).astype(uint8)``); diffusers rounds. Both in :func:`to_image`.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from sumie.errors import ConfigError, SumieError
from sumie.pipelines.params import Convention, ResizeMode

Rounding = Literal["truncate", "round"]
Region = tuple[int, int, int, int]

RESIZE_MODES: dict[str, int] = {"just_resize": 0, "crop_and_resize": 1, "resize_and_fill": 2}
BACKGROUND = "#ffffff"  # A1111 opts.img2img_background_color: transparent init images are flattened onto it


class ImageError(SumieError):
    """An input image or mask cannot be read or does not fit the request."""


# ----------------------------------------------------------------------------------------------------------- resize


def resize_mode_index(mode: ResizeMode | int | str) -> int:
    """A1111's resize_mode number (0 just resize, 1 crop and resize, 2 resize and fill) for a name or number."""
    if isinstance(mode, bool):
        raise ConfigError(f"resize mode {mode!r} is not valid; use one of {', '.join(RESIZE_MODES)} (or 0, 1, 2)")
    if isinstance(mode, int):
        if mode in (0, 1, 2):
            return mode
    elif isinstance(mode, str):
        key = mode.strip().lower().replace(" ", "_").replace("-", "_")
        if key in RESIZE_MODES:
            return RESIZE_MODES[key]
    raise ConfigError(f"resize mode {mode!r} is not valid; use one of {', '.join(RESIZE_MODES)} (or 0, 1, 2)")


def _check_size(width: int, height: int, what: str = "size") -> None:
    """Positive integer width and height, else ConfigError."""
    if not (isinstance(width, int) and isinstance(height, int)) or width < 1 or height < 1:
        raise ConfigError(f"{what} {width}x{height} is not valid; width and height must be positive integers")


def _lanczos(img: Image.Image, w: int, h: int) -> Image.Image:
    """A1111 ``resize_image.resize`` with no upscaler configured (its default): PIL Lanczos, skipped at equal size."""
    if img.size == (w, h):
        return img.copy()
    return img.resize((w, h), resample=Image.Resampling.LANCZOS)


def resize_image(img: Image.Image, width: int, height: int, mode: ResizeMode | int = "just_resize") -> Image.Image:
    """A1111 ``images.resize_image``: 0 just resize, 1 crop and resize (centred), 2 resize and fill (edge stretch).

    Upscaling uses Lanczos (A1111's behaviour with ``upscaler_for_img2img`` = None, the default). Modes 1 and 2 paste
    onto a black canvas of the image's mode ("L" stays "L"; A1111 makes it "RGB", the same values after
    ``convert('L')``). A zero-size fill band is skipped (A1111 would raise inside PIL; only odd target sizes).
    """
    m = resize_mode_index(mode)
    _check_size(width, height, "target size")
    if img.width < 1 or img.height < 1:
        raise ImageError(f"cannot resize an empty {img.width}x{img.height} image")
    if m == 0:
        return _lanczos(img, width, height)
    canvas_mode = "L" if img.mode == "L" else "RGB"
    ratio = width / height
    src_ratio = img.width / img.height
    if m == 1:
        src_w = width if ratio > src_ratio else img.width * height // img.height
        src_h = height if ratio <= src_ratio else img.height * width // img.width
        resized = _lanczos(img, src_w, src_h)
        res = Image.new(canvas_mode, (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res
    src_w = width if ratio < src_ratio else img.width * height // img.height
    src_h = height if ratio >= src_ratio else img.height * width // img.width
    resized = _lanczos(img, src_w, src_h)
    res = Image.new(canvas_mode, (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_h = height // 2 - src_h // 2
        if fill_h > 0:
            res.paste(resized.resize((width, fill_h), box=(0, 0, width, 0)), box=(0, 0))
            bottom = (0, resized.height, width, resized.height)
            res.paste(resized.resize((width, fill_h), box=bottom), box=(0, fill_h + src_h))
    elif ratio > src_ratio:
        fill_w = width // 2 - src_w // 2
        if fill_w > 0:
            res.paste(resized.resize((fill_w, height), box=(0, 0, 0, height)), box=(0, 0))
            right = (resized.width, 0, resized.width, height)
            res.paste(resized.resize((fill_w, height), box=right), box=(fill_w + src_w, 0))
    return res


# ------------------------------------------------------------------------------------------------ loading / tensors


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    """Open and fully decode an image file with A1111's ``images.read`` fixes (EXIF rotation, PNG transparency)."""
    name = os.fspath(path)
    try:
        img = Image.open(name)
        img.load()
    except FileNotFoundError:
        raise ImageError(f"{what} {name!r}: file not found; check the path") from None
    except PermissionError:
        raise ImageError(f"{what} {name!r}: permission denied; make the file readable") from None
    except IsADirectoryError:
        raise ImageError(f"{what} {name!r}: is a directory; pass an image file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what} {name!r}: not an image PIL can read; use PNG, JPEG or WebP") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{what} {name!r}: cannot be decoded ({e}); re-save it as PNG") from None
    try:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGB", "P") and isinstance(img.info.get("transparency"), bytes):
            img = img.convert("RGBA")
    except Exception:  # A1111's fix_image ignores broken EXIF the same way
        pass
    return img


def flatten(img: Image.Image, background: str = BACKGROUND) -> Image.Image:
    """A1111 ``images.flatten``: an RGBA image over ``background``, then RGB (other modes: plain RGB conversion)."""
    if img.mode == "RGBA":
        base = Image.new("RGBA", img.size, background)
        base.paste(img, mask=img)
        img = base
    return img.convert("RGB")


def load_image(path: str | os.PathLike, background: str = BACKGROUND) -> Image.Image:
    """An init image as RGB: EXIF-rotated, transparency flattened onto ``background`` (A1111's white)."""
    return flatten(_open(path, "image"), background)


def to_tensor(img: Image.Image, dtype: torch.dtype = torch.float32, convention: Convention = "a1111") -> Tensor:
    """RGB image -> [1, 3, H, W] in [-1, 1]: ``v / 255`` in float32, then ``* 2 - 1``.

    A1111 casts to the VAE dtype before ``* 2 - 1``; diffusers normalizes in float32 and casts after (the same in
    float32, up to one half-precision rounding in fp16/bf16).
    """
    arr = np.asarray(img.convert("RGB")).astype(np.float32) / 255.0
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, 2, 0)))[None]
    if convention == "diffusers":
        return (2.0 * x - 1.0).to(dtype)
    if convention != "a1111":
        raise ConfigError(f"convention {convention!r} is not valid; use 'a1111' or 'diffusers'")
    return x.to(dtype) * 2 - 1


def to_image(x: Tensor, rounding: Rounding = "truncate") -> list[Image.Image]:
    """Decoded images [B, 3, H, W] in [-1, 1] -> RGB images.

    "truncate" (A1111): ``clamp((x.float() + 1) / 2, 0, 1)``, then ``(255. * v).astype(uint8)`` in float32.
    "round" (diffusers ``postprocess``): ``(x * 0.5 + 0.5).clamp(0, 1)`` in x's dtype, float32,
    ``(v * 255).round()`` (half to even), uint8.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ConfigError(f"to_image expects [B, 3, H, W], got {list(x.shape)}")
    if rounding == "truncate":
        v = torch.clamp((x.detach().float() + 1.0) / 2.0, min=0.0, max=1.0).cpu().numpy()
        arr = (255.0 * np.moveaxis(v, 1, 3)).astype(np.uint8)
    elif rounding == "round":
        v = (x.detach() * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        arr = (v * 255).round().astype("uint8")
    else:
        raise ConfigError(f"rounding {rounding!r} is not valid; use 'truncate' (A1111) or 'round' (diffusers)")
    return [Image.fromarray(a) for a in arr]
