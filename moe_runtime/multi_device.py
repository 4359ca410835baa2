"""Running a multi-GPU placement plan: every expert resident on the device the plan gives it.

Per MoE layer: the router runs on the home device (devices[0]) -> the (token, k) pairs are
grouped by their expert's device -> each group's hidden rows, local expert ids and weights go to
that device -> the family's own experts forward runs there on that device's experts alone
(one pair per row, K = 1) -> results come home and are summed per token. The experts' weights
are split once at wrap time; nothing is offloaded. Pairs sent off the home device are counted
per layer (`stats()["remote_pairs"]`), beside the pairs each device computed.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from .adapters import MoEAdapter, MoEBlock
from .budget import Budget, format_bytes, parse_budget
from .expert_tensors import expert_nbytes, uniform_specs

if TYPE_CHECKING:
    from .placement import MultiGpuPlan


class DeviceExperts(nn.Module):
    """Replaces one block's experts: expert e computes on devices[device_of[e]]."""

    def __init__(self, original: nn.Module, names: list[str], device_of: list[int], devices: list[torch.device]):
        super().__init__()
        self.devices = devices
        self.register_buffer("device_of", torch.tensor(device_of), persistent=False)
        self.register_buffer("local_id", torch.zeros(len(device_of), dtype=torch.long), persistent=False)
        parts = []
        for index, device in enumerate(devices):
            experts = [e for e, d in enumerate(device_of) if d == index]
            self.local_id[experts] = torch.arange(len(experts))
            parts.append(_experts_subset(original, names, experts, device))
        # A plain attribute, not submodules: `model.to(home)` must not gather every part onto one device.
        self.__dict__["parts"] = parts
        self.pairs = [0] * len(devices)  # (token, k) pairs each device computed

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None, *, router_indices=None, routing_weights=None):
        top_k_index = top_k_index if top_k_index is not None else router_indices
        top_k_weights = top_k_weights if top_k_weights is not None else routing_weights
        home = hidden_states.device
        out = torch.zeros_like(hidden_states)
        on_device, local = self.device_of[top_k_index], self.local_id[top_k_index]  # [T, K] each
        for index, (part, device) in enumerate(zip(self.parts, self.devices)):
            token, k = (on_device == index).nonzero(as_tuple=True)
            if not len(token):
                continue
            rows = (hidden_states[token], local[token, k][:, None], top_k_weights[token, k][:, None])
            result = part(*(row.to(device) for row in rows))
            out.index_add_(0, token, result.to(home, out.dtype))
            self.pairs[index] += len(token)
        return out


def _experts_subset(original: nn.Module, names: list[str], experts: list[int], device: torch.device) -> nn.Module:
    """A copy of the family's experts module holding only `experts` (fused tensors sliced), on `device`."""
    part = copy.copy(original)
    part._parameters = {name: nn.Parameter(getattr(original, name).data[experts].to(device), requires_grad=False) for name in names}
    part._buffers = dict(original._buffers)
    part._modules = dict(original._modules)
    part.num_experts = len(experts)
    return part.to(device)


class MultiDeviceRuntime:
    """What `wrap` installs for a multi-GPU plan: the split experts and their counters."""

    def __init__(self, adapter: MoEAdapter, blocks: list[MoEBlock], plan: MultiGpuPlan, devices: list[torch.device], budget: Budget):
        self.adapter = adapter
        self.blocks = blocks
        self.devices = devices
        _check_budget(blocks, plan, budget)
        self.parts = [
            DeviceExperts(block.experts, list(block.expert_shapes()), plan.device_of[index], devices) for index, block in enumerate(blocks)
        ]
        self.stats = self  # stats() reads as_dict(); reset_stats() calls reset()

    def install(self, model: nn.Module, attr: str) -> None:
        """Swap in the split experts; the rest of the model moves to the home device, devices[0]."""
        self.home_device, self.attr = next(model.parameters()).device, attr
        for block, part in zip(self.blocks, self.parts):
            setattr(block.block, self.adapter.experts_attr, part)
        model.to(self.devices[0])
        setattr(model, attr, self)

    def remove(self, model: nn.Module) -> None:
        """Put the original experts back, the model on its device from before wrap."""
        for block in self.blocks:
            setattr(block.block, self.adapter.experts_attr, block.experts)
        self.parts = []
        model.to(self.home_device)
        delattr(model, self.attr)

    def reset(self) -> None:
        for part in self.parts:
            part.pairs = [0] * len(self.devices)

    def as_dict(self) -> dict:
        per_layer = [list(part.pairs) for part in self.parts]
        return {
            "devices": [str(d) for d in self.devices],
            "pairs_per_device": [sum(layer[i] for layer in per_layer) for i in range(len(self.devices))],
            "remote_pairs": sum(sum(layer[1:]) for layer in per_layer),
            "per_layer_pairs": per_layer,
        }

    def profile_info(self) -> dict:
        return {}


def _check_budget(blocks: list[MoEBlock], plan: MultiGpuPlan, budget: Budget) -> None:
    """Every expert stays resident: each device's share must fit the per-device `budget`."""
    per_expert = expert_nbytes(uniform_specs(blocks[0].expert_shapes(), next(blocks[0].experts.parameters()).dtype))
    total = per_expert * sum(block.num_experts for block in blocks)
    most = max(plan.experts_on(index) for index in range(plan.gpus)) * per_expert
    room = parse_budget(budget, total)
    if room < most:
        raise ValueError(
            f"the multi-GPU plan keeps {format_bytes(most)} of experts resident on each device but budget {budget!r} "
            f"gives each {format_bytes(room)}: raise budget to {most / total:.3f} (a share of all experts) or plan more GPUs"
        )
