"""Convolutions and linear layers whose CPU inference calls use a prepacked weight (on by default; within fp32
rounding of the plain call).

A plain ``nn.Conv2d`` on the CPU hands oneDNN its weight in PyTorch's OIHW layout on every call, and oneDNN
reorders it into its blocked layout each time. For the UNet's deep levels (1280 channels at 8x8 or 4x4 for a 256²
image) that reorder costs more than the convolution itself. :class:`Conv2d` reorders the weight once for the input
shape it meets (``mkldnn._reorder_convolution_weight``, what inductor's freezing does) and keeps it; the input is
made channels-last, and the output is what ``F.conv2d`` gives for that channels-last input. Where Winograd's
F(2x2, 3x3) pays (:meth:`Conv2d._winograd_fits`: the UNet's 320- and 640-channel 3x3 convolutions at 16x16 latents
and up) it keeps Winograd's transformed kernel instead (:mod:`sumie.models.winograd`: 16 multiplications per 2x2
output tile instead of 36). :class:`Linear` keeps a oneDNN-packed weight for the number of rows it meets
(``mkldnn._reorder_linear_weight``) and calls ``mkldnn._linear_pointwise``, which also reads an aligned copy instead
of a weight memory-mapped at any offset of the file.

Three modes (``weight_packing``): ``"auto"`` (the default) packs a weight only when that costs no memory, i.e.
when the dense weight lies in a memory-mapped file (below); ``"on"`` packs every weight; ``"off"`` none.

The packed copy is taken only for CPU float32 inference calls (no autograd, eval mode, not while ``torch.compile``
traces); every other call is the plain layer. It is made again when the weight object or its version changes
(a LoRA patch, ``load_state_dict``, an optimizer step) or the input shape changes (oneDNN's best layout depends on
it; a layout packed for another shape is still right but can be slower than the plain call; Winograd's kernel does
not depend on it), and is dropped by ``train()``. When the dense weight lies in a memory-mapped file (Sumie maps
float32 safetensors files), its pages are handed back to the kernel once the packed copy exists
(``madvise(MADV_PAGEOUT)``), so the process holds one copy of each weight, not two (Winograd's kernel is 16/9 of
one); a repack for a new shape then starts from the oneDNN copy, not from the file. A weight in anonymous memory
(cast from fp16 at load, or patched) stays, and the packed copy comes on top of it.
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref
from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sumie.configs import PACKING_MODES, PackingMode
from sumie.errors import ConfigError
from sumie.memory import libc
from sumie.models.winograd import winograd_conv3x3, winograd_weight

__all__ = ["PACKING_MODES", "Conv2d", "Linear", "PackingMode", "PackingModeError", "check_packing_mode",
           "packed_bytes", "set_weight_packing"]

_MADV_PAGEOUT = 21  # Linux 5.4+
# Winograd (models/winograd) where it pays: 64 or more 2x2 tiles per image (fewer make its products too short), and
# weights of at most 64 MiB (up to 1920 -> 640 and 1280 -> 1280 channels; its kernel copy is 16/9 the weight's size;
# the 2560 -> 1280 ones, 118 MiB, stay with oneDNN)
WINOGRAD_MIN_PIXELS = 256
WINOGRAD_MAX_BYTES = 64 * 2**20
_HAVE_OPS = all(hasattr(torch.ops.mkldnn, op) for op in (
    "_convolution_pointwise", "_reorder_convolution_weight", "_linear_pointwise", "_reorder_linear_weight"))
_WINOGRAD = "winograd"  # the key of a Winograd kernel: good for every input shape it fits


@dataclass(eq=False)
class _Packed:
    source: weakref.ref[Tensor]  # the dense weight it was made from
    version: int
    key: Hashable  # what it was made for: the input shape (conv), rows (linear) or _WINOGRAD
    weight: Tensor | None  # oneDNN's blocked layout or Winograd's U; None: plain calls for this weight and key
    mapped: tuple[int, int] | None  # the dense weight's whole pages in a memory-mapped file (None: not in a file)


def _version(t: Tensor) -> int:
    return -1 if t.is_inference() else t._version


class _Prepacked(nn.Module):
    """What :class:`Conv2d` and :class:`Linear` share: when to pack, when to pack again, the file pages."""

    weight: Tensor
    weight_packing: PackingMode = "auto"
    _packed: _Packed | None = None

    def _key(self, x: Tensor) -> Hashable:
        raise NotImplementedError

    def _pack(self, dense: Tensor, x: Tensor, key: Hashable) -> Tensor:
        raise NotImplementedError

    def _packable(self, x: Tensor) -> bool:
        return (not torch.compiler.is_compiling() and self.weight_packing != "off" and _HAVE_OPS and not self.training
                and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
                and self.weight.dtype == torch.float32)

    def _current(self, x: Tensor) -> Tensor | None:
        """The packed weight for this call (made now if the weight or the key changed); None: the plain call."""
        w = self.weight
        p = self._packed
        key = self._key(x)
        same_weight = p is not None and p.source() is w and p.version == _version(w)
        if p is not None and same_weight and p.key == key:
            return p.weight
        mapped = p.mapped if p is not None and same_weight else _mapped_range(w)
        dense = w
        if p is not None and same_weight and mapped is not None and p.weight is not None and p.weight.is_mkldnn:
            dense = p.weight.to_dense()  # its file pages were handed back: unpack the old copy, not the file
        self._packed = None  # the old copy goes before the new one is made
        packed = self._pack(dense, x, key) if mapped is not None or self.weight_packing == "on" else None
        del dense
        self._packed = _Packed(weakref.ref(w), _version(w), key, packed, mapped)
        if mapped is not None:
            _page_out(*mapped)
        return packed

    def __getstate__(self) -> dict[str, object]:
        """Pickle and deepcopy without the packed copy (an opaque oneDNN tensor; made again on the next call)."""
        state = dict(super().__getstate__())
        state.pop("_packed", None)
        return state

    def train(self, mode: bool = True) -> _Prepacked:
        """As ``nn.Module.train``; entering training drops the packed copy."""
        if mode:
            self._packed = None
        return super().train(mode)


class Conv2d(_Prepacked, nn.Conv2d):
    """``nn.Conv2d`` (same parameters and keys) whose CPU float32 inference calls use a prepacked weight (module
    doc); ``weight_packing``: "auto", "on" or "off" (:func:`set_weight_packing`)."""

    winograd: bool = True  # a model whose convolutions gain too little for the memory sets False (the VAE)

    def forward(self, x: Tensor) -> Tensor:
        """[B, C_in, H, W] -> [B, C_out, H', W'] (channels-last memory when packed)."""
        packed = self._current(x) if self._packable(x) else None
        if packed is None:
            return super().forward(x)
        if self._packed is not None and self._packed.key == _WINOGRAD:
            return winograd_conv3x3(x, packed, self.bias)
        return torch.ops.mkldnn._convolution_pointwise(
            x.contiguous(memory_format=torch.channels_last), packed, self.bias, list(self.padding),
            list(self.stride), list(self.dilation), self.groups, "none", [], "")

    def _packable(self, x: Tensor) -> bool:
        return (super()._packable(x) and x.dim() == 4 and self.padding_mode == "zeros"
                and not isinstance(self.padding, str))

    def _key(self, x: Tensor) -> Hashable:
        return _WINOGRAD if self._winograd_fits(x) else x.shape

    def _pack(self, dense: Tensor, x: Tensor, key: Hashable) -> Tensor:
        if key == _WINOGRAD:
            return winograd_weight(dense)
        return torch.ops.mkldnn._reorder_convolution_weight(
            dense, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape))

    def _winograd_fits(self, x: Tensor) -> bool:
        """Whether this call takes Winograd's F(2x2, 3x3) (module doc): a 3x3 stride-1 padding-1 kernel, even sides
        with at least :data:`WINOGRAD_MIN_PIXELS` pixels per image, a weight of at most :data:`WINOGRAD_MAX_BYTES`."""
        h, w = x.shape[-2:]
        return (self.winograd and self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.groups == 1 and h % 2 == 0 and w % 2 == 0
                and h * w >= WINOGRAD_MIN_PIXELS
                and self.weight.numel() * self.weight.element_size() <= WINOGRAD_MAX_BYTES)


class Linear(_Prepacked, nn.Linear):
    """``nn.Linear`` (same parameters and keys) whose CPU float32 inference calls use a oneDNN-packed weight
    (module doc)."""

    def forward(self, x: Tensor) -> Tensor:
        """[..., in] -> [..., out]."""
        packed = self._current(x) if self._packable(x) else None
        if packed is None:
            return super().forward(x)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), packed, self.bias, "none",
                                               [], "")
        return y.view(*x.shape[:-1], y.shape[-1])

    def _packable(self, x: Tensor) -> bool:
        return super()._packable(x) and x.dim() >= 2 and x.numel() > 0

    def _key(self, x: Tensor) -> Hashable:
        return x.numel() // x.shape[-1]

    def _pack(self, dense: Tensor, x: Tensor, key: Hashable) -> Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(dense, key)


class PackingModeError(ConfigError, ValueError):
    """A packing mode other than auto, on, off."""


def check_packing_mode(mode: str) -> PackingMode:
    """``mode`` if it is one of :data:`PACKING_MODES`, else a :class:`PackingModeError` naming them."""
    if mode not in PACKING_MODES:
        raise PackingModeError(f"weight packing {mode!r}: choose one of {', '.join(PACKING_MODES)}")
    return mode  # type: ignore[return-value]


def set_weight_packing(module: nn.Module, mode: PackingMode) -> int:
    """Set the packing mode of every :class:`Conv2d` and :class:`Linear` in ``module`` (a change drops the packed
    copies); the count."""
    check_packing_mode(mode)
    n = 0
    for m in module.modules():
        if isinstance(m, _Prepacked):
            if m.weight_packing != mode:
                m.weight_packing, m._packed = mode, None
            n += 1
    return n


def packed_bytes(module: nn.Module) -> int:
    """Bytes of packed weights ``module``'s convolutions and linear layers hold now."""
    return sum(m._packed.weight.numel() * m._packed.weight.element_size() for m in module.modules()
               if isinstance(m, _Prepacked) and m._packed is not None and m._packed.weight is not None)


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
        libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_PAGEOUT)
