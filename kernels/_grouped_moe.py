"""Private Triton code of grouped_moe (called only by the launcher in grouped_moe.py).

Two kernels, no atomics:
1. swiglu: one program per (token, k) row and block of I: h = silu(gate_s x) * (up_s x), the
   SwiGLU fused into the first projection, accumulated in fp32 over blocks of H.
2. down: one program per (token, block of H): out = sum over k, in order, of w[t, k] * down_s h,
   the routing weight fused into the second projection and the reduction over K deterministic.
Weights are read straight from the slot pool through the slot table (`slots` [T*K]).
Products are reduced with tl.sum (decode rows are single vectors; tl.dot needs 16 rows on GPU).
"""

import triton
import triton.language as tl


@triton.jit
def swiglu_kernel(
    x_ptr, gate_up_ptr, slots_ptr, h_ptr,
    top_k, hidden_size, intermediate,
    stride_x, stride_s, stride_row, stride_h,
    BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)  # t * K + k
    block = tl.program_id(1)
    token = row // top_k
    slot = tl.load(slots_ptr + row).to(tl.int64)
    columns = block * BLOCK_I + tl.arange(0, BLOCK_I)
    column_mask = columns < intermediate
    gate = tl.zeros((BLOCK_I,), dtype=tl.float32)
    up = tl.zeros((BLOCK_I,), dtype=tl.float32)
    base = gate_up_ptr + slot * stride_s
    for start in range(0, hidden_size, BLOCK_H):
        offsets = start + tl.arange(0, BLOCK_H)
        offset_mask = offsets < hidden_size
        x = tl.load(x_ptr + token * stride_x + offsets, mask=offset_mask, other=0.0).to(tl.float32)
        mask = column_mask[:, None] & offset_mask[None, :]
        gate_w = tl.load(base + columns[:, None] * stride_row + offsets[None, :], mask=mask, other=0.0).to(tl.float32)
        up_w = tl.load(base + (columns[:, None] + intermediate) * stride_row + offsets[None, :], mask=mask, other=0.0).to(tl.float32)
        gate += tl.sum(gate_w * x[None, :], axis=1)
        up += tl.sum(up_w * x[None, :], axis=1)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(h_ptr + row * stride_h + columns, h, mask=column_mask)


@triton.jit
def down_kernel(
    h_ptr, down_ptr, slots_ptr, weights_ptr, out_ptr,
    top_k, hidden_size, intermediate,
    stride_h, stride_s, stride_row, stride_out,
    BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr,
):
    token = tl.program_id(0)
    block = tl.program_id(1)
    rows = block * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < hidden_size
    out = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in range(0, top_k):  # fixed order: deterministic
        pair = token * top_k + k
        slot = tl.load(slots_ptr + pair).to(tl.int64)
        weight = tl.load(weights_ptr + pair).to(tl.float32)
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for start in range(0, intermediate, BLOCK_I):
            columns = start + tl.arange(0, BLOCK_I)
            column_mask = columns < intermediate
            h = tl.load(h_ptr + pair * stride_h + columns, mask=column_mask, other=0.0)
            mask = row_mask[:, None] & column_mask[None, :]
            w = tl.load(down_ptr + slot * stride_s + rows[:, None] * stride_row + columns[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(w * h[None, :], axis=1)
        out += weight * acc
    tl.store(out_ptr + token * stride_out + rows, out, mask=row_mask)
