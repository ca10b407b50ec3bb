"""Image and mask operations for img2img, inpainting and outpainting, exactly as A1111 1.10 computes them.

Sources (A1111 1.10): ``modules/images.py`` (``resize_image``, ``flatten``, ``read``), ``modules/masking.py``
(``get_crop_region_v2``, ``expand_crop_region``, ``fill``), ``modules/processing.py``
(``StableDiffusionProcessingImg2Img.init``, ``create_binary_mask``, ``inpainting_image_conditioning``,
``apply_overlay``/``uncrop``, the uint8 conversion of decoded samples) and ``scripts/poor_mans_outpainting.py``.
The PIL operations are the same PIL calls, so they agree with A1111 to the byte on the same Pillow version.

Quirks kept on purpose (each is what A1111 does):

* The mask blur is OpenCV's ``GaussianBlur`` on uint8, x then y as two separate passes, kernel size
  ``2 * int(2.5 * blur + 0.5) + 1``, BORDER_REFLECT_101. OpenCV's uint8 path is bit-exact fixed point: the kernel
  is rounded to 8 fractional bits by error diffusion, the accumulator is integer, the result is rounded half up.
  :func:`gaussian_blur_1d` reproduces it in numpy (equal to cv2 4.10 and 5.0 on every tested input).
* "Resize and fill" fills the empty bands with a bicubic resize of a zero-height box at the edge, which is
  ``1.125 * edge row - 0.125 * next row`` rather than a plain copy of the edge row.
* The latent mask is the processing-size mask resized to latent size with PIL bicubic and rounded half to even;
  the inpainting-model mask is ``torch.round`` of the full-size mask, downsampled with nearest.
* Masked content "fill" (``masking.fill``) is also applied to the init image for "latent noise" and
  "latent nothing" (A1111 runs it whenever the fill is not "original").
* A1111 truncates decoded images to uint8 (``(255. * x).astype(uint8)``); diffusers rounds. Both in :func:`to_image`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError
from torch import Tensor

from sumie.errors import ConfigError, SumieError
from sumie.pipelines.params import Convention, InpaintFill, InpaintParams, ResizeMode

Rounding = Literal["truncate", "round"]
OutpaintFill = Literal["edge", "noise", "color"]
Region = tuple[int, int, int, int]

RESIZE_MODES: dict[str, int] = {"just_resize": 0, "crop_and_resize": 1, "resize_and_fill": 2}
FILLS: tuple[str, ...] = ("fill", "original", "latent_noise", "latent_nothing")
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


def create_binary_mask(mask: Image.Image, round_mask: bool = True) -> Image.Image:
    """A1111 ``create_binary_mask``: an RGBA mask with some transparency -> its alpha (> 128 -> 255), else 'L'."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        alpha = mask.split()[-1].convert("L")
        return alpha.point(lambda v: 255 if v > 128 else 0) if round_mask else alpha
    return mask.convert("L")


def load_mask(
    path_or_image: str | os.PathLike | Image.Image, size: tuple[int, int], resize: bool = False, round_mask: bool = True
) -> Image.Image:
    """A mask as 'L' of ``size`` = (width, height) of the init image; white (255) is repainted.

    A transparent RGBA mask uses its alpha channel (A1111's ``create_binary_mask``). A mask of another size is an
    error unless ``resize=True``: then it is stretched to ``size`` with Lanczos, as A1111 (which resizes image and
    mask separately to the processing size, misaligning them when their aspect ratios differ) effectively does.
    """
    if isinstance(path_or_image, Image.Image):
        mask = path_or_image
        name = "mask image"
    else:
        mask = _open(path_or_image, "mask")
        name = f"mask {os.fspath(path_or_image)!r}"
    mask = create_binary_mask(mask, round_mask=round_mask)
    w, h = size
    if mask.size != (w, h):
        if not resize:
            raise ImageError(
                f"{name} is {mask.width}x{mask.height} but the image is {w}x{h}; "
                "use a mask of the image's size, or ask for it to be resized (resize=True / --mask-resize)"
            )
        mask = resize_image(mask, w, h, "just_resize")
    return mask


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


# ------------------------------------------------------------------------------------------------------- mask blur


def blur_kernel_size(sigma: float) -> int:
    """A1111's kernel size for a mask blur of ``sigma``: ``2 * int(2.5 * sigma + 0.5) + 1``."""
    return 2 * int(2.5 * sigma + 0.5) + 1


def gaussian_kernel_fixed(sigma: float, size: int) -> np.ndarray:
    """OpenCV's bit-exact uint8 Gaussian kernel: [size] int64 weights in units of 1/256 summing to 256.

    ``getGaussianKernelBitExact`` (exp(-x^2 / (2 sigma^2)) normalized to sum 1) then
    ``getGaussianKernelFixedPoint_ED``: the left half rounded (half to even) with the rounding error carried to
    the next tap, mirrored, and the centre tap set so that the sum is exactly 256.
    """
    if size < 1 or size % 2 == 0:
        raise ConfigError(f"Gaussian kernel size {size} must be odd and positive")
    if sigma <= 0:
        raise ConfigError(f"Gaussian sigma {sigma} must be positive")
    half = (size - 1) // 2
    scale = -0.125 / (float(sigma) * float(sigma))  # x runs over 1 - n, 3 - n, ...: twice the offset from centre
    values = [math.exp(float((1 - size + 2 * i) ** 2) * scale) for i in range(half)]
    inv = 1.0 / (2.0 * sum(values) + 1.0)
    kernel = np.zeros(size, dtype=np.int64)
    err = 0.0
    for i, t in enumerate(values):
        adjusted = t * inv * 256.0 + err
        v = round(adjusted)  # Python rounds half to even, like cvRound
        err = adjusted - v
        kernel[i] = kernel[size - 1 - i] = v
    kernel[half] = 256 - 2 * int(kernel[:half].sum())
    return kernel


def reflect101(index: np.ndarray, length: int) -> np.ndarray:
    """OpenCV BORDER_REFLECT_101 (``gfedcb|abcdefgh|gfedcba``), repeated for indices further than one length."""
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    index = np.abs(index) % period
    return np.where(index >= length, period - index, index)


def gaussian_blur_1d(arr: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """``cv2.GaussianBlur`` of a uint8 [H, W] array along one axis (axis 1: ksize (k, 1); axis 0: (1, k)).

    Kernel size as A1111 (:func:`blur_kernel_size`), border REFLECT_101, integer accumulation of
    uint8 x (weights / 256), result rounded half up: ``(acc + 128) >> 8``.
    """
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise ConfigError(f"gaussian_blur_1d expects a 2-D uint8 array, got {arr.dtype} {arr.shape}")
    size = blur_kernel_size(sigma)
    kernel = gaussian_kernel_fixed(sigma, size)
    radius = size // 2
    src = np.moveaxis(arr, axis, -1).astype(np.int32)
    length = src.shape[-1]
    padded = src[..., reflect101(np.arange(-radius, length + radius), length)]
    acc = kernel[radius] * padded[..., radius : radius + length]
    tmp = np.empty_like(acc)
    for j, w in enumerate(kernel[:radius].tolist()):  # the kernel is symmetric: add mirrored taps in pairs
        if w:
            np.add(padded[..., j : j + length], padded[..., size - 1 - j : size - 1 - j + length], out=tmp)
            tmp *= w
            acc += tmp
    out = np.minimum((acc + 128) >> 8, 255).astype(np.uint8)
    return np.ascontiguousarray(np.moveaxis(out, -1, axis))


def prepare_mask(
    mask: Image.Image, blur: float = 4, invert: bool = False, blur_y: float | None = None, round_mask: bool = True
) -> Image.Image:
    """A1111's mask preparation before resizing: binary mask, optional invert, Gaussian blur in x then in y -> 'L'.

    ``blur`` is A1111's ``mask_blur_x`` and ``blur_y`` its ``mask_blur_y`` (defaults to ``blur``); 0 skips a pass.
    """
    blur_y = blur if blur_y is None else blur_y
    if blur < 0 or blur_y < 0:
        raise ConfigError(f"mask blur {blur}/{blur_y} must be >= 0")
    out = create_binary_mask(mask, round_mask=round_mask)
    if invert:
        out = ImageOps.invert(out)
    arr = np.array(out)
    if blur > 0:
        arr = gaussian_blur_1d(arr, blur, axis=1)
    if blur_y > 0:
        arr = gaussian_blur_1d(arr, blur_y, axis=0)
    return Image.fromarray(arr, mode="L") if (blur > 0 or blur_y > 0) else out


def overlay_mask(mask: Image.Image) -> Image.Image:
    """A1111's ``mask_for_overlay`` when not "only masked": the processing-size mask doubled and clipped, 'L'."""
    arr = np.array(mask.convert("L")).astype(np.float32)
    return Image.fromarray(np.clip(arr * 2, 0, 255).astype(np.uint8), mode="L")


# ---------------------------------------------------------------------------------------------------- only masked


def get_crop_region(mask: Image.Image | np.ndarray, pad: int = 0) -> Region | None:
    """A1111 ``masking.get_crop_region_v2``: bounding box (x1, y1, x2, y2) of non-zero mask pixels grown by ``pad``.

    None for an all-black mask (A1111 then drops the mask and does plain img2img).
    """
    if pad < 0:
        raise ConfigError(f"inpaint padding {pad} must be >= 0")
    img = mask if isinstance(mask, Image.Image) else Image.fromarray(mask)
    box = img.getbbox()
    if not box:
        return None
    if not pad:
        return box
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, img.width), min(y2 + pad, img.height)


def _grow_span(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    """Widen [lo, hi) by ``diff`` around its centre, shift it back inside [0, limit), clip if still too large."""
    lo, hi = lo - diff // 2, hi + diff - diff // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def expand_crop_region(region: Region, width: int, height: int, image_w: int, image_h: int) -> Region:
    """A1111 ``masking.expand_crop_region``: grow the shorter side so the region has the processing aspect ratio.

    The region is shifted back inside the image when it overflows and clipped if it is still too large.
    """
    x1, y1, x2, y2 = region
    ratio_crop = (x2 - x1) / (y2 - y1)
    ratio_proc = width / height
    if ratio_crop > ratio_proc:
        y1, y2 = _grow_span(y1, y2, int((x2 - x1) / ratio_proc - (y2 - y1)), image_h)
    else:
        x1, x2 = _grow_span(x1, x2, int((y2 - y1) * ratio_proc - (x2 - x1)), image_w)
    return x1, y1, x2, y2


def crop_for_processing(img: Image.Image, region: Region, width: int, height: int) -> Image.Image:
    """Only masked: the region cut out and brought to the processing size with "resize and fill" (A1111 mode 2)."""
    return resize_image(img.crop(region), width, height, "resize_and_fill")


def make_overlay(image: Image.Image, mask_for_overlay: Image.Image) -> Image.Image:
    """A1111's overlay: the image as premultiplied RGBa pasted through the inverted mask, returned as RGBA."""
    if mask_for_overlay.size != image.size:
        mask_for_overlay = resize_image(mask_for_overlay, image.width, image.height, "just_resize")
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    return masked.convert("RGBA")


def uncrop(generated: Image.Image, size: tuple[int, int], paste_to: Region) -> Image.Image:
    """A1111 ``uncrop``: the generated crop, "crop and resize"d to (w, h), on a transparent canvas at (x, y)."""
    x, y, w, h = paste_to
    base = Image.new("RGBA", size)
    base.paste(resize_image(generated, w, h, "crop_and_resize"), (x, y))
    return base


def apply_overlay(generated: Image.Image, overlay: Image.Image | None, paste_to: Region | None = None) -> Image.Image:
    """A1111 ``apply_overlay``: uncrop when ``paste_to`` = (x, y, w, h), then alpha-composite the overlay -> RGB."""
    if overlay is None:
        return generated.convert("RGB")
    image = uncrop(generated, overlay.size, paste_to) if paste_to is not None else generated
    image = image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")


def paste_back(
    original: Image.Image, generated: Image.Image, region: Region | None, mask_for_overlay: Image.Image
) -> Image.Image:
    """The generated image over the original: uncropped into ``region`` (x1, y1, x2, y2) when "only masked",
    then the original composited back wherever ``mask_for_overlay`` is not white."""
    paste_to = None if region is None else (region[0], region[1], region[2] - region[0], region[3] - region[1])
    return apply_overlay(generated, make_overlay(original.convert("RGB"), mask_for_overlay), paste_to)


# ---------------------------------------------------------------------------------------------------- masked content


def fill_masked_image(img: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111 ``masking.fill``: the unmasked colours blurred into the masked area (radii 256, 64, 16, 4, 2, 0) -> RGB.

    Each pass alpha-composites a Gaussian blur of the premultiplied image-with-holes over the previous result, so
    unmasked pixels end as their original colour and masked ones as the nearest colours, smoothly.
    """
    if mask.size != img.size:
        raise ImageError(f"fill: mask is {mask.width}x{mask.height} but the image is {img.width}x{img.height}")
    out = Image.new("RGBA", img.size)
    holes = Image.new("RGBa", img.size)
    holes.paste(img.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    holes = holes.convert("RGBa")
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = holes.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def normalize_fill(fill: InpaintFill | str | int) -> str:
    """A masked-content name ("fill", "original", "latent_noise", "latent_nothing"; A1111's 0-3 or spaced names)."""
    if isinstance(fill, int) and not isinstance(fill, bool) and 0 <= fill < len(FILLS):
        return FILLS[fill]
    if isinstance(fill, str):
        key = fill.strip().lower().replace(" ", "_")
        if key in FILLS:
            return key
    raise ConfigError(f"masked content {fill!r} is not valid; use one of {', '.join(FILLS)}")


def latent_mask(mask: Image.Image, latent_h: int, latent_w: int, round_mask: bool = True) -> Tensor:
    """A1111's ``nmask``: [1, 1, h, w] float32, 1 where the latent is repainted.

    ``mask.convert('RGB').resize((w, h))`` (PIL bicubic, the default), red channel / 255, ``np.around`` (half to
    even; A1111's ``mask_round``, on by default).
    """
    _check_size(latent_w, latent_h, "latent size")
    small = mask.convert("RGB").resize((latent_w, latent_h), resample=Image.Resampling.BICUBIC)
    m = np.moveaxis(np.array(small, dtype=np.float32), 2, 0)[0] / 255
    if round_mask:
        m = np.around(m)
    return torch.from_numpy(np.ascontiguousarray(m))[None, None]


def apply_latent_fill(
    latent: Tensor, latent_mask: Tensor, fill: InpaintFill | str, noise: Tensor | None = None
) -> Tensor:
    """Masked content in latent space: "latent_noise" -> ``latent * (1 - m) + noise * m``, "latent_nothing" ->
    ``latent * (1 - m)``; "fill" and "original" leave the latent as is. m: [1, 1, h, w] from :func:`latent_mask`."""
    kind = normalize_fill(fill)
    if kind in ("fill", "original"):
        return latent
    m = latent_mask.to(device=latent.device, dtype=latent.dtype)
    keep = (1.0 - latent_mask).to(device=latent.device, dtype=latent.dtype)
    if kind == "latent_nothing":
        return latent * keep
    if noise is None or noise.shape != latent.shape:
        got = None if noise is None else list(noise.shape)
        raise ConfigError(f"latent noise fill needs noise of the latent's shape {list(latent.shape)}, got {got}")
    return latent * keep + noise.to(device=latent.device, dtype=latent.dtype) * m


# ------------------------------------------------------------------------------------------- inpainting-model input


def mask_to_tensor(mask: Image.Image) -> Tensor:
    """Mask image -> [1, 1, H, W] float32 in [0, 1] (``np.array(mask.convert('L')) / 255``)."""
    return torch.from_numpy(np.array(mask.convert("L")).astype(np.float32) / 255.0)[None, None]


Encoder = Callable[[Tensor], Tensor]


def _encode(vae: object, x: Tensor, generator: torch.Generator | None, sample: bool) -> Tensor:
    """Scaled latents of images in [-1, 1] from an AutoencoderKL-like VAE, or from a callable encoder."""
    if hasattr(vae, "encode") and hasattr(vae, "scale_latents"):
        posterior = vae.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return vae.scale_latents(z)
    if callable(vae):
        return vae(x)
    raise ConfigError("inpaint_model_inputs needs an AutoencoderKL or a callable image -> scaled latent")


def inpaint_model_inputs(
    image_tensor: Tensor,
    mask_tensor: Tensor,
    vae: object | Encoder,
    convention: Convention = "a1111",
    mask_weight: float = 1.0,
    round_mask: bool = True,
    generator: torch.Generator | None = None,
    sample: bool = True,
) -> tuple[Tensor, Tensor]:
    """(masked-image latent [B, 4, h, w], mask latent [B, 1, h, w]) for 9-channel inpainting UNets.

    The UNet input is ``cat([x, mask_latent, masked_image_latent], 1)``. image: [B, 3, H, W] in [-1, 1];
    mask: [1 or B, 1, H, W] in [0, 1], 1 = repaint.
    a1111 (``inpainting_image_conditioning``): m = round(mask) (half to even; ``mask_round``), masked image =
    ``lerp(image, image * (1 - m), mask_weight)`` (``inpainting_mask_weight``, default 1), mask latent = nearest
    downsample of m to the latent size.
    diffusers (``prepare_mask_latents``): m = (mask >= 0.5) (its ``binarize``), masked image = ``image * (m < 0.5)``,
    mask latent = nearest downsample to (H // 8, W // 8). The two differ only for mask values of exactly 0.5 and
    for ``mask_weight`` < 1; diffusers does not blur the mask (A1111 blurs it before, see :func:`prepare_mask`).
    The VAE encodes with ``posterior.sample(generator)`` (both references) or the mean when ``sample=False``.
    """
    if image_tensor.ndim != 4 or mask_tensor.ndim != 4 or mask_tensor.shape[1] != 1:
        raise ConfigError(
            f"inpaint_model_inputs expects image [B, 3, H, W] and mask [B, 1, H, W], got "
            f"{list(image_tensor.shape)} and {list(mask_tensor.shape)}"
        )
    if mask_tensor.shape[-2:] != image_tensor.shape[-2:]:
        raise ImageError(
            f"inpainting mask is {mask_tensor.shape[-1]}x{mask_tensor.shape[-2]} but the image is "
            f"{image_tensor.shape[-1]}x{image_tensor.shape[-2]}; resize the mask to the image"
        )
    batch = image_tensor.shape[0]
    if convention == "a1111":
        m = torch.round(mask_tensor) if round_mask else mask_tensor
        m = m.to(device=image_tensor.device, dtype=image_tensor.dtype)
        masked = torch.lerp(image_tensor, image_tensor * (1.0 - m), mask_weight)
        latent = _encode(vae, masked, generator, sample)
        mask_latent = F.interpolate(m, size=latent.shape[-2:])
    elif convention == "diffusers":
        if mask_weight != 1.0:
            raise ConfigError("mask_weight (A1111 inpainting_mask_weight) exists only in the a1111 convention")
        m = torch.where(mask_tensor < 0.5, 0.0, 1.0).to(device=image_tensor.device, dtype=image_tensor.dtype)
        masked = image_tensor * (m < 0.5)
        latent = _encode(vae, masked, generator, sample)
        h, w = image_tensor.shape[-2:]
        mask_latent = F.interpolate(m, size=(h // 8, w // 8))
    else:
        raise ConfigError(f"convention {convention!r} is not valid; use 'a1111' or 'diffusers'")
    mask_latent = mask_latent.expand(max(latent.shape[0], batch), -1, -1, -1)
    return latent, mask_latent.to(latent.dtype)


def txt2img_inpaint_inputs(
    batch: int,
    height: int,
    width: int,
    vae: object | Encoder,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    sample: bool = True,
) -> tuple[Tensor, Tensor]:
    """A1111 1.10 ``txt2img_image_conditioning`` for inpainting models: a mid-grey image (0 in [-1, 1]) fully masked."""
    grey = torch.zeros(batch, 3, height, width, dtype=dtype, device=device)
    latent = _encode(vae, grey, generator, sample)
    return latent, torch.ones(latent.shape[0], 1, *latent.shape[-2:], dtype=latent.dtype, device=latent.device)


# --------------------------------------------------------------------------------------------------- whole inpaint


@dataclass
class InpaintInputs:
    """One init image prepared as A1111's img2img ``init`` does, ready for the VAE and the sampler."""

    image: Image.Image  # processing-size RGB for the VAE (filled unless fill == "original")
    mask: Image.Image | None  # processing-size mask (A1111 image_mask): the inpainting-model mask
    latent_mask_source: Image.Image | None  # mask for :func:`latent_mask` (A1111 latent_mask; = mask by default)
    overlay: Image.Image | None  # RGBA original with the repainted area transparent, for :func:`apply_overlay`
    paste_to: Region | None  # (x, y, w, h) of the crop in the original ("only masked"), else None
    crop_region: Region | None  # (x1, y1, x2, y2) of the crop, else None


def prepare_inpaint(
    image: Image.Image,
    inpaint: InpaintParams,
    width: int,
    height: int,
    resize_mode: ResizeMode | int = "just_resize",
    latent_mask_image: Image.Image | None = None,
    background: str = BACKGROUND,
) -> InpaintInputs:
    """A1111 1.10 ``StableDiffusionProcessingImg2Img.init`` for one image with a mask.

    Mask: binary, inverted if asked, blurred (``mask_blur`` in x and y). "Only masked": crop region of the blurred
    mask grown by the padding and to the processing aspect ratio, image and mask cropped and "resize and fill"ed to
    (width, height); a blank mask falls back to plain img2img (mask None). Otherwise image and mask are resized with
    ``resize_mode`` and the overlay mask is the mask doubled. The image is then filled (``masking.fill`` with the
    processing-size mask) unless the fill is "original". ``latent_mask_image`` overrides the mask used for the fill
    and the latent mask (A1111 ``p.latent_mask``; outpainting scripts set it).
    """
    _check_size(width, height, "processing size")
    fill = normalize_fill(inpaint.fill)
    mode = resize_mode_index(resize_mode)
    if inpaint.mask.size != image.size:
        raise ImageError(
            f"mask is {inpaint.mask.width}x{inpaint.mask.height} but the image is {image.width}x{image.height}; "
            "use a mask of the image's size, or load it with load_mask(..., resize=True)"
        )
    mask = prepare_mask(inpaint.mask, inpaint.mask_blur, inpaint.invert)
    crop_region = paste_to = None
    image_mask: Image.Image | None
    if inpaint.full_res:
        for_overlay: Image.Image | None = mask
        crop_region = get_crop_region(mask, inpaint.full_res_padding)
        if crop_region is not None:
            crop_region = expand_crop_region(crop_region, width, height, mask.width, mask.height)
            x1, y1, x2, y2 = crop_region
            image_mask = resize_image(mask.crop(crop_region), width, height, "resize_and_fill")
            paste_to = (x1, y1, x2 - x1, y2 - y1)
        else:
            image_mask = for_overlay = None
    else:
        image_mask = resize_image(mask, width, height, mode)
        for_overlay = overlay_mask(image_mask)
    fill_mask = latent_mask_image if latent_mask_image is not None else image_mask

    img = flatten(image, background)
    if crop_region is None:
        img = resize_image(img, width, height, mode)
    overlay = make_overlay(img, for_overlay) if image_mask is not None and for_overlay is not None else None
    if crop_region is not None:
        img = crop_for_processing(img, crop_region, width, height)
    if image_mask is not None and fill != "original":
        img = fill_masked_image(img, fill_mask)
    if image_mask is None:
        fill_mask = None
    return InpaintInputs(img, image_mask, fill_mask, overlay, paste_to, crop_region)


# ------------------------------------------------------------------------------------------------------ outpainting


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
