"""Image upscaler networks (pure modules): ESRGAN / Real-ESRGAN RRDBNet, Real-ESRGAN's compact SRVGGNet, SwinIR.

:mod:`sumie.models.upscalers.detect` recognises a file's architecture from its keys; the tiled runner is
:func:`sumie.pipelines.upscale.upscale`.
"""

from sumie.models.upscalers.detect import Upscaler, UpscalerSpec, build_upscaler, detect_upscaler, load_upscaler
from sumie.models.upscalers.rrdbnet import RRDBNet
from sumie.models.upscalers.srvgg import SRVGGNetCompact
from sumie.models.upscalers.swinir import SwinIR

__all__ = ["RRDBNet", "SRVGGNetCompact", "SwinIR", "Upscaler", "UpscalerSpec", "build_upscaler", "detect_upscaler",
           "load_upscaler"]
