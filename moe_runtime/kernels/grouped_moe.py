"""grouped_moe: experts computed straight from the slot pool (validate -> allocate -> launch).

out [T, H] = sum_k w[t, k] * down_s @ (silu(gate_s @ x_t) * (up_s @ x_t)), s = slot_of_expert[e].
kernel "triton" runs the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
and raises if Triton cannot run; "torch" runs the PyTorch reference; "auto" picks Triton on CUDA
and PyTorch otherwise. Layouts: the transformers default (gate_up [S, 2I, H], gate rows then up
rows; down [S, H, I]). GPT-OSS (transposed, interleaved gate/up, biases, clamped SwiGLU) is not
expressible with these arguments: the runtime keeps its PyTorch path for that family.
gate_up and down may also be QuantizedBank (int8, or int4 nibbles: kernels/quantized.py), whose
tiles the kernels dequantize in registers.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch

from .quantized import QuantizedBank
from .reference import grouped_moe_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNELS = ("auto", "triton", "torch")  # the same choice as OffloadConfig.kernel


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@lru_cache(maxsize=None)
def tile_config(kind: str) -> dict:
    """Tile sizes for 'cuda' or 'interpreter' from tile_configs.json (data, not autotuning)."""
    table = json.loads((Path(__file__).parent / "tile_configs.json").read_text())
    return table[kind]


def _validate(hidden, gate_up, down, slot_of_expert, top_k_index, top_k_weights, *, check_values: bool) -> None:
    gate_up_shape, down_shape = tuple(gate_up.shape), tuple(down.shape)  # a QuantizedBank's: the dequantized shape
    if hidden.dim() != 2 or len(gate_up_shape) != 3 or len(down_shape) != 3:
        raise ValueError(f"expected hidden [T, H], gate_up [S, 2I, H], down [S, H, I]; got {tuple(hidden.shape)}, {gate_up_shape}, {down_shape}")
    tokens, size = hidden.shape
    slots, double, gate_size = gate_up_shape
    if double % 2 or gate_size != size or down_shape != (slots, size, double // 2):
        raise ValueError(f"gate_up {gate_up_shape} and down {down_shape} do not fit hidden size {size}: need [S, 2I, H] and [S, H, I]")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != tokens or top_k_weights.shape != top_k_index.shape:
        raise ValueError(f"top_k_index and top_k_weights must both be [T={tokens}, K], got {tuple(top_k_index.shape)} and {tuple(top_k_weights.shape)}")
    if slot_of_expert.dim() != 1 or slot_of_expert.dtype.is_floating_point or top_k_index.dtype.is_floating_point:
        raise ValueError("slot_of_expert [E] and top_k_index [T, K] must be integer tensors")
    quantized = isinstance(gate_up, QuantizedBank), isinstance(down, QuantizedBank)
    if quantized[0] != quantized[1]:
        raise ValueError("gate_up and down must both be quantized banks or both be tensors")
    for name, tensor in (("hidden", hidden), ("gate_up", gate_up), ("down", down)):
        if not isinstance(tensor, QuantizedBank) and tensor.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {tensor.dtype}; grouped_moe supports float32, float16 and bfloat16 (or a QuantizedBank)")
    if not quantized[0] and not (hidden.dtype == gate_up.dtype == down.dtype):
        raise ValueError(f"hidden, gate_up and down must share a dtype, got {hidden.dtype}, {gate_up.dtype}, {down.dtype}")
    devices = {t.device for t in (hidden, gate_up, down, slot_of_expert, top_k_index, top_k_weights)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if check_values:
        _validate_values(gate_up.shape[0], slot_of_expert, top_k_index)


def _validate_values(slots: int, slot_of_expert, top_k_index) -> None:
    """Routing in range and every routed expert resident (reads values: a host sync on CUDA)."""
    experts = slot_of_expert.shape[0]
    if top_k_index.numel() and (int(top_k_index.min()) < 0 or int(top_k_index.max()) >= experts):
        raise ValueError(f"top_k_index holds expert ids outside [0, {experts})")
    routed = torch.unique(top_k_index)
    missing = routed[slot_of_expert[routed] < 0]
    if missing.numel():
        raise ValueError(f"routed expert(s) {missing.tolist()} are not resident (slot -1): load them before computing")
    if int(slot_of_expert.max()) >= slots:
        raise ValueError(f"slot_of_expert points past the {slots} slots of the pool")


def grouped_moe(
    hidden, gate_up, down, slot_of_expert, top_k_index, top_k_weights, *, kernel: str = "auto", check_values: bool = True
) -> torch.Tensor:
    """The experts' output [T, H] for tokens `hidden` routed to resident experts of the pool.

    check_values=False skips the checks that read tensor values (routing in range, experts
    resident), which wait for the device: for callers that guarantee them (the runtime's slot
    cache) and for CUDA graph capture. Shapes, dtypes and devices are always checked.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    _validate(hidden, gate_up, down, slot_of_expert, top_k_index, top_k_weights, check_values=check_values)
    if kernel == "auto":
        kernel = "triton" if hidden.is_cuda else "torch"
    if kernel == "torch":
        if isinstance(gate_up, QuantizedBank):
            gate_up, down = gate_up.dequantize(), down.dequantize()
        return grouped_moe_reference(hidden, gate_up, down, slot_of_expert, top_k_index, top_k_weights)
    return _launch(hidden, gate_up, down, slot_of_expert, top_k_index, top_k_weights)


def _launch(hidden, gate_up, down, slot_of_expert, top_k_index, top_k_weights, path: str = "auto") -> torch.Tensor:
    """Run the Triton kernels: per-pair for few rows per expert, grouped (tl.dot tiles) for many.

    path: "auto" (by the table's pairs-per-expert threshold), "pairs" or "grouped".
    """
    if not hidden.is_cuda and not interpreting():
        raise RuntimeError("the Triton kernel needs CUDA tensors, or TRITON_INTERPRET=1 (set before import) for CPU tensors")
    try:
        from . import _grouped_moe
    except ImportError as error:
        raise RuntimeError(f"Triton is not installed or cannot load here ({error}); use kernel='torch'") from None
    out_dtype = hidden.dtype
    gate_up, down = _operand(gate_up), _operand(down)
    if interpreting() and out_dtype == torch.bfloat16:
        # The interpreter computes bf16 on raw bits: upcast on the host, round back with torch.
        hidden = hidden.float()
        gate_up, down = (operand.with_dtype(torch.float32) for operand in (gate_up, down))
    hidden = hidden.contiguous()
    slots = slot_of_expert.to(torch.int32)[top_k_index.long()].reshape(-1).contiguous()  # [T*K]
    weights = top_k_weights.float().reshape(-1).contiguous()
    config = tile_config("cuda" if hidden.is_cuda else "interpreter")
    tokens, top_k = top_k_index.shape
    if path == "auto":
        pairs_per_expert = tokens * top_k / max(1, slot_of_expert.shape[0])
        path = "grouped" if pairs_per_expert >= config["grouped_min_pairs_per_expert"] else "pairs"
    run = _run_grouped if path == "grouped" else _run_pairs
    return run(_grouped_moe, config, hidden, gate_up, down, slots, weights, top_k).to(out_dtype)


class _Operand:
    """One weight bank as the kernels take it: values, scales (the values again when full
    precision: unread), its QUANT constant, group size and logical [S, N, K] shape."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, quant: int, group: int, shape: tuple[int, int, int]):
        self.values, self.scales, self.quant, self.group, self.shape = values.contiguous(), scales.contiguous(), quant, group, shape

    def with_dtype(self, dtype: torch.dtype) -> _Operand:
        """Floating-point parts in `dtype` (the interpreter's bf16 workaround); integer values kept."""
        values = self.values.to(dtype) if self.values.is_floating_point() else self.values
        return _Operand(values, self.scales.to(dtype), self.quant, self.group, self.shape)


def _operand(bank) -> _Operand:
    if isinstance(bank, QuantizedBank):
        return _Operand(bank.values, bank.scales, bank.quant_code, bank.group, bank.shape)
    return _Operand(bank, bank, 0, 0, tuple(bank.shape))


def _run_pairs(kernels, config, hidden, gate_up, down, slots, weights, top_k) -> torch.Tensor:
    """One program per (token, k) pair (first GEMM) and per token (second): decode."""
    tokens, size = hidden.shape
    intermediate = gate_up.shape[1] // 2
    h = torch.empty((tokens * top_k, intermediate), dtype=torch.float32, device=hidden.device)
    out = torch.empty((tokens, size), dtype=torch.float32, device=hidden.device)
    first, second = config["swiglu"], config["down"]
    grid = (tokens * top_k, triton_cdiv(intermediate, first["BLOCK_I"]))
    kernels.swiglu_kernel[grid](
        hidden, gate_up.values, gate_up.scales, slots, h, top_k, size, intermediate, gate_up.group,
        hidden.stride(0), *_strides(gate_up), h.stride(0), **first, QUANT=gate_up.quant,
    )
    grid = (tokens, triton_cdiv(size, second["BLOCK_H"]))
    kernels.down_kernel[grid](
        h, down.values, down.scales, slots, weights, out, top_k, size, intermediate, down.group,
        h.stride(0), *_strides(down), out.stride(0), **second, QUANT=down.quant,
    )
    return out


def _run_grouped(kernels, config, hidden, gate_up, down, slots, weights, top_k) -> torch.Tensor:
    """Tiles of up to BLOCK_T rows of one slot (tl.dot), then a sum over K in order: prefill."""
    tokens, size = hidden.shape
    intermediate = gate_up.shape[1] // 2
    first, second = config["swiglu_grouped"], config["down_grouped"]
    pairs, tile_slot, tile_start, tile_rows = tile_table(slots, gate_up.shape[0], first["BLOCK_T"])
    h = torch.empty((tokens * top_k, intermediate), dtype=torch.float32, device=hidden.device)
    y = torch.empty((tokens * top_k, size), dtype=torch.float32, device=hidden.device)
    grid = (len(tile_rows), triton_cdiv(intermediate, first["BLOCK_I"]))
    kernels.swiglu_grouped_kernel[grid](
        hidden, gate_up.values, gate_up.scales, pairs, tile_slot, tile_start, tile_rows, h, top_k, size, intermediate, gate_up.group,
        hidden.stride(0), *_strides(gate_up), h.stride(0), **first, QUANT=gate_up.quant,
    )
    grid = (len(tile_rows), triton_cdiv(size, second["BLOCK_H"]))
    kernels.down_grouped_kernel[grid](
        h, down.values, down.scales, pairs, tile_slot, tile_start, tile_rows, weights, y, size, intermediate, down.group,
        h.stride(0), *_strides(down), y.stride(0), **second, QUANT=down.quant,
    )
    return y.view(tokens, top_k, size).sum(dim=1)


def _strides(operand: _Operand) -> tuple[int, int, int]:
    """(slot stride, row stride, scales' slot stride) of a bank, in elements of its tensors."""
    return operand.values.stride(0), operand.values.stride(1), operand.scales.stride(0)


def tile_table(slots: torch.Tensor, num_slots: int, block_t: int) -> tuple[torch.Tensor, ...]:
    """Cut the pairs [P] (their slots) into tiles of at most `block_t` rows of one slot each.

    Returns pairs sorted by slot [P], and per tile: its slot, the index of its first row in the
    sorted pairs and its row count (0 for the unused tail). The number of tiles is the worst case
    P // block_t + min(S, P), so nothing here waits for the device (no host sync).
    """
    count = slots.numel()
    order = torch.argsort(slots, stable=True).to(torch.int32)
    rows_of_slot = torch.zeros(num_slots, dtype=torch.int64, device=slots.device).scatter_add_(0, slots.long(), torch.ones_like(slots, dtype=torch.int64))
    tiles_of_slot = (rows_of_slot + block_t - 1) // block_t
    tiles_before = torch.cumsum(tiles_of_slot, 0)
    rows_before = torch.cumsum(rows_of_slot, 0) - rows_of_slot
    tiles = count // block_t + min(num_slots, count)
    index = torch.arange(tiles, device=slots.device)
    slot = torch.searchsorted(tiles_before, index, right=True).clamp_(max=num_slots - 1)
    within = index - (tiles_before[slot] - tiles_of_slot[slot])
    rows = (rows_of_slot[slot] - within * block_t).clamp(0, block_t)
    rows = torch.where(index < tiles_before[-1], rows, torch.zeros_like(rows))
    start = rows_before[slot] + within * block_t
    return order, slot.to(torch.int32), start.to(torch.int32), rows.to(torch.int32)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
