"""What a model directory holds, without loading it: family, L, E, K and where the bytes are.

config -> parameter-less skeleton -> adapter blocks -> expert bytes vs non-expert bytes.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from .adapters import adapter_for
from .budget import Budget, parse_budget
from .checkpoint import CheckpointDir, build_skeleton


@dataclass(frozen=True)
class ModelShape:
    """The MoE shape of a model and its byte counts at a given dtype."""

    model_type: str
    num_moe_layers: int  # L
    moe_layers: tuple[int, ...]  # decoder-layer index of each MoE layer
    num_experts: int  # E
    top_k: int  # K
    hidden_size: int  # H
    dtype: str
    bytes_per_expert: int
    total_expert_bytes: int
    non_expert_bytes: int

    def experts_in(self, budget_bytes: int) -> int:
        return budget_bytes // self.bytes_per_expert

    def to_dict(self) -> dict:
        return asdict(self)


def model_shape(model: torch.nn.Module, dtype: torch.dtype | None = None) -> ModelShape:
    """The shape of a built model (real or meta parameters); bytes at `dtype` or its own."""
    blocks = adapter_for(model).blocks(model)
    dtype = dtype or next(iter(blocks[0].experts.parameters())).dtype
    element = torch.empty(0, dtype=dtype).element_size()
    per_expert = blocks[0].expert_numel() * element
    expert_params = {id(p) for block in blocks for p in block.experts.parameters()}
    non_expert = sum(p.numel() for p in model.parameters() if id(p) not in expert_params) * element
    return ModelShape(
        model_type=model.config.model_type,
        num_moe_layers=len(blocks),
        moe_layers=tuple(block.layer_index for block in blocks),
        num_experts=blocks[0].num_experts,
        top_k=blocks[0].top_k,
        hidden_size=int(model.config.hidden_size),
        dtype=str(dtype).removeprefix("torch."),
        bytes_per_expert=per_expert,
        total_expert_bytes=per_expert * sum(block.num_experts for block in blocks),
        non_expert_bytes=non_expert,
    )


def describe_model_dir(path: str | os.PathLike, budget: Budget | None = None) -> dict:
    """`moe-runtime info`: the shape of the checkpoint at `path` and what `budget` holds."""
    checkpoint = CheckpointDir(path)
    try:
        dtype = checkpoint.storage_dtype()
        shape = model_shape(build_skeleton(checkpoint.config(), dtype), dtype)
    finally:
        checkpoint.close()
    info = shape.to_dict()
    info["path"] = str(path)
    if budget is not None:
        budget_bytes = parse_budget(budget, shape.total_expert_bytes)
        held = min(shape.experts_in(budget_bytes), shape.num_moe_layers * shape.num_experts)
        info["budget_bytes"] = budget_bytes
        info["experts_in_budget"] = held
        info["budget_fraction_of_experts"] = held / (shape.num_moe_layers * shape.num_experts)
    return info
