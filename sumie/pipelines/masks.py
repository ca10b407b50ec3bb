"""Inpainting masks as A1111 1.10 prepares them: binary masks from files, the mask blur, "only masked" crop regions,
the latent-size mask (``nmask``) and the full-size mask tensor of 9-channel inpainting UNets.

Sources (A1111 1.10): ``modules/masking.py`` (``get_crop_region_v2``, ``expand_crop_region``) and
``modules/processing.py`` (``create_binary_mask``, the img2img ``init`` mask handling).

Quirks kept on purpose (each is what A1111 does):

* The mask blur is OpenCV's ``GaussianBlur`` on uint8, x then y as two separate passes, kernel size
  ``2 * int(2.5 * blur + 0.5) + 1``, BORDER_REFLECT_101. OpenCV's uint8 path is bit-exact fixed point: the kernel
  is rounded to 8 fractional bits by error diffusion, the accumulator is integer, the result is rounded half up.
  :func:`gaussian_blur_1d` reproduces it in numpy (equal to cv2 4.10 and 5.0 on every tested input).
* The latent mask is the processing-size mask resized to latent size with PIL bicubic and rounded half to even;
  the inpainting-model mask is ``torch.round`` of the full-size mask, downsampled with nearest.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from sumie.errors import ConfigError
from sumie.pipelines.images import ImageError, Region, _check_size, _open, resize_image


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


def mask_to_tensor(mask: Image.Image) -> Tensor:
    """Mask image -> [1, 1, H, W] float32 in [0, 1] (``np.array(mask.convert('L')) / 255``)."""
    return torch.from_numpy(np.array(mask.convert("L")).astype(np.float32) / 255.0)[None, None]
