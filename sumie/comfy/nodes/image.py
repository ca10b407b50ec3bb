"""Image nodes (nodes.py: LoadImage, LoadImageMask, SaveImage, PreviewImage, ImageScale, ImageScaleBy,
ImageInvert) and ComfyUI's resize (``comfy.utils.common_upscale``).

IMAGE values are [B, H, W, 3] floats in [0, 1]; a saved image is ``clip(255 * x)`` truncated to uint8. SaveImage
names files ``{prefix}_{counter:05}_.png`` with the counter one past the largest already in the folder
(``folder_paths.get_save_image_path``), a ``/`` in the prefix picks a subfolder (never outside the output
folder), and the PNG carries the API graph as text chunk ``prompt`` and each ``extra_pnginfo`` entry (the
frontend's ``workflow``) as JSON. Files are written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, ImageSequence
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from sumie.comfy.env import ComfyEnvironment
from sumie.comfy.nodes.base import MAX_RESOLUTION, InputTypes, Node, RunContext
from sumie.comfy.resize import common_upscale, to_uint8
from sumie.comfy.values import NodeOutput
from sumie.errors import ConfigError, SumieError

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
CROP_METHODS = ["disabled", "center"]


# ---------------------------------------------------------------- files


def _compute_vars(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    values = {"width": width, "height": height, "year": now.tm_year, "month": f"{now.tm_mon:02}",
              "day": f"{now.tm_mday:02}", "hour": f"{now.tm_hour:02}", "minute": f"{now.tm_min:02}",
              "second": f"{now.tm_sec:02}"}
    for key, value in values.items():
        prefix = prefix.replace(f"%{key}%", str(value))
    return prefix


def save_image_path(prefix: str, folder: Path, width: int = 0, height: int = 0) -> tuple[Path, str, int, str]:
    """(full folder, file name prefix, next counter, subfolder) for a filename prefix (``get_save_image_path``)."""
    if "%" in prefix:
        prefix = _compute_vars(prefix, width, height)
    norm = os.path.normpath(prefix)
    subfolder, filename = os.path.dirname(norm), os.path.basename(norm)
    base = os.path.abspath(folder)
    full = os.path.abspath(os.path.join(base, subfolder))
    if os.path.commonpath((base, full)) != base or os.path.isabs(subfolder):
        raise ConfigError(f"filename prefix {prefix!r} leads outside the output folder; use a relative prefix")
    counter = 1
    if os.path.isdir(full):
        pattern = re.compile(re.escape(filename) + r"_(\d+)_", re.IGNORECASE)
        found = [int(m.group(1)) for name in os.listdir(full) if (m := pattern.match(name))]
        counter = max(found, default=0) + 1
    return Path(full), filename, counter, subfolder.replace(os.sep, "/")


def _write_png(img: Image.Image, path: Path, info: PngInfo | None, compress_level: int) -> None:
    """Write a PNG atomically: a temporary file in the same folder, synced, then renamed to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            img.save(f, format="PNG", pnginfo=info, compress_level=compress_level)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise SumieError(f"cannot write {path}: {e.strerror or e}; check the folder is writable and has space") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


class SaveImage(Node):
    """nodes.py ``SaveImage``: PNGs in the output folder, listed in the UI output."""

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."
    DISPLAY_NAME = "Save Image"
    folder_type = "output"
    compress_level = 4

    def __init__(self) -> None:
        self.prefix_append = ""

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Images, prefix; hidden: the prompt and the extra PNG info."""
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": (
                    "The prefix for the file to save. This may include formatting information such as "
                    "%date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes.")}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def run(self, ctx: RunContext, images: Tensor, filename_prefix: str = "ComfyUI") -> NodeOutput:
        """Save each image; the UI output lists ``{filename, subfolder, type}``."""
        folder = ctx.env.folders.folder(self.folder_type)
        full, filename, counter, subfolder = save_image_path(filename_prefix + self.prefix_append, folder,
                                                             images.shape[2], images.shape[1])
        results = []
        for batch_number, image in enumerate(images):
            info = PngInfo()
            info.add_text("prompt", json.dumps(ctx.prompt))
            for key, value in (ctx.extra_pnginfo or {}).items():
                info.add_text(key, json.dumps(value))
            name = f"{filename.replace('%batch_num%', str(batch_number))}_{counter:05}_.png"
            _write_png(Image.fromarray(to_uint8(image)), full / name, info, self.compress_level)
            results.append({"filename": name, "subfolder": subfolder, "type": self.folder_type})
            counter += 1
        return NodeOutput((), {"images": results})


class PreviewImage(SaveImage):
    """nodes.py ``PreviewImage``: like SaveImage, in the temp folder with a random prefix suffix."""

    DESCRIPTION = ""
    DISPLAY_NAME = "Preview Image"
    folder_type = "temp"
    compress_level = 1

    def __init__(self) -> None:
        rng = random.Random()
        self.prefix_append = "_temp_" + "".join(rng.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Images; hidden: the prompt and the extra PNG info."""
        return {"required": {"images": ("IMAGE",)},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def run(self, ctx: RunContext, images: Tensor, filename_prefix: str = "ComfyUI") -> NodeOutput:
        """Save to the temp folder."""
        return super().run(ctx, images, "ComfyUI")


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _open(env: ComfyEnvironment, name: str) -> tuple[Path, Image.Image]:
    path = env.folders.annotated(name)
    try:
        return path, Image.open(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read image {name!r}: {e}") from e


class LoadImage(Node):
    """nodes.py ``LoadImage``: RGB frames [B, H, W, 3] and the inverted alpha as MASK (zeros 64x64 without)."""

    RETURN_TYPES = ("IMAGE", "MASK")
    CATEGORY = "image"
    DISPLAY_NAME = "Load Image"
    VALIDATES = ("image",)

    @classmethod
    def input_types(cls, env: ComfyEnvironment) -> InputTypes:
        """The input folder's files."""
        return {"required": {"image": (env.folders.input_files(), {"image_upload": True})}}

    @classmethod
    def is_changed(cls, env: ComfyEnvironment, inputs: dict[str, Any]) -> Any:
        """The file's SHA-256."""
        return _file_hash(env.folders.annotated(str(inputs["image"])))

    @classmethod
    def validate(cls, env: ComfyEnvironment, inputs: dict[str, Any]) -> bool | str:
        """The file must exist in its folder."""
        try:
            ok = env.folders.annotated(str(inputs["image"])).is_file()
        except ConfigError:
            ok = False
        return True if ok else f"Invalid image file: {inputs['image']}"

    def run(self, ctx: RunContext, image: str) -> NodeOutput:
        """Every frame of the size of the first."""
        _, img = _open(ctx.env, image)
        frames, masks, size = [], [], None
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            if frame.mode == "I":
                frame = frame.point(lambda v: v * (1 / 255))
            rgb = frame.convert("RGB")
            size = size or rgb.size
            if rgb.size != size:
                continue
            frames.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0)[None])
            if "A" in frame.getbands():
                alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
                masks.append((1.0 - torch.from_numpy(alpha))[None])
            else:
                masks.append(torch.zeros((1, 64, 64), dtype=torch.float32))
        if len(frames) > 1 and img.format != "MPO":
            return NodeOutput((torch.cat(frames), torch.cat(masks)))
        return NodeOutput((frames[0], masks[0]))


class LoadImageMask(Node):
    """nodes.py ``LoadImageMask``: one channel as MASK (alpha inverted; zeros 64x64 when the channel is missing)."""

    RETURN_TYPES = ("MASK",)
    CATEGORY = "mask"
    DISPLAY_NAME = "Load Image (as Mask)"
    VALIDATES = ("image",)

    @classmethod
    def input_types(cls, env: ComfyEnvironment) -> InputTypes:
        """The input folder's files and the channel."""
        return {"required": {"image": (env.folders.input_files(), {"image_upload": True}),
                             "channel": (["alpha", "red", "green", "blue"],)}}

    is_changed = LoadImage.is_changed
    validate = LoadImage.validate

    def run(self, ctx: RunContext, image: str, channel: str) -> NodeOutput:
        """The channel in [0, 1] [1, H, W]."""
        _, img = _open(ctx.env, image)
        img = ImageOps.exif_transpose(img)
        if img.getbands() != ("R", "G", "B", "A"):
            if img.mode == "I":
                img = img.point(lambda v: v * (1 / 255))
            img = img.convert("RGBA")
        c = channel[0].upper()
        if c in img.getbands():
            mask = torch.from_numpy(np.array(img.getchannel(c)).astype(np.float32) / 255.0)
            if c == "A":
                mask = 1.0 - mask
        else:
            mask = torch.zeros((64, 64), dtype=torch.float32)
        return NodeOutput((mask[None],))


class ImageScale(Node):
    """nodes.py ``ImageScale``: to width x height (0 keeps the aspect from the other side)."""

    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "image/upscaling"
    DISPLAY_NAME = "Upscale Image"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Image, method, size, crop."""
        size = {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}
        return {"required": {"image": ("IMAGE",), "upscale_method": (UPSCALE_METHODS,), "width": ("INT", size),
                             "height": ("INT", dict(size)), "crop": (CROP_METHODS,)}}

    def run(self, ctx: RunContext, image: Tensor, upscale_method: str, width: int, height: int,
            crop: str) -> NodeOutput:
        """The resized images."""
        if width == 0 and height == 0:
            return NodeOutput((image,))
        s = image.movedim(-1, 1)
        if width == 0:
            width = max(1, round(s.shape[3] * height / s.shape[2]))
        elif height == 0:
            height = max(1, round(s.shape[2] * width / s.shape[3]))
        return NodeOutput((common_upscale(s, width, height, upscale_method, crop).movedim(1, -1),))


class ImageScaleBy(Node):
    """nodes.py ``ImageScaleBy``: both sides times ``scale_by``, rounded."""

    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "image/upscaling"
    DISPLAY_NAME = "Upscale Image By"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """Image, method, factor."""
        return {"required": {"image": ("IMAGE",), "upscale_method": (UPSCALE_METHODS,),
                             "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01})}}

    def run(self, ctx: RunContext, image: Tensor, upscale_method: str, scale_by: float) -> NodeOutput:
        """The resized images."""
        s = image.movedim(-1, 1)
        w, h = round(s.shape[3] * scale_by), round(s.shape[2] * scale_by)
        return NodeOutput((common_upscale(s, w, h, upscale_method, "disabled").movedim(1, -1),))


class ImageInvert(Node):
    """nodes.py ``ImageInvert``: 1 - x."""

    RETURN_TYPES = ("IMAGE",)
    CATEGORY = "image"
    DISPLAY_NAME = "Invert Image"

    @classmethod
    def input_types(cls, env: Any) -> InputTypes:
        """One image."""
        return {"required": {"image": ("IMAGE",)}}

    def run(self, ctx: RunContext, image: Tensor) -> NodeOutput:
        """The inverted image."""
        return NodeOutput((1.0 - image,))


NODES: dict[str, type[Node]] = {
    "SaveImage": SaveImage,
    "PreviewImage": PreviewImage,
    "LoadImage": LoadImage,
    "LoadImageMask": LoadImageMask,
    "ImageScale": ImageScale,
    "ImageScaleBy": ImageScaleBy,
    "ImageInvert": ImageInvert,
}
