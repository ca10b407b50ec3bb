"""The C library's heap: handing freed memory back to the kernel between the stages of a job (Linux, glibc).

PyTorch's CPU tensors come from ``malloc``. glibc keeps freed blocks for reuse instead of handing them back, so after
the denoising loop the process holds the loop's freed activations (~150-250 MB for SD1.5 at 256²) on top of what
is live; the VAE decoder then allocates buffers of other sizes beside them, and the peak resident memory is higher
than what the two stages need. :func:`trim_heap` (``malloc_trim(0)``) returns the free pages between the stages.
"""

from __future__ import annotations

import ctypes
import functools
import sys

__all__ = ["libc", "trim_heap"]


@functools.cache
def libc() -> ctypes.CDLL:
    """This process's C library (``madvise``, ``malloc_trim``)."""
    lib = ctypes.CDLL(None, use_errno=True)
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if hasattr(lib, "malloc_trim"):  # glibc only (not musl)
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
    return lib


def trim_heap() -> bool:
    """Hand the heap's free pages back to the kernel (glibc's ``malloc_trim(0)``); False where there is none."""
    if not sys.platform.startswith("linux"):
        return False
    lib = libc()
    return hasattr(lib, "malloc_trim") and bool(lib.malloc_trim(0))
