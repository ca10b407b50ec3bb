"""The inpaint ControlNet's input (the extension's ``inpaint`` = "inpaint_global_harmonious" preprocessor and the
"ControlNet inpaint protocol" of ``scripts/hook.py``).

The preprocessor itself passes the image through with the mask as a fourth channel: RGBA, alpha 255 where the
mask is white (to repaint), 0 elsewhere. Saved as PNG it looks inverted (the repainted part is opaque). The unit
resizes the RGBA image to the generation size (the extension's ``detectmap_proc``: the mask channel binarised
at > 127 after resizing), and :func:`control_hint` turns it into what the ControlNet sees: the colours in [0, 1]
where kept and -1 in all three channels where repainted (``hint = c * (1 - m) - m``, m = alpha / 255 > 0.5) —
the same input diffusers' ControlNet-inpaint examples build (``image[mask > 0.5] = -1``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sumie.errors import ConfigError
from sumie.preprocess.common import to_array


def inpaint(image: Image.Image, mask: Image.Image | None = None) -> np.ndarray:
    """``PreprocessorInpaint``: uint8 [H, W, 4] = the RGB image (transparency over white, ``HWC3``) + the mask as
    the alpha channel, its values kept (white = repaint; an RGBA mask with transparency gives its alpha, A1111's
    ``create_binary_mask``); :func:`control_hint` binarises it at > 127."""
    from sumie.pipelines.masks import create_binary_mask

    if mask is None:
        raise ConfigError("inpaint needs a mask: pass mask=IMAGE (--mask FILE), white = the part to repaint")
    if not isinstance(mask, Image.Image):
        raise ConfigError(f"inpaint: the mask must be a PIL image, got {type(mask).__name__}")
    if mask.size != image.size:
        raise ConfigError(f"inpaint: the mask is {mask.width}x{mask.height} but the image is "
                          f"{image.width}x{image.height}; use a mask of the image's size")
    rgb = to_array(image)
    m = np.asarray(create_binary_mask(mask, round_mask=False).convert("L"))
    return np.concatenate([rgb, m[:, :, None]], axis=2)


def control_hint(rgba: np.ndarray | Image.Image) -> np.ndarray:
    """The ControlNet input of an inpaint unit: float32 [H, W, 3], ``rgb / 255`` where alpha <= 127 and -1.0 where
    alpha > 127 (``scripts/hook.py``: ``c * (1 - m) - m`` with ``m = (alpha / 255 > 0.5)``)."""
    x = np.asarray(rgba)
    if x.ndim != 3 or x.shape[2] != 4 or x.dtype != np.uint8:
        raise ConfigError(f"inpaint hint: expected uint8 [H, W, 4] (RGB + mask alpha), got {x.dtype} {list(x.shape)}")
    c = x[:, :, :3].astype(np.float32) / 255.0
    m = (x[:, :, 3:4].astype(np.float32) / 255.0 > 0.5).astype(np.float32)
    return c * (1.0 - m) - m
