"""The small ops of a CPU decode step in one call each (cpu_decode_ops.cpp, compiled on first
use): the llama-form RMS norm and rotary embedding, bit for bit as transformers computes them,
and one query's attention, up to rounding.

    rms_norm(x [..., H], weight [H], eps) -> [..., H]
    rotate(q [B, Hq, S, D], k [B, Hk, S, D], cos [B, S, D], sin [B, S, D]) -> (q', k')
    attend(q [B, Hq, 1, D], k [B, Hk, T, D], v [B, Hk, T, Dv], scale) -> [B, Hq, 1, Dv]
    attend_step(q [B, Hq*D], k [B, Hk*D], v [B, Hk*Dv], norms..., cos, sin, keys, values, length, scale) -> [B, Hq*Dv]
    top_k_softmax(logits [T, E], k, renormalise, cast) -> (weights [T, k], index [T, k])

An RMS norm module took about 19 us on the 2-core EPYC of BENCHMARKS.md and this one 5; the
rotary embedding 23 us and this one 10. `available()` is False where the extension cannot be
built or MOE_RUNTIME_CPU_KERNEL=torch is set; callers keep transformers' own code there.
"""

from __future__ import annotations

import torch

from .cpu_build import decode_extension


def extension():
    """The compiled module (cpu_build.decode_extension, which holds these ops), or None where it
    cannot be had."""
    return decode_extension()


def available() -> bool:
    return extension() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, exact: bool = True) -> torch.Tensor:
    """weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype), in the dtype torch promotes
    weight and x to (bf16, fp16, fp32 x with weight of its dtype, or fp32 weight); exact=False
    sums the squares in its own order (not torch's at::mean: the last bit of the mean may differ)."""
    return extension().rms_norm(x, weight, eps, exact)


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rotate_half(q) * sin, the same for k), cos and sin taken at dim 1 as heads."""
    q_embed, k_embed = extension().rotate(q, k, cos, sin)
    return q_embed, k_embed


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v for one query per head, in fp32 and rounded once to q's dtype
    (GQA where Hq is a multiple of Hk; no mask): SDPA's result up to rounding, not bit for bit."""
    return extension().attend(q, k, v, scale)


def top_k_softmax(logits: torch.Tensor, k: int, renormalise: bool, cast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], index [T, k] int64): the top k of softmax(logits) in fp32, ties to the
    lower expert, renormalised to sum to 1 if `renormalise`, in the logits' dtype if `cast`
    (MoEAdapter.select's rule up to the last bits of exp: not bit for bit)."""
    weights, index = extension().top_k_softmax(logits, k, renormalise, cast)
    return weights, index


def attend_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, norms: int, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, q_eps: float,
    k_eps: float, exact: bool, clip: float, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, scale: float,
) -> torch.Tensor:
    """[B, Hq*Dv]: a decode step's attention from its projections q [B, Hq*D], k [B, Hk*D],
    v [B, Hk*Dv] (contiguous; changed in place) to o_proj's input: the q/k norms (`norms`: 0
    none, 1 on the projections, 2 per head; weights of q's dtype; `exact` as rms_norm's),
    clip_qkv where clip > 0, the rotation by cos, sin [B or 1, 1, D], the new key and value
    written at position `length` of the cache's buffers keys, values [B, Hk, capacity, D or Dv],
    and `attend` over the length + 1 positions: rms_norm, rotate and attend's arithmetic, bit
    for bit."""
    return extension().attend_step(q, k, v, norms, q_weight, k_weight, q_eps, k_eps, exact, clip, cos, sin, keys, values, length, scale)
