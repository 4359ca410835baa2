"""One expert's weights on the host: a dict {fused parameter name: tensor of its per-expert shape},
e.g. for Mixtral {"gate_up_proj": [2I, H], "down_proj": [H, I]}, in the runtime dtype; its size
in bytes, and empty buffers for one.
"""

from __future__ import annotations

import torch

ExpertTensors = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]


def allocate_expert(shapes: Shapes, dtype: torch.dtype, *, pin: bool) -> ExpertTensors:
    """Empty host tensors for one expert."""
    return {name: torch.empty(shape, dtype=dtype, pin_memory=pin) for name, shape in shapes.items()}


def expert_nbytes(shapes: Shapes, dtype: torch.dtype) -> int:
    element = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for shape in shapes.values():
        count = 1
        for size in shape:
            count *= size
        total += count * element
    return total
