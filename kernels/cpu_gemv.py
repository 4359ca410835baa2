"""Decode-time products on the CPU: a few input rows times many weight matrices in one call
(cpu_gemv.cpp, compiled on first use with the machine's own instruction set).

    products(x [A, R, K], matrices: M x [N, K]) -> [M, R, N],  A = 1 or M

A MoE decode step is K small GEMVs per layer; torch's weight-only kernels pay a call each and
stream 15-28 GB/s of weights on the 2-core EPYC of BENCHMARKS.md, where memory gives 50-78.
This one computes all of a layer's experts in one parallel loop on torch's own OpenMP threads.
Formats (moe_runtime/expert_format.py): fp32 / fp16 / bf16 [N, K]; int8 [N, K] with per-row
bf16 scales; int4 as plain nibbles [N, K/2] with bf16 scales_zeros [K/G, N, 2].

Where it cannot be built (no C++ compiler, a failed build) or MOE_RUNTIME_CPU_KERNEL=torch is
set, `available()` is False and callers keep torch's kernels; the reason is warned once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_gemv.cpp")
OPT_OUT = "MOE_RUNTIME_CPU_KERNEL"  # =torch: never build or use this kernel


@lru_cache(maxsize=None)
def extension():
    """The compiled module (built once per machine and torch version into the cache folder,
    about 25 s on 2 cores), or None where it cannot be had."""
    if os.environ.get(OPT_OUT, "").lower() == "torch":
        return None
    try:
        return _build()
    except Exception as error:  # no compiler, no ninja, an unsupported platform: torch's kernels serve
        warnings.warn(f"moe-runtime's CPU decode kernel could not be built ({error}); torch's kernels are used instead", stacklevel=2)
        return None


def _build():
    """torch's JIT build into a folder of ours, under a lock of ours: torch's own lock is a file
    that a build killed midway (Ctrl-C) leaves behind, and every later build would wait on it
    forever; holding an flock (released by the kernel when a process dies) proves it stale."""
    from torch.utils.cpp_extension import load

    folder = build_folder()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)  # torch's, left by a killed build: no one else holds ours
        if not (folder / "moe_runtime_cpu_gemv.so").exists():
            print(f"compiling moe-runtime's CPU decode kernel for this machine, once (about 25 s) into {folder}", file=sys.stderr, flush=True)
        return load(
            name="moe_runtime_cpu_gemv",
            sources=[str(SOURCE)],
            build_directory=str(folder),
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],  # libgomp.so.1: the one torch already loaded, so one thread pool
        )


def build_folder() -> Path:
    """Where this source is built for this torch and this CPU's instruction set (the build is
    -march=native, so a cache shared with another kind of CPU gets a build of its own): the
    cache folder's cpu-kernel/<hash>."""
    from ..embedded import cache_root

    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()).hexdigest()[:16]
    return cache_root() / "cpu-kernel" / key


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), platform.machine())
    except OSError:
        return platform.machine()


def available() -> bool:
    return extension() is not None


def products(
    x: torch.Tensor, matrices: list[torch.Tensor], scales: list[torch.Tensor] | None = None, group: int = 0, combine: torch.Tensor | None = None,
) -> torch.Tensor:
    """[M, R, N] in x's dtype: x[a] @ matrices[m]^T, a = 0 when x is [1, R, K] (shared rows), m
    when it is [M, R, K]; accumulated in fp32 whatever x's dtype (fp32, bf16, fp16).

    scales: int8's [N] or int4's [K/G, N, 2] per matrix (bf16); group: int4's G, 0 for the
    other formats; combine: [M] weights, and the result is their weighted sum [1, R, N] (a
    decode step's experts, summed in fp32). The module must be available()."""
    return extension().gemv_many(x, matrices, scales or [], group, combine)
