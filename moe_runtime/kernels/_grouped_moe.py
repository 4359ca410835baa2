"""Private Triton code of grouped_moe (called only by the launcher in grouped_moe.py).

Weights are read straight from the slot pool through the slot table; no atomics anywhere.
Quantized banks (QUANT 1: int8 per output row; 2: int4 nibbles with per-group scale and zero,
see moe_runtime/expert_format.py) are dequantized tile by tile in registers (weight_tile); the
full-precision matrix never exists in memory.

Per-pair path (few rows per expert: decode), products reduced with tl.sum:
1. swiglu_kernel: one program per (token, k) pair and block of I: h = silu(gate_s x) * (up_s x),
   the SwiGLU fused into the first projection, accumulated in fp32 over blocks of H.
2. down_kernel: one program per (token, block of H): out = sum over k, in order, of
   w[t, k] * down_s h: the routing weight fused in, the reduction over K deterministic.

Grouped path (many rows per expert: prefill, large batches), tl.dot on tiles of rows:
the launcher sorts the T*K pairs by slot and cuts each slot's rows into tiles of BLOCK_T, so each
expert's weights are read once per tile instead of once per row.
3. swiglu_grouped_kernel: one program per (tile, block of I): h[pairs] for the tile's rows.
4. down_grouped_kernel: one program per (tile, block of H): y[pairs] = w * down_s h[pairs],
   per pair; the launcher sums y over K in order (deterministic).
"""

import triton
import triton.language as tl


@triton.jit
def weight_tile(w_ptr, s_ptr, n, k, mask, stride_row, out_features, group, QUANT: tl.constexpr):
    """Weights W[n, k] of one slot (n, k: broadcast index tiles of output and input features),
    in the bank's dtype (QUANT 0) or fp32 (dequantized). w_ptr: the slot's weights (QUANT 0), int8 values (1) or packed nibbles (2,
    stride_row = K / 2 bytes); s_ptr: the slot's scales [N] (1) or scales_zeros [K/G, N, 2] (2)."""
    if QUANT == 0:
        w = tl.load(w_ptr + n * stride_row + k, mask=mask, other=0.0)
    elif QUANT == 1:
        q = tl.load(w_ptr + n * stride_row + k, mask=mask, other=0).to(tl.float32)
        w = q * tl.load(s_ptr + n, mask=mask, other=0.0).to(tl.float32)
    else:
        packed = tl.load(w_ptr + n * stride_row + k // 2, mask=mask, other=0).to(tl.int32)
        q = ((packed >> ((k % 2) * 4)) & 15).to(tl.float32)
        at = ((k // group) * out_features + n) * 2
        scale = tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(s_ptr + at + 1, mask=mask, other=0.0).to(tl.float32)
        w = (q - 8.0) * scale + zero
    return w


@triton.jit
def swiglu_kernel(
    x_ptr, gate_up_ptr, gate_up_scales_ptr, slots_ptr, h_ptr,
    top_k, hidden_size, intermediate, group,
    stride_x, stride_s, stride_row, stride_scales, stride_h,
    BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, QUANT: tl.constexpr,
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
    scales = gate_up_scales_ptr + slot * stride_scales
    for start in range(0, hidden_size, BLOCK_H):
        offsets = start + tl.arange(0, BLOCK_H)
        offset_mask = offsets < hidden_size
        x = tl.load(x_ptr + token * stride_x + offsets, mask=offset_mask, other=0.0).to(tl.float32)
        mask = column_mask[:, None] & offset_mask[None, :]
        gate_w = weight_tile(base, scales, columns[:, None], offsets[None, :], mask, stride_row, 2 * intermediate, group, QUANT).to(tl.float32)
        up_w = weight_tile(base, scales, columns[:, None] + intermediate, offsets[None, :], mask, stride_row, 2 * intermediate, group, QUANT).to(tl.float32)
        gate += tl.sum(gate_w * x[None, :], axis=1)
        up += tl.sum(up_w * x[None, :], axis=1)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(h_ptr + row * stride_h + columns, h, mask=column_mask)


@triton.jit
def down_kernel(
    h_ptr, down_ptr, down_scales_ptr, slots_ptr, weights_ptr, out_ptr,
    top_k, hidden_size, intermediate, group,
    stride_h, stride_s, stride_row, stride_scales, stride_out,
    BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, QUANT: tl.constexpr,
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
            w = weight_tile(down_ptr + slot * stride_s, down_scales_ptr + slot * stride_scales, rows[:, None], columns[None, :], mask, stride_row, hidden_size, group, QUANT).to(tl.float32)
            acc += tl.sum(w * h[None, :], axis=1)
        out += weight * acc
    tl.store(out_ptr + token * stride_out + rows, out, mask=row_mask)


@triton.jit
def swiglu_grouped_kernel(
    x_ptr, gate_up_ptr, gate_up_scales_ptr, pairs_ptr, tile_slot_ptr, tile_start_ptr, tile_rows_ptr, h_ptr,
    top_k, hidden_size, intermediate, group,
    stride_x, stride_s, stride_row, stride_scales, stride_h,
    BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, QUANT: tl.constexpr,
):
    tile = tl.program_id(0)
    block = tl.program_id(1)
    count = tl.load(tile_rows_ptr + tile)
    if count == 0:  # a tile past the last one used (the grid is sized for the worst case)
        return
    slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
    lanes = tl.arange(0, BLOCK_T)
    row_mask = lanes < count
    pairs = tl.load(pairs_ptr + tl.load(tile_start_ptr + tile) + lanes, mask=row_mask, other=0)
    tokens = (pairs // top_k).to(tl.int64)
    columns = block * BLOCK_I + tl.arange(0, BLOCK_I)
    column_mask = columns < intermediate
    gate = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    up = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    base = gate_up_ptr + slot * stride_s
    scales = gate_up_scales_ptr + slot * stride_scales
    for start in range(0, hidden_size, BLOCK_H):
        offsets = start + tl.arange(0, BLOCK_H)
        offset_mask = offsets < hidden_size
        x = tl.load(x_ptr + tokens[:, None] * stride_x + offsets[None, :], mask=row_mask[:, None] & offset_mask[None, :], other=0.0)
        mask = offset_mask[:, None] & column_mask[None, :]
        gate_w = weight_tile(base, scales, columns[None, :], offsets[:, None], mask, stride_row, 2 * intermediate, group, QUANT)  # [BLOCK_H, BLOCK_I]
        up_w = weight_tile(base, scales, columns[None, :] + intermediate, offsets[:, None], mask, stride_row, 2 * intermediate, group, QUANT)
        gate_w, up_w = gate_w.to(x.dtype), up_w.to(x.dtype)  # dequantized tiles join x's dtype
        gate = tl.dot(x, gate_w, gate, input_precision="ieee")
        up = tl.dot(x, up_w, up, input_precision="ieee")
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(h_ptr + pairs[:, None].to(tl.int64) * stride_h + columns[None, :], h, mask=row_mask[:, None] & column_mask[None, :])


@triton.jit
def down_grouped_kernel(
    h_ptr, down_ptr, down_scales_ptr, pairs_ptr, tile_slot_ptr, tile_start_ptr, tile_rows_ptr, weights_ptr, y_ptr,
    hidden_size, intermediate, group,
    stride_h, stride_s, stride_row, stride_scales, stride_y,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, QUANT: tl.constexpr,
):
    tile = tl.program_id(0)
    block = tl.program_id(1)
    count = tl.load(tile_rows_ptr + tile)
    if count == 0:
        return
    slot = tl.load(tile_slot_ptr + tile).to(tl.int64)
    lanes = tl.arange(0, BLOCK_T)
    row_mask = lanes < count
    pairs = tl.load(pairs_ptr + tl.load(tile_start_ptr + tile) + lanes, mask=row_mask, other=0).to(tl.int64)
    rows = block * BLOCK_H + tl.arange(0, BLOCK_H)
    out_mask = rows < hidden_size
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for start in range(0, intermediate, BLOCK_I):
        columns = start + tl.arange(0, BLOCK_I)
        column_mask = columns < intermediate
        h = tl.load(h_ptr + pairs[:, None] * stride_h + columns[None, :], mask=row_mask[:, None] & column_mask[None, :], other=0.0)
        w = weight_tile(
            down_ptr + slot * stride_s, down_scales_ptr + slot * stride_scales, rows[None, :], columns[:, None],
            column_mask[:, None] & out_mask[None, :], stride_row, hidden_size, group, QUANT,
        )
        acc = tl.dot(h.to(w.dtype), w, acc, input_precision="ieee")  # [BLOCK_T, BLOCK_I] x [BLOCK_I, BLOCK_H]
    weight = tl.load(weights_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + pairs[:, None] * stride_y + rows[None, :], acc * weight[:, None], mask=row_mask[:, None] & out_mask[None, :])
