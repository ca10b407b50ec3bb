"""sumie.memory: freed heap pages go back to the kernel between a job's stages."""

from __future__ import annotations

import sys

import pytest
import torch

from sumie.memory import trim_heap


def _rss_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) // 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim is Linux only")
def test_trim_heap_hands_freed_heap_pages_back() -> None:
    """Small tensors come from the heap; freeing them below a live one keeps their pages until the trim."""
    blocks = [torch.ones(16 * 1024) for _ in range(2048)]  # 64 KiB each (under malloc's mmap threshold): 128 MiB
    keep = torch.ones(16 * 1024)  # allocated last, so the freed blocks are not at the heap's top
    del blocks
    before = _rss_mib()
    assert trim_heap()
    after = _rss_mib()
    assert before - after >= 64, (before, after)
    assert keep.sum().item() == 16 * 1024
