"""Decode-time products on the CPU: a few input rows times many weight matrices in one call
(cpu_gemv.cpp, compiled on first use with the machine's own instruction set into the
package's CPU decode extension, cpu_build.decode_extension).

    products(x [A, R, K], matrices: M x [N, K]) -> [M, R, N],  A = 1 or M

A MoE decode step is K small GEMVs per layer; torch's weight-only kernels pay a call each and
stream 15-28 GB/s of weights on the 2-core EPYC of BENCHMARKS.md, where memory gives 50-78.
This one computes all of a layer's experts in one parallel loop on torch's own OpenMP threads.
Formats (moe_runtime/expert_format.py): fp32 / fp16 / bf16 [N, K]; int8 [N, K] with per-row
bf16 scales; int4 as plain nibbles [N, K/2] with bf16 scales_zeros [K/G, N, 2], or (AVX-512
builds) as tiles [N/16, K/G, 64 + 8G] with their scales inline (expert_format.pack_tiles).

Where it cannot be built (no C++ compiler, a failed build) or MOE_RUNTIME_CPU_KERNEL=torch is
set, `available()` is False and callers keep torch's kernels; the reason is warned once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .cpu_build import DECODE_SOURCE, OPT_OUT, build_folder_of, decode_extension

FLOAT_WEIGHTS = (torch.bfloat16, torch.float16, torch.float32)  # the full-precision weights it reads (cpu_gemv.cpp's Format)
__all__ = ["FLOAT_WEIGHTS", "OPT_OUT", "available", "build_folder", "extension", "products", "reads_tiles", "silu_experts"]


def extension():
    """The compiled module (cpu_build.decode_extension: this kernel is compiled into the package's
    one CPU decode extension), or None where it cannot be had."""
    return decode_extension()


def build_folder() -> Path:
    """Where the extension is built for this torch and this CPU (cpu_build.build_folder_of)."""
    return build_folder_of(DECODE_SOURCE)


def available() -> bool:
    return extension() is not None


def reads_tiles() -> bool:
    """Whether this build computes int4 TILES (cpu_gemv.cpp: AVX-512 builds only)."""
    return available() and extension().uses_avx512()


def products(
    x: torch.Tensor, matrices: list[torch.Tensor], scales: list[torch.Tensor] | None = None, group: int = 0, combine: torch.Tensor | None = None,
) -> torch.Tensor:
    """[M, R, N] in x's dtype: x[a] @ matrices[m]^T, a = 0 when x is [1, R, K] (shared rows), m
    when it is [M, R, K]; accumulated in fp32 whatever x's dtype (fp32, bf16, fp16).

    scales: int8's [N] or plain int4's [K/G, N, 2] per matrix (bf16; tiles: none); group:
    int4's G, 0 for the other formats; combine: [M] weights, and the result is their weighted
    sum [1, R, N] (a decode step's experts, summed in fp32). The module must be available()."""
    return extension().gemv_many(x, matrices, scales or [], group, combine)


def silu_experts(x: torch.Tensor, gate_up: tuple[list, list, int], down: tuple[list, list, int], combine: torch.Tensor) -> torch.Tensor:
    """[1, R, H] in x's dtype: sum_m combine[m] down_m(silu(g) * u), (g, u) the halves of
    gate_up_m(x) for x [1, R, H]: a decode step's plain SwiGLU experts in one call, each product
    as `products` computes it, the gate between them in fp32 (transformers' default gate,
    without its roundings to x's dtype), the sum rounded once. gate_up, down: (matrices, scales,
    group) as `products` takes them (M of each; down's inputs are its own expert's gated rows)."""
    return extension().silu_experts(x, *gate_up, *down, combine)
