"""Convolutions whose CPU inference calls use a oneDNN-prepacked weight (on by default; exact-output change).

A plain ``nn.Conv2d`` on the CPU hands oneDNN its weight in PyTorch's OIHW layout on every call, and oneDNN
reorders it into its blocked layout each time. For the UNet's deep levels (1280 channels at 8x8 or 4x4 for a 256²
image) that reorder costs more than the convolution itself. :class:`Conv2d` reorders the weight once for the input
shape it meets (``mkldnn._reorder_convolution_weight``, what inductor's freezing does) and keeps it, so an eager
SD1.5 UNet step at 256² takes ~0.6x the time (docs/benchmarks.md). The input is made channels-last; the output is
what ``F.conv2d`` gives for that channels-last input (bit for bit for aligned weights in the tests) and within fp32
rounding of the plain call.

Three modes (``weight_packing``): ``"auto"`` (the default) packs a weight only when that costs no memory, i.e.
when the dense weight lies in a memory-mapped file (below); ``"on"`` packs every weight; ``"off"`` none.

The packed copy is taken only for CPU float32 inference calls (no autograd, eval mode, not while ``torch.compile``
traces); every other call is the plain convolution. It is made again when the weight object or its version changes
(a LoRA patch, ``load_state_dict``, an optimizer step) or the input shape changes (oneDNN's best layout depends on
it; a layout packed for another shape is still right but can be slower than the plain call), and is dropped by
``train()``. When the dense weight lies in a memory-mapped file (Sumie maps float32 safetensors files), its pages
are handed back to the kernel once the packed copy exists (``madvise(MADV_PAGEOUT)``: clean file pages, read again
from the file if the weight is needed), so the process holds one copy of each weight, not two. A weight in
anonymous memory (cast from fp16 at load, or patched) stays, and the packed copy comes on top of it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sumie.configs import PACKING_MODES, PackingMode
from sumie.errors import ConfigError

__all__ = ["PACKING_MODES", "Conv2d", "PackingMode", "PackingModeError", "check_packing_mode", "packed_bytes",
           "set_weight_packing"]

_MADV_PAGEOUT = 21  # Linux 5.4+
_HAVE_OPS = hasattr(torch.ops.mkldnn, "_convolution_pointwise") and hasattr(torch.ops.mkldnn,
                                                                          "_reorder_convolution_weight")


@dataclass(eq=False)
class _Packed:
    source: weakref.ref[Tensor]  # the dense weight it was made from
    version: int
    shape: torch.Size  # the input shape it was made for
    weight: Tensor | None  # oneDNN's blocked layout; None: plain calls for this weight and shape ("auto")
    mapped: tuple[int, int] | None  # the dense weight's whole pages in a memory-mapped file (None: not in a file)


def _version(t: Tensor) -> int:
    return -1 if t.is_inference() else t._version


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and keys) whose CPU float32 inference calls use a prepacked weight (module
    doc); ``weight_packing``: "auto", "on" or "off" (:func:`set_weight_packing`)."""

    weight_packing: PackingMode = "auto"
    _packed: _Packed | None = None

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> [B, C_out, H', W'] (channels-last memory when packed)."""
        if not self._packable(x):
            return super().forward(x)
        w = self.weight
        p = self._packed
        same_weight = p is not None and p.source() is w and p.version == _version(w)
        if p is None or not same_weight or p.shape != x.shape:
            self._packed = None  # the old copy goes before the new one is made
            mapped = p.mapped if p is not None and same_weight else _mapped_range(w)
            packed = None
            if mapped is not None or self.weight_packing == "on":
                packed = torch.ops.mkldnn._reorder_convolution_weight(
                    w, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape))
            p = self._packed = _Packed(weakref.ref(w), _version(w), x.shape, packed, mapped)
            if mapped is not None:
                _page_out(*mapped)
        if p.weight is None:
            return super().forward(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x.contiguous(memory_format=torch.channels_last), p.weight, self.bias, list(self.padding),
            list(self.stride), list(self.dilation), self.groups, "none", [], "")

    def _packable(self, x: Tensor) -> bool:
        return (not torch.compiler.is_compiling() and self.weight_packing != "off" and _HAVE_OPS and not self.training
                and not torch.is_grad_enabled() and x.dim() == 4 and x.device.type == "cpu"
                and x.dtype == torch.float32 and self.weight.dtype == torch.float32 and self.padding_mode == "zeros"
                and not isinstance(self.padding, str))

    def __getstate__(self) -> dict[str, object]:
        """Pickle and deepcopy without the packed copy (an opaque oneDNN tensor; made again on the next call)."""
        state = dict(super().__getstate__())
        state.pop("_packed", None)
        return state

    def train(self, mode: bool = True) -> Conv2d:
        """As ``nn.Module.train``; entering training drops the packed copy."""
        if mode:
            self._packed = None
        return super().train(mode)


class PackingModeError(ConfigError, ValueError):
    """A packing mode other than auto, on, off."""


def check_packing_mode(mode: str) -> PackingMode:
    """``mode`` if it is one of :data:`PACKING_MODES`, else a :class:`PackingModeError` naming them."""
    if mode not in PACKING_MODES:
        raise PackingModeError(f"weight packing {mode!r}: choose one of {', '.join(PACKING_MODES)}")
    return mode  # type: ignore[return-value]


def set_weight_packing(module: nn.Module, mode: PackingMode) -> int:
    """Set the packing mode of every :class:`Conv2d` in ``module`` (a change drops the packed copies); the count."""
    check_packing_mode(mode)
    n = 0
    for m in module.modules():
        if isinstance(m, Conv2d):
            if m.weight_packing != mode:
                m.weight_packing, m._packed = mode, None
            n += 1
    return n


def packed_bytes(module: nn.Module) -> int:
    """Bytes of packed weights ``module``'s convolutions hold now."""
    return sum(m._packed.weight.numel() * m._packed.weight.element_size() for m in module.modules()
               if isinstance(m, Conv2d) and m._packed is not None and m._packed.weight is not None)


def _file_ranges() -> list[tuple[int, int]]:
    """This process's memory-mapped regular-file ranges (start, end), from /proc/self/maps."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[4] != "0" and parts[5].startswith("/"):
                lo, hi = parts[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _mapped_range(t: Tensor) -> tuple[int, int] | None:
    """The whole pages of ``t`` (maybe none) when it lies in a memory-mapped regular file (Linux), else None."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return None
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    try:
        if not any(lo <= start and end <= hi for lo, hi in _file_ranges()):
            return None
    except OSError:
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    lo, hi = -(-start // page) * page, end // page * page
    return lo, max(lo, hi)


def _page_out(lo: int, hi: int) -> None:
    """Hand the kernel back the file pages in [lo, hi) (read again from the file when touched); errors: kept."""
    if hi > lo:
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_PAGEOUT)


@functools.cache
def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib
