"""Building this package's C++ CPU extensions on first use (torch's JIT build), safely.

Each extension's source (cpu_decode.cpp, which compiles cpu_gemv.cpp, cpu_decode_ops.cpp and
cpu_decode_layer.cpp in: `decode_extension`; the cache policy's candidates.cpp) is compiled
with the machine's own instruction set into the cache folder's cpu-kernel/<hash>, once per
source (and the sources it includes), torch version and kind of CPU.
Where a build cannot be had (no C++ compiler, no ninja, a failed build) or
MOE_RUNTIME_CPU_KERNEL=torch is set, `build` returns None and callers keep torch's own ops;
the reason is warned once per extension.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import re
import sys
import warnings
from functools import lru_cache
from pathlib import Path

import torch

OPT_OUT = "MOE_RUNTIME_CPU_KERNEL"  # =torch: never build or use these extensions
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]  # no fused multiply-adds the source did not write


DECODE_SOURCE = Path(__file__).with_name("cpu_decode.cpp")


@lru_cache(maxsize=None)
def decode_extension():
    """The CPU decode extension (cpu_decode.cpp: the decode kernel of cpu_gemv.py, the small ops
    of cpu_decode_ops.py and the decoder layer of moe_runtime/layer_front.py in one module),
    built once per machine and torch version into the cache folder (about a minute on 2 cores),
    or None where it cannot be had (`build`)."""
    return build(DECODE_SOURCE, "moe_runtime_cpu_decode", "CPU decode kernels", "about a minute")


def build(source: Path, name: str, what: str, duration: str):
    """The compiled module `name` of `source`, or None where it cannot be had (warned)."""
    if os.environ.get(OPT_OUT, "").lower() == "torch":
        return None
    try:
        return _build(source, name, what, duration)
    except Exception as error:  # no compiler, no ninja, an unsupported platform: torch's ops serve
        warnings.warn(f"moe-runtime's {what} could not be built ({error}); torch's own ops are used instead", stacklevel=3)
        return None


def _build(source: Path, name: str, what: str, duration: str):
    """torch's JIT build into a folder of ours, under a lock of ours: torch's own lock is a file
    that a build killed midway (Ctrl-C) leaves behind, and every later build would wait on it
    forever; holding an flock (released by the kernel when a process dies) proves it stale."""
    from torch.utils.cpp_extension import load

    folder = build_folder_of(source)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)  # torch's, left by a killed build: no one else holds ours
        if not (folder / f"{name}.so").exists():
            print(f"compiling moe-runtime's {what} for this machine, once ({duration}) into {folder}", file=sys.stderr, flush=True)
        return load(
            name=name,
            sources=[str(source)],
            build_directory=str(folder),
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],  # libgomp.so.1: the one torch already loaded, so one thread pool
        )


def build_folder_of(source: Path) -> Path:
    """Where `source` is built for this torch and this CPU's instruction set (the build is
    -march=native, so a cache shared with another kind of CPU gets a build of its own): the
    cache folder's cpu-kernel/<hash>."""
    from ..embedded import cache_root

    key = hashlib.sha256(_source_text(source) + " ".join(FLAGS).encode() + torch.__version__.encode() + _cpu_flags().encode()).hexdigest()[:16]
    return cache_root() / "cpu-kernel" / key


def _source_text(source: Path) -> bytes:
    """The source's bytes and those of the sibling sources it #includes (cpu_decode.cpp compiles
    the other three in): a change to any of them is a new build."""
    text = source.read_bytes()
    included = re.findall(rb'^#include "([^"]+)"', text, flags=re.MULTILINE)
    return text + b"".join(source.with_name(name.decode()).read_bytes() for name in included)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), platform.machine())
    except OSError:
        return platform.machine()
