"""``/extra-single-image`` and ``/extra-batch-images``: resizes with PIL (Lanczos, Nearest); model upscalers later."""

from __future__ import annotations

from PIL import Image

from sumie.serve.errors import ApiError
from sumie.serve.models import ExtrasRequest

__all__ = ["UPSCALERS", "postprocess"]

# A1111's built-in upscalers Sumie has (name -> PIL filter; "None" leaves the image as it is)
UPSCALERS: dict[str, Image.Resampling | None] = {"None": None, "Lanczos": Image.Resampling.LANCZOS,
                                                 "Nearest": Image.Resampling.NEAREST}


def _filter(name: str | None, field: str) -> Image.Resampling | None:
    key = {k.lower(): k for k in UPSCALERS}.get((name or "None").strip().lower())
    if key is None:
        raise ApiError(422, f"{field}: unknown upscaler {name!r}; this server has: {', '.join(UPSCALERS)}",
                       field=field)
    return UPSCALERS[key]


def _target(req: ExtrasRequest, w: int, h: int, max_pixels: int) -> tuple[int, int, float]:
    """(width, height, scale) of the upscale."""
    if req.resize_mode == 1:
        tw, th = int(req.upscaling_resize_w or 0), int(req.upscaling_resize_h or 0)
        if tw < 1 or th < 1:
            raise ApiError(422, "upscaling_resize_w / upscaling_resize_h must be >= 1", field="upscaling_resize_w")
        scale = max(tw / w, th / h)
    elif req.resize_mode in (0, None):
        scale = float(req.upscaling_resize if req.upscaling_resize is not None else 2.0)
        if not 0 < scale <= 16:
            raise ApiError(422, f"upscaling_resize must be in (0, 16], got {scale}", field="upscaling_resize")
        tw, th = max(1, int(w * scale)), max(1, int(h * scale))
    else:
        raise ApiError(422, f"resize_mode {req.resize_mode} is not valid; use 0 (scale by) or 1 (scale to)",
                       field="resize_mode")
    if tw * th > max_pixels:
        raise ApiError(422, f"the result would be {tw}x{th} = {tw * th} pixels, over this server's limit of "
                            f"{max_pixels}", field="upscaling_resize")
    return tw, th, scale


def postprocess(image: Image.Image, req: ExtrasRequest, max_pixels: int) -> tuple[Image.Image, str]:
    """One image through A1111's "Extras" upscale: (result, info text)."""
    if req.gfpgan_visibility or req.codeformer_visibility:
        raise ApiError(422, "gfpgan_visibility / codeformer_visibility: this server has no face restorers; send 0",
                       field="gfpgan_visibility")
    first, second = _filter(req.upscaler_1, "upscaler_1"), _filter(req.upscaler_2, "upscaler_2")
    image = image.convert("RGB")
    if first is None and second is None:
        return image, ""
    w, h = image.size
    tw, th, scale = _target(req, w, h, max_pixels)
    crop = req.resize_mode == 1 and req.upscaling_crop is not False

    def run(f: Image.Resampling | None) -> Image.Image:
        if f is None:
            return image.resize((tw, th), Image.Resampling.LANCZOS) if not crop else _cover(image, tw, th, scale,
                                                                                            Image.Resampling.LANCZOS)
        return _cover(image, tw, th, scale, f) if crop else image.resize((tw, th), f)

    out = run(first)
    visibility = float(req.extras_upscaler_2_visibility or 0.0)
    if second is not None and visibility > 0:
        out = Image.blend(out, run(second), min(visibility, 1.0))
    info = f"Postprocess upscale by: {scale:g}, Postprocess upscaler: {req.upscaler_1 or 'None'}"
    return out, info


def _cover(image: Image.Image, tw: int, th: int, scale: float, f: Image.Resampling) -> Image.Image:
    """Scale to cover (tw, th), then crop the centre."""
    w, h = image.size
    cw, ch = max(tw, round(w * scale)), max(th, round(h * scale))
    big = image.resize((cw, ch), f)
    left, top = (cw - tw) // 2, (ch - th) // 2
    return big.crop((left, top, left + tw, top + th))
