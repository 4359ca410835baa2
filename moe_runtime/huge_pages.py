"""Weights the CPU decode kernels stream, held in memory backed by 2 MB pages.

A decode step reads each weight once, front to back, at memory speed, and with 4 KB pages every
4 KB of the stream needs a TLB entry of its own. Linux backs memory by 2 MB pages only where
asked when transparent huge pages are in `madvise` mode (Debian's default, this VM's), and
transformers 5 leaves a model's weights in a private mapping of its safetensors file, which
4 KB pages back whatever the mode. On the 2-core EPYC of BENCHMARKS.md the decode kernel read a
50304 x 1024 bf16 output head at 21-22 GB/s from 4 KB pages and 32-33 from 2 MB pages, and
8 of 64 bf16 experts at 18-19 against 21-24 (medians of 30 cold calls, both orders).

`Arena` is one anonymous mapping advised MADV_HUGEPAGE, so its pages fault in as 2 MB pages as
the weights are written; each tensor it hands out has a storage of its own over its part of the
mapping (so a model's parameters moved here share no storage, which safetensors and
`save_pretrained` would refuse), and the mapping lives as long as any of them. Where the
platform cannot (not Linux, THP `never`) or MOE_RUNTIME_HUGE_PAGES=0 is set, `available()` is
False and weights stay where they are.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import warnings
import weakref
from pathlib import Path

import psutil
import torch

PAGE = 2 << 20  # a huge page on x86-64 and most arm64 kernels
ALIGN = 64  # each tensor's start: a cache line
OPT_OUT = "MOE_RUNTIME_HUGE_PAGES"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MIN_HEADROOM = 1 << 30  # memory a copy must leave available (or a tenth of RAM, whichever is more)
_LIVE: dict[int, tuple[int, int]] = {}  # id of each live arena's mapping: its [start, end) addresses


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
        address = torch.frombuffer(self._map, dtype=torch.uint8, count=1).data_ptr()
        _LIVE[id(self._map)] = (address, address + len(self._map))
        weakref.finalize(self._map, _LIVE.pop, id(self._map), None)  # once the last tensor of it is gone
        self._next = (-address) % PAGE  # offset of the next tensor in the mapping
        self._end = self._next + nbytes

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor of the arena, with a storage of its own."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self._next + nbytes > self._end:
            raise ValueError(f"the arena has {self._end - self._next} bytes left, not {nbytes}")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        memory = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes, offset=self._next)  # keeps the mapping alive
        self._next = min(self._end, self._next + _aligned(nbytes))
        return memory.view(dtype).view(shape)

    def copy_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of `tensor` (same dtype and shape) in the arena."""
        copy = self.empty(tuple(tensor.shape), tensor.dtype)
        copy.copy_(tensor)
        return copy


def moved(tensors: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Copies of `tensors` (CPU tensors) in one arena of huge pages, in order; None where there
    is no room for them (`_check_room`) or no memory for the mapping (with a warning, as `_alone`)."""
    nbytes = sum(_aligned(t.numel() * t.element_size()) for t in tensors)
    try:
        _check_room(nbytes)
        arena = Arena(nbytes)
        return [arena.copy_of(tensor) for tensor in tensors]
    except (OSError, RuntimeError) as error:
        _stay(error)
        return None


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in huge pages where `available()`, else torch's."""
    tensor = _alone(shape, dtype)
    return torch.empty(shape, dtype=dtype) if tensor is None else tensor


def copied(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` (a CPU tensor) in huge pages where `available()`, else `tensor` itself."""
    copy = _alone(tuple(tensor.shape), tensor.dtype, copying=True)
    return tensor if copy is None else copy.copy_(tensor)


def arena_bytes(tensors: list[torch.Tensor]) -> int:
    """How many bytes of `tensors` lie in live arenas (what was moved into huge pages here)."""
    spans = list(_LIVE.values())
    return sum(t.numel() * t.element_size() for t in tensors if any(low <= t.data_ptr() < high for low, high in spans))


def _alone(shape: tuple[int, ...], dtype: torch.dtype, *, copying: bool = False) -> torch.Tensor | None:
    """An uninitialised tensor in an arena of its own, or None where `available()` is False or
    there is no memory for the mapping, or (`copying`) no room for a copy (`_check_room`); with
    a warning: not an error, the caller keeps 4 KB pages."""
    if not available():
        return None
    nbytes = math.prod(shape) * dtype.itemsize
    try:
        if copying:
            _check_room(nbytes)
        return Arena(nbytes).empty(shape, dtype)
    except OSError as error:
        _stay(error)
        return None


def _stay(error: Exception) -> None:
    """Say that weights stay in 4 KB pages, and why: not an error, only slower."""
    warnings.warn(f"weights stay in 4 KB pages: {error}", RuntimeWarning, stacklevel=4)


def _aligned(nbytes: int) -> int:
    """nbytes rounded up to a whole number of ALIGN."""
    return -(-nbytes // ALIGN) * ALIGN


def _check_room(nbytes: int) -> None:
    """OSError (ENOMEM) where a copy of `nbytes` would leave less than MIN_HEADROOM (or a tenth of
    RAM) available: the weights copied may be pages of the checkpoint's file, which the kernel
    can drop and read again under pressure where the copy cannot be, so a model that only just
    fits keeps 4 KB pages rather than risk running out of memory."""
    memory = psutil.virtual_memory()
    headroom = max(MIN_HEADROOM, memory.total // 10)
    if nbytes + headroom > memory.available:
        raise OSError(errno.ENOMEM, f"a {nbytes / 2**20:.0f} MiB copy would leave less than {headroom / 2**30:.1f} GiB of the {memory.available / 2**30:.1f} available")
