"""Expert compute straight from the slot pool: which path runs, and the PyTorch paths themselves.

(token, k) rows -> slot of their expert -> rows grouped by slot -> gate_up GEMM (+bias) ->
family gate (SwiGLU, or GPT-OSS's clamped variant) -> down GEMM (+bias) -> x routing weight ->
deterministic sum over K.

Three paths: `triton` (moe_runtime.kernels.grouped_moe, plain-SwiGLU families, one wave),
`grouped_mm` (torch.nn.functional.grouped_mm over the whole pool in place, empty groups for idle
slots) and `loop` (experts_in_place: one pair of GEMMs per used expert, read wherever its
weights lie: a pool slot, or host RAM for in-place and host-side execution). int8 / int4 experts
go through expert_format.linear on the loop path, and the Triton kernels dequantize their tiles.
Rows whose expert is not in `slot_of_expert` (-1) contribute nothing: that is how a wave
computes part of a layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .adapters import ExpertLayout
from .expert_format import ExpertSpec, kernel_operands_many, linear, linear_many
from .expert_tensors import ExpertTensors
from .kernels import KERNELS, cpu_gemv
from .runtime.slot_pool import SlotPool

GROUPED_MM, LOOP, TRITON = "grouped_mm", "loop", "triton"
NATIVE_LAYER = "native-layer"  # a CPU decode row's experts inside its decoder layer's native call (layer_front.py)


def plain_swiglu(layout: ExpertLayout, act_fn) -> bool:
    """Whether experts compute plain SwiGLU on the default layout (not GPT-OSS's variant): what
    the Triton kernel computes, and the CPU decode kernel's gate between its products."""
    default = not layout.is_transposed and layout.is_concatenated and not layout.has_bias and layout.has_gate
    return default and type(act_fn).__name__ in ("SiLU", "SiLUActivation")


def choose_kernel_path(kernel: str, device: torch.device, spec: ExpertSpec, layout: ExpertLayout, act_fn) -> str:
    """`kernel`: "auto" (Triton on CUDA where it applies, else the PyTorch paths), "triton"
    (required; CUDA, or CPU under TRITON_INTERPRET=1), or "torch". Quantized experts: Triton
    dequantizes tiles in registers; the PyTorch path is the per-expert loop (expert_format.linear)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    applies = plain_swiglu(layout, act_fn)
    if kernel == "triton" and not triton_imports():
        raise ValueError("kernel='triton' needs the triton package, which does not import here; pass kernel='auto' or 'torch'")
    if kernel == "auto" and applies and device.type == "cuda" and triton_imports():
        return TRITON  # else the PyTorch path; stats()["compute_path"] says which ran
    if kernel == "triton":
        if not applies:
            raise ValueError("the Triton kernel computes plain SwiGLU experts; this family's experts need kernel='torch'")
        return TRITON
    return choose_path(device, spec)


def triton_imports() -> bool:
    """Whether Triton imports (it ships for Linux x86_64 only; the kernels import it lazily)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_path(device: torch.device, spec: ExpertSpec) -> str:
    """grouped_mm on CUDA (SM80+, bf16 experts: one launch for the whole pool), else the per-slot loop.

    On CPU, torch's grouped_mm pays for every group, idle slots included: 3.2 ms per call over a
    512-slot pool against 1.2 ms for a loop over the 8 slots in use (bf16, H=1024, I=512, decode,
    2-core CPU), so the CPU path loops over used slots only.
    """
    if not hasattr(F, "grouped_mm"):
        return LOOP
    if device.type == "cuda":
        capable = torch.cuda.get_device_capability(device) >= (8, 0)
        return GROUPED_MM if capable and spec.dtype == torch.bfloat16 and not spec.format.quantized else LOOP
    return LOOP


def experts_from_slots(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    slot_of_expert: torch.Tensor,
    pool: SlotPool,
    layout: ExpertLayout,
    apply_gate: Callable[[torch.Tensor], torch.Tensor],
    path: str,
) -> torch.Tensor:
    """out [T, H] = sum_k w[t, k] * expert_{e[t, k]}(x_t) over the (t, k) whose expert has a slot.

    hidden [T, H]; top_k_index [T, K] int; top_k_weights [T, K]; slot_of_expert [E] int64 on the
    pool's device, -1 where the expert is not part of this computation. The Triton path needs
    every routed expert in the table (one wave); the caller falls back to the PyTorch path otherwise.
    """
    if path == TRITON:
        from .kernels import grouped_moe, quantized_banks

        gate_up, down = quantized_banks(pool.tensors)
        out = grouped_moe(  # the cache made every routed expert resident: no value checks (no host sync)
            hidden, gate_up, down, slot_of_expert, top_k_index, top_k_weights, kernel="triton", check_values=False,
        )
        return out.to(hidden.dtype)
    if path == LOOP:
        used = torch.nonzero(slot_of_expert >= 0).squeeze(1).tolist()
        slots = slot_of_expert[used].tolist()
        return experts_in_place(hidden, top_k_index, top_k_weights, {e: pool.view(s) for e, s in zip(used, slots)}, layout, apply_gate)
    # No host sync on this path: sizes never depend on the routing. Rows of experts outside this
    # wave sort after every slot's group and are zeroed (torch.where: grouped_mm leaves rows
    # past the last offset unspecified); group ends come from searchsorted, not bincount.
    num_tokens, top_k = top_k_index.shape
    flat_slots = slot_of_expert[top_k_index.reshape(-1)]  # [T*K], -1: not this wave
    present = flat_slots >= 0
    group = torch.where(present, flat_slots, pool.num_slots)
    order = torch.argsort(group, stable=True)  # (t, k) rows grouped by slot, absent ones last
    slots = group[order]  # [T*K]
    ends = torch.searchsorted(slots, torch.arange(1, pool.num_slots + 1, device=slots.device)).to(torch.int32)  # [S]
    x = hidden[order // top_k].to(pool.dtype)  # [T*K, H]
    gate_up = pool.tensors["gate_up_proj"]
    down = pool.tensors["down_proj"]
    if not layout.is_transposed:  # stored [S, out, in]: GEMMs need [S, in, out]
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    bias_slots = slots.clamp(max=pool.num_slots - 1) if layout.has_bias else None  # absent rows: any slot's bias, zeroed below
    h = F.grouped_mm(x, gate_up, offs=ends)  # [T*K, 2I]
    if layout.has_bias:
        h = h + pool.tensors["gate_up_proj_bias"][bias_slots]
    h = apply_gate(h)  # [T*K, I]
    y = F.grouped_mm(h, down, offs=ends)  # [T*K, H]
    if layout.has_bias:
        y = y + pool.tensors["down_proj_bias"][bias_slots]
    y = torch.where(present[order, None], y * top_k_weights.reshape(-1)[order, None], 0.0)
    contributions = hidden.new_empty(num_tokens * top_k, hidden.shape[1])
    contributions[order] = y.to(hidden.dtype)  # a permutation of the rows: no atomic reduction
    return contributions.view(num_tokens, top_k, -1).sum(dim=1)


def experts_in_place(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    weights: dict[int, ExpertTensors],
    layout: ExpertLayout,
    apply_gate: Callable[[torch.Tensor], torch.Tensor],
    *,
    exact: bool = True,
    swiglu: bool = False,
) -> torch.Tensor:
    """out [T, H] = sum_k w[t, k] * expert_{e[t, k]}(x_t) over the (t, k) whose expert is in `weights`.

    weights: {expert id: its tensors}, wherever they lie (a pool slot, host RAM): each expert's
    GEMMs read them in place, one expert at a time, touching only the experts a token uses.
    A decode step (T = 1) takes its K rows straight from the router's choice; a prefill
    groups the (t, k) rows of each expert with one comparison per expert. exact=False lets the
    CPU decode kernel compute full-precision experts too (config.exact_decode), and, where the
    experts are plain SwiGLU (`swiglu`, see plain_swiglu), a decode step's experts in one call
    with the gate between the products in fp32 (cpu_gemv.silu_experts).
    """
    num_tokens, top_k = top_k_index.shape
    flat_weights = top_k_weights.reshape(-1)
    dtype = compute_dtype(next(iter(weights.values()), {}), hidden.dtype)
    if num_tokens == 1:  # a decode step: the K outputs stacked, weighted and summed in three ops
        rows = [(row, tensors) for row, expert in enumerate(top_k_index[0].tolist()) if (tensors := weights.get(expert)) is not None]
        if not rows:
            return torch.zeros_like(hidden)
        x = hidden.to(dtype)
        scale = flat_weights[[row for row, _ in rows]] if len(rows) < top_k else flat_weights
        summed = experts_in_one_call(
            x, [tensors for _, tensors in rows], layout, apply_gate, scale, exact=exact or layout.is_transposed, swiglu=swiglu and not exact,
        )
        if summed is not None:
            return summed.to(hidden.dtype)
        outputs = torch.cat([one_expert(x, tensors, layout, apply_gate) for _, tensors in rows])  # [K', H]
        return (outputs * scale[:, None]).to(hidden.dtype).sum(dim=0, keepdim=True)
    contributions = hidden.new_zeros(num_tokens * top_k, hidden.shape[1])  # summed over K at the end: deterministic
    flat = top_k_index.reshape(-1)
    for expert, tensors in weights.items():
        rows = torch.nonzero(flat == expert).squeeze(1)  # (t * K + k) rows routed to this expert
        if rows.numel():
            y = one_expert(hidden[rows // top_k].to(dtype), tensors, layout, apply_gate)
            contributions[rows] = (y * flat_weights[rows, None]).to(hidden.dtype)
    return contributions.view(num_tokens, top_k, -1).sum(dim=1)


def compute_dtype(tensors: ExpertTensors, activations: torch.dtype) -> torch.dtype:
    """The dtype an expert's activations are in: its weights' (full precision), else the
    model's (`activations`; a quantized GEMM casts to what its kernel reads, see linear)."""
    held = tensors.get("down_proj")
    return held.dtype if held is not None else activations


def experts_in_one_call(
    x: torch.Tensor, experts: list[ExpertTensors], layout: ExpertLayout, apply_gate, scale: torch.Tensor, *, exact: bool = True, swiglu: bool = False,
) -> torch.Tensor | None:
    """[1, H]: one decode row x [1, H] through each of K' experts, weighted by `scale` [K'] and
    summed (in fp32 in the kernel), each GEMM of all of them in one call of the CPU decode
    kernel (int8 / int4 experts in host RAM; full-precision ones [N, K] too where not `exact`);
    with `swiglu` (plain SwiGLU experts, a step that need not be exact) both GEMMs and the gate
    between them in one call, in fp32 throughout. None where that kernel does not read these
    experts (expert_format.kernel_operands_many), and the caller goes expert by expert."""
    if swiglu:
        gate_up = kernel_operands_many(experts, "gate_up_proj", x.shape[0], exact=exact)
        down = kernel_operands_many(experts, "down_proj", x.shape[0], exact=exact)
        if gate_up is not None and down is not None:
            return cpu_gemv.silu_experts(x[None], gate_up, down, scale)[0]
    h = linear_many(x[None], experts, "gate_up_proj", exact=exact)  # [K', 1, 2I]
    if h is None:
        return None
    if layout.has_bias:
        h = h + torch.stack([tensors["gate_up_proj_bias"] for tensors in experts])[:, None]
        y = linear_many(apply_gate(h), experts, "down_proj", exact=exact) + torch.stack([tensors["down_proj_bias"] for tensors in experts])[:, None]
        return (y[:, 0].float() * scale[:, None].float()).sum(dim=0, keepdim=True).to(x.dtype)
    return linear_many(apply_gate(h), experts, "down_proj", combine=scale, exact=exact)[0]  # [1, H]


def one_expert(x: torch.Tensor, tensors: ExpertTensors, layout: ExpertLayout, apply_gate) -> torch.Tensor:
    """[N, H] -> [N, H] through one expert: gate_up GEMM (+bias), the family's gate, down GEMM
    (+bias); each GEMM reads the expert's weights in whatever format they are held."""
    h = linear(x, tensors, "gate_up_proj", layout.is_transposed)  # stored [in, out] or [out, in]
    if layout.has_bias:
        h = h + tensors["gate_up_proj_bias"]
    y = linear(apply_gate(h), tensors, "down_proj", layout.is_transposed)
    if layout.has_bias:
        y = y + tensors["down_proj_bias"]
    return y
