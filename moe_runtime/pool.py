"""The device slot pool: S fixed buffers, each holding one expert's weights, shared by all layers.

One tensor per fused parameter, [S, *per-expert shape] (e.g. gate_up_proj [S, 2I, H]), so a
grouped GEMM can read any set of slots in place, and a slot is a view (`view(slot)`).
"""

from __future__ import annotations

import torch

from .expert_tensors import ExpertTensors, Shapes, expert_nbytes


class SlotPool:
    def __init__(self, shapes: Shapes, dtype: torch.dtype, num_slots: int, device: torch.device, *, fill: float | None = None):
        if num_slots <= 0:
            raise ValueError("a slot pool needs at least one slot")
        self.shapes = shapes
        self.dtype = dtype
        self.num_slots = num_slots
        self.device = device
        self.tensors = {name: torch.empty((num_slots, *shape), dtype=dtype, device=device) for name, shape in shapes.items()}
        if fill is not None:  # tests fill free slots with NaN to prove nothing reads them
            for tensor in self.tensors.values():
                tensor.fill_(fill)
        self.bytes_per_slot = expert_nbytes(shapes, dtype)

    @property
    def nbytes(self) -> int:
        return self.bytes_per_slot * self.num_slots

    def view(self, slot: int) -> ExpertTensors:
        return {name: tensor[slot] for name, tensor in self.tensors.items()}
