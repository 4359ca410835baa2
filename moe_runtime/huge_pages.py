"""Weights the CPU decode kernel streams, copied into memory backed by 2 MB pages.

A decode step reads each weight once, front to back, at memory speed, and with 4 KB pages every
4 KB of the stream needs a TLB entry of its own. Linux backs memory by 2 MB pages only where
asked when transparent huge pages are in `madvise` mode (Debian's default, this VM's), and
transformers 5 leaves a model's weights in a private mapping of its safetensors file, which
4 KB pages back whatever the mode. On the 2-core EPYC of BENCHMARKS.md the decode kernel read a
50304 x 1024 bf16 output head at 21-22 GB/s from 4 KB pages and 32-33 from 2 MB pages (medians
of 30 cold calls, both orders).

`Arena` is one anonymous mapping advised MADV_HUGEPAGE, so its pages fault in as 2 MB pages as
the weights are copied in; tensors are views of it, and it lives as long as any of them. Where
the platform cannot (not Linux, THP `never`) or MOE_RUNTIME_HUGE_PAGES=0 is set, `available()`
is False and weights stay where they are.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

PAGE = 2 << 20  # a huge page on x86-64 and most arm64 kernels
ALIGN = 64  # each tensor's start: a cache line
OPT_OUT = "MOE_RUNTIME_HUGE_PAGES"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether weights can be moved into huge pages here (Linux, THP not `never`, not opted out)."""
    if os.environ.get(OPT_OUT) == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


class Arena:
    """`nbytes` of anonymous memory advised to be backed by huge pages, handed out in order."""

    def __init__(self, nbytes: int):
        self._map = mmap.mmap(-1, nbytes + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # room to start on a huge page
        self._map.madvise(mmap.MADV_HUGEPAGE)
        memory = torch.frombuffer(self._map, dtype=torch.uint8)  # keeps the mapping alive while any view lives
        start = (-memory.data_ptr()) % PAGE
        self._free = memory[start : start + nbytes]
        self._used = 0

    def copy_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of `tensor` (same dtype and shape) in the arena."""
        nbytes = tensor.numel() * tensor.element_size()
        start = _aligned(self._used)
        if start + nbytes > self._free.numel():
            raise ValueError(f"the arena has {self._free.numel() - start} bytes left, not {nbytes}")
        self._used = start + nbytes
        copy = self._free[start : start + nbytes].view(tensor.dtype).view(tensor.shape)
        copy.copy_(tensor)
        return copy


def moved(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` (CPU tensors) in one arena of huge pages, in order."""
    arena = Arena(sum(_aligned(t.numel() * t.element_size()) for t in tensors))
    return [arena.copy_of(tensor) for tensor in tensors]


def _aligned(nbytes: int) -> int:
    """nbytes rounded up to a whole number of ALIGN."""
    return -(-nbytes // ALIGN) * ALIGN
