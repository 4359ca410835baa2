"""The device slot pool: S fixed buffers, each holding one expert's weights, shared by all layers.

One tensor per stored tensor of an expert, [S, *per-expert shape] (e.g. gate_up_proj [S, 2I, H]), so a
grouped GEMM can read any set of slots in place, and a slot is a view (`view(slot)`).
"""

from __future__ import annotations

import torch

from ..expert_format import ExpertSpec
from ..expert_tensors import ExpertTensors


class SlotPool:
    """spec: how one expert is held (its stored tensors, e.g. int8 matrices and their scales)."""

    def __init__(self, spec: ExpertSpec, num_slots: int, device: torch.device, *, fill: float | None = None):
        if num_slots <= 0:
            raise ValueError("a slot pool needs at least one slot")
        self.spec = spec
        self.dtype = spec.dtype  # the model's: what compute runs in
        self.num_slots = num_slots
        self.device = device
        self.tensors = {name: torch.empty((num_slots, *shape), dtype=dtype, device=device) for name, (shape, dtype) in spec.specs.items()}
        if fill is not None:  # tests fill free slots with NaN to prove nothing reads them
            for tensor in self.tensors.values():
                if tensor.is_floating_point():
                    tensor.fill_(fill)
        self.bytes_per_slot = spec.nbytes

    @property
    def nbytes(self) -> int:
        return self.bytes_per_slot * self.num_slots

    def view(self, slot: int) -> ExpertTensors:
        return {name: tensor[slot] for name, tensor in self.tensors.items()}
