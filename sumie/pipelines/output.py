"""Saving images with their generation parameters, as A1111 does, and reading them back.

A PNG gets its infotext in a ``parameters`` text chunk through Pillow's ``PngInfo.add_text`` (A1111's
``save_image_with_geninfo``): a ``tEXt`` chunk when the text is Latin-1, else an uncompressed UTF-8 ``iTXt``
chunk. A JPEG or WebP gets it where A1111 puts it there: the EXIF ``UserComment``, ``UNICODE`` charset, UTF-16
big-endian (what ``piexif.helper.UserComment.dump(text, encoding="unicode")`` makes). Files are written
atomically: into a temporary file in the same folder, then renamed into place, so a failure leaves neither a
partial image nor the temporary file. Existing files are never replaced unless asked.

:func:`read_png_info` reads that chunk back (A1111's ``read_info_from_image``), and the EXIF ``UserComment`` that
A1111 writes into JPEG and WebP files instead.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from sumie.errors import ConfigError, SumieError

# A1111's images.sanitize_filename_part: characters no file name may hold, and what may not end one.
_INVALID_FILENAME_CHARS = '#<>:"/\\|?*\n\r\t'
_INVALID_FILENAME_END = " ."
_MAX_FILENAME_PART = 128
_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286
# file suffix -> Pillow format of the images Sumie writes
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
DEFAULT_QUALITY = 80  # A1111's "jpeg_quality" default, used for JPEG and lossy WebP


def sanitize_filename_part(text: str) -> str:
    """``text`` usable inside a file name (A1111's rule: unsafe characters -> ``_``, at most 128 characters,
    no leading spaces, no trailing spaces or dots)."""
    text = text.translate({ord(c): "_" for c in _INVALID_FILENAME_CHARS}).lstrip(" ")
    return text[:_MAX_FILENAME_PART].rstrip(_INVALID_FILENAME_END)


def next_sequence_number(folder: str | os.PathLike[str]) -> int:
    """A1111's ``get_next_sequence_number``: one more than the largest leading number of the folder's file names
    (``00041-123.png`` -> 41), 0 for an empty or missing folder."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    best = -1
    for name in names:
        head = os.path.splitext(name)[0].split("-")[0]
        if head.isdigit():
            best = max(best, int(head))
    return best + 1


def next_free_path(folder: str | os.PathLike[str], stem_pattern: str = "", *, ext: str = ".png") -> Path:
    """A1111-style numbered name in ``folder``: ``00042-<stem>.png`` (``00042.png`` for an empty stem), numbered
    after the largest number already there and skipping names that exist. ``stem_pattern`` is the part after
    the number, usually the seed (A1111's default ``[seed]`` pattern); it is made safe for file names."""
    stem = sanitize_filename_part(stem_pattern)
    base = next_sequence_number(folder)
    for i in range(500):  # A1111 tries 500 numbers too
        name = f"{base + i:05}-{stem}{ext}" if stem else f"{base + i:05}{ext}"
        path = Path(folder) / name
        if not path.exists():
            return path
    raise SumieError(f"no free file name in {folder} after 500 tries; choose another output folder")


def _save_options(fmt: str, infotext: str | None, quality: int) -> dict[str, object]:
    """Pillow ``save`` keywords that store ``infotext`` where A1111 reads it for this format."""
    if fmt == "PNG":
        if infotext is None:
            return {}
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", infotext)  # tEXt if Latin-1, else iTXt (Pillow's rule, so A1111's)
        return {"pnginfo": info}
    options: dict[str, object] = {"quality": quality}
    if infotext is not None:
        options["exif"] = _exif_user_comment(b"UNICODE\0" + infotext.encode("utf-16-be", errors="replace"))
    return options


def _exif_user_comment(comment: bytes) -> bytes:
    """EXIF block (``Exif\\0\\0`` + little-endian TIFF) holding only IFD0 -> Exif IFD -> UserComment (type
    UNDEFINED, as piexif writes it; Pillow's own Exif writer would type it BYTE, which piexif reads as a tuple)."""
    ifd0 = struct.pack("<H", 1) + struct.pack("<HHII", _EXIF_IFD, 4, 1, 26) + struct.pack("<I", 0)  # 8..26
    exif_ifd = struct.pack("<H", 1) + struct.pack("<HHII", _USER_COMMENT, 7, len(comment), 44) + struct.pack("<I", 0)
    return b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + ifd0 + exif_ifd + comment  # comment at offset 44


def _write_tmp(image: Image.Image, folder: Path, name: str, fmt: str, options: dict[str, object]) -> Path:
    """Write the image to a new temporary file next to the target (permissions follow the umask) and sync it."""
    tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt, **options)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return tmp


def _place(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished file into place; without ``overwrite`` an existing file (even one that appears
    meanwhile) is left alone: a hard link fails when the name is taken, else check and rename."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def save_image(image: Image.Image, path: str | os.PathLike[str], infotext: str | None, *,
               overwrite: bool = False, quality: int = DEFAULT_QUALITY) -> Path:
    """Save ``image`` as PNG, JPEG or WebP (by the suffix) with ``infotext`` where A1111 stores it, atomically.

    ``quality`` (1-100) applies to JPEG and WebP. Refuses an existing file unless ``overwrite``; creates missing
    folders. On any failure no file and no temporary file remain. Returns the path.
    """
    path = Path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: unknown image type {path.suffix or '(no suffix)'!r}; end the name in "
                          f"{', '.join(IMAGE_FORMATS)}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality must be in [1, 100], got {quality}")
    if path.is_dir():
        raise SumieError(f"{path} is a folder; give a file name ending in {path.suffix}")
    if path.exists() and not overwrite:
        raise SumieError(f"{path} already exists; choose another name or pass overwrite=True (--overwrite)")
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")  # JPEG has no alpha
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_tmp(image, path.parent, path.name, fmt, _save_options(fmt, infotext, quality))
    except OSError as e:
        raise SumieError(f"cannot write {path}: {e.strerror or e}; check the folder exists, is writable and "
                         "has space") from e
    try:
        _place(tmp, path, overwrite)
    except FileExistsError:
        raise SumieError(f"{path} already exists; choose another name or pass overwrite=True (--overwrite)") from None
    except OSError as e:
        raise SumieError(f"cannot write {path}: {e.strerror or e}; check the folder is writable") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def save_png(image: Image.Image, path: str | os.PathLike[str], infotext: str | None, *,
             overwrite: bool = False) -> Path:
    """:func:`save_image` for a name that must end in ``.png`` (previews, plots, grids)."""
    if Path(path).suffix.lower() != ".png":
        raise ConfigError(f"{path} does not end in .png; PNG output needs a .png file name")
    return save_image(image, path, infotext, overwrite=overwrite)


def decode_user_comment(data: bytes | str) -> str:
    """An EXIF UserComment as text: its 8-byte charset prefix (``UNICODE``: UTF-16, big-endian as A1111/piexif
    write it, little-endian recognised too; ``ASCII``; ``JIS``), else UTF-8 with bad bytes dropped."""
    if isinstance(data, str):
        return data
    prefix, body = data[:8], data[8:]
    if prefix == b"UNICODE\0":
        # More zero bytes at even offsets means big-endian (ASCII-range text is "\0c\0c...").
        big = body[0::2].count(0) >= body[1::2].count(0)
        return body.decode("utf-16-be" if big else "utf-16-le", errors="replace")
    if prefix == b"ASCII\0\0\0":
        return body.decode("ascii", errors="replace")
    if prefix == b"JIS\0\0\0\0\0":
        return body.decode("shift_jis", errors="replace")
    return data.decode("utf-8", errors="ignore")


def read_png_info(path: str | os.PathLike[str]) -> str | None:
    """The generation parameters stored in an image: a PNG's ``parameters`` chunk, or the EXIF UserComment of a
    JPEG/WebP (A1111's places; a non-empty EXIF comment wins, as in A1111). None when the image has none."""
    try:
        with Image.open(path) as im:
            info = dict(im.info)
            if "parameters" not in info and im.format == "PNG":
                im.load()  # text chunks after the image data are read only now
                info = dict(im.info)
            text = info.get("parameters")
            if "exif" in info:
                comment = im.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
                if comment:
                    text = decode_user_comment(comment) or text
    except FileNotFoundError:
        raise SumieError(f"no such file: {path}; check the path") from None
    except IsADirectoryError:
        raise SumieError(f"{path} is a folder; give an image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SumieError(f"cannot read {path} as an image ({e}); give a PNG, JPEG or WebP file") from None
    return str(text) if text is not None else None
