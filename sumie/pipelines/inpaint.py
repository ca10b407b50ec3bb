"""Inpainting as A1111 1.10's img2img ``init`` prepares it: crops and overlays, masked content, the inputs of
9-channel inpainting UNets, and the whole per-image preparation (:func:`prepare_inpaint`).

Sources (A1111 1.10): ``modules/masking.py`` (``fill``), ``modules/processing.py``
(``StableDiffusionProcessingImg2Img.init``, ``inpainting_image_conditioning``, ``apply_overlay``/``uncrop``).

Quirks kept on purpose (each is what A1111 does): masked content "fill" (``masking.fill``) is also applied to the
init image for "latent noise" and "latent nothing" (A1111 runs it whenever the fill is not "original").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor

from sumie.errors import ConfigError
from sumie.pipelines.images import (
    BACKGROUND,
    ImageError,
    Region,
    _check_size,
    flatten,
    resize_image,
    resize_mode_index,
)
from sumie.pipelines.masks import expand_crop_region, get_crop_region, overlay_mask, prepare_mask
from sumie.pipelines.params import Convention, InpaintFill, InpaintParams, ResizeMode

FILLS: tuple[str, ...] = ("fill", "original", "latent_noise", "latent_nothing")


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


# image [B, 3, H, W] in [-1, 1] -> scaled latent [B, C, h, w], e.g. ``lambda x: vae_io.encode(vae, x)``
Encoder = Callable[[Tensor], Tensor]


def inpaint_model_inputs(
    image_tensor: Tensor,
    mask_tensor: Tensor,
    encode: Encoder,
    convention: Convention = "a1111",
    mask_weight: float = 1.0,
    round_mask: bool = True,
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
    ``encode`` is the VAE: both references sample the posterior with the image's generator; A1111 convention runs
    use its mean (see :func:`sumie.pipelines.vae_io.encode`).
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
        latent = encode(masked)
        mask_latent = F.interpolate(m, size=latent.shape[-2:])
    elif convention == "diffusers":
        if mask_weight != 1.0:
            raise ConfigError("mask_weight (A1111 inpainting_mask_weight) exists only in the a1111 convention")
        m = torch.where(mask_tensor < 0.5, 0.0, 1.0).to(device=image_tensor.device, dtype=image_tensor.dtype)
        masked = image_tensor * (m < 0.5)
        latent = encode(masked)
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
    encode: Encoder,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """A1111 1.10 ``txt2img_image_conditioning`` for inpainting models: a mid-grey image (0 in [-1, 1]) fully masked."""
    grey = torch.zeros(batch, 3, height, width, dtype=dtype, device=device)
    latent = encode(grey)
    return latent, torch.ones(latent.shape[0], 1, *latent.shape[-2:], dtype=latent.dtype, device=latent.device)


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
