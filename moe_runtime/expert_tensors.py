"""One expert's weights on the host: a dict {tensor name: tensor of its per-expert shape}, e.g.
for Mixtral {"gate_up_proj": [2I, H], "down_proj": [H, I]} in the model's dtype, or the packed
tensors of a quantized format (expert_format.py); its specs {name: (shape, dtype)}, its size in
bytes, and empty buffers for one.
"""

from __future__ import annotations

import math

import torch

ExpertTensors = dict[str, torch.Tensor]
Shapes = dict[str, tuple[int, ...]]
Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


def uniform_specs(shapes: Shapes, dtype: torch.dtype) -> Specs:
    """Specs of an expert held in one dtype (the model's own parameters)."""
    return {name: (tuple(shape), dtype) for name, shape in shapes.items()}


def allocate_expert(specs: Specs, *, pin: bool) -> ExpertTensors:
    """Empty host tensors for one expert."""
    return {name: torch.empty(shape, dtype=dtype, pin_memory=pin) for name, (shape, dtype) in specs.items()}


def expert_nbytes(specs: Specs) -> int:
    return sum(math.prod(shape) * torch.empty(0, dtype=dtype).element_size() for shape, dtype in specs.values())
