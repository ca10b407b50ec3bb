"""Images from request bodies: base64 or ``data:`` URLs, size-checked from the header before any pixel is decoded."""

from __future__ import annotations

import base64
import binascii
import io
import re

from PIL import Image, ImageOps, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

from sumie.serve.errors import ApiError

__all__ = ["decode_image", "encode_png"]

_DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,", re.IGNORECASE)


def _open_header(raw: bytes) -> Image.Image:
    """The image's header parsed, nothing decoded. PNG, JPEG and WebP (what clients send) are opened by their
    plugin directly, so the size check below comes before Pillow's own (its process-wide limit warns at 89 Mpx);
    other formats go through ``Image.open``."""
    fp = io.BytesIO(raw)
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return PngImagePlugin.PngImageFile(fp)
    if raw.startswith(b"\xff\xd8\xff"):
        return JpegImagePlugin.JpegImageFile(fp)
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        from PIL import WebPImagePlugin

        return WebPImagePlugin.WebPImageFile(fp)
    return Image.open(fp)


def decode_image(text: object, field: str, *, max_b64_bytes: int, max_pixels: int) -> Image.Image:
    """A decoded PIL image from a base64 string (optionally a ``data:image/...;base64,`` URL); 422 naming
    ``field`` for anything else: not a string, too long, not base64, not an image, too many pixels, broken data."""
    if not isinstance(text, str) or not text:
        raise ApiError(422, f"{field}: expected a base64-encoded image string", field=field)
    if len(text) > max_b64_bytes:
        raise ApiError(422, f"{field}: the base64 image is {len(text)} characters, over this server's limit of "
                            f"{max_b64_bytes}; send a smaller image", field=field)
    m = _DATA_URL.match(text)
    payload = text[m.end():] if m else text
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        try:  # A1111 also takes unpadded / whitespace-broken base64
            raw = base64.b64decode("".join(payload.split()) + "=" * (-len("".join(payload.split())) % 4),
                                   validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, f"{field}: not valid base64; send the image file's bytes base64-encoded",
                           field=field) from None
    try:
        img = _open_header(raw)  # reads the header only: the size is checked before decoding
        w, h = img.size
        if w < 1 or h < 1 or w * h > max_pixels:
            raise ApiError(422, f"{field}: the image is {w}x{h} pixels, over this server's limit of "
                                f"{max_pixels} pixels; send a smaller image", field=field)
        img.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise ApiError(422, f"{field}: the base64 data is not an image this server reads (PNG, JPEG, WebP, ...)",
                       field=field) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ApiError(422, f"{field}: the image cannot be decoded ({e}); re-save it as PNG", field=field) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - broken EXIF is ignored, as A1111 does
        pass
    return img


def encode_png(image: Image.Image, infotext: str | None = None) -> str:
    """Raw base64 (no ``data:`` prefix) of a PNG carrying ``infotext`` in its ``parameters`` chunk."""
    info = None
    if infotext:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")
