"""The plain PyTorch reference of grouped_moe: the definition tests and benchmarks compare with.

out[t] = sum_k w[t, k] * down_s @ (silu(gate_s @ x_t) * (up_s @ x_t)),  s = slot_of_expert[e[t, k]],
with gate_up [S, 2I, H] (gate rows, then up rows) and down [S, H, I]; computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_moe_reference(
    hidden: torch.Tensor,  # [T, H]
    gate_up: torch.Tensor,  # [S, 2I, H]
    down: torch.Tensor,  # [S, H, I]
    slot_of_expert: torch.Tensor,  # [E] int, -1 = not resident
    top_k_index: torch.Tensor,  # [T, K]
    top_k_weights: torch.Tensor,  # [T, K]
) -> torch.Tensor:
    slots = slot_of_expert.long()[top_k_index.long()]  # [T, K]
    x = hidden.float()
    intermediate = gate_up.shape[1] // 2
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for k in range(top_k_index.shape[1]):
        weights_gate_up = gate_up[slots[:, k]].float()  # [T, 2I, H]
        projected = torch.einsum("th,tnh->tn", x, weights_gate_up)
        h = F.silu(projected[:, :intermediate]) * projected[:, intermediate:]
        y = torch.einsum("ti,thi->th", h, down[slots[:, k]].float())
        out += top_k_weights[:, k].float().unsqueeze(1) * y
    return out.to(hidden.dtype)
