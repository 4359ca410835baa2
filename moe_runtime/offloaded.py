"""The module that replaces a block's experts: same forward contract, weights from the slot pool.

forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H], called
positionally by every supported block (GPT-OSS names the last two router_indices and
routing_weights; both spellings are accepted). It owns no parameters: the runtime's slot pool
holds the weights, so `model.to(device)` moves only non-expert weights; its state_dict() entries
are read back from the runtime, and it refuses to be copied or pickled (wrapped_model.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .wrapped_model import experts_state, refuse_copy


class OffloadedExperts(nn.Module):
    def __init__(self, runtime, layer: int, original: nn.Module):
        super().__init__()
        self.layer = layer
        self.num_experts = int(original.num_experts)
        # Plain attributes, not submodules: the originals and the runtime stay out of the
        # module tree (no duplicate parameters, no device moves, unwrap puts them back).
        self.__dict__["runtime"] = runtime
        self.__dict__["original"] = original
        for flag in ("is_transposed", "is_concatenated", "has_bias", "has_gate"):
            if hasattr(original, flag):
                setattr(self, flag, getattr(original, flag))
        self.register_state_dict_post_hook(_with_experts)  # state_dict() holds the experts again

    __deepcopy__ = refuse_copy("copying")
    __reduce_ex__ = refuse_copy("pickling")

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
        *,
        router_indices: torch.Tensor | None = None,
        routing_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        top_k_index = top_k_index if top_k_index is not None else router_indices
        top_k_weights = top_k_weights if top_k_weights is not None else routing_weights
        if top_k_index is None or top_k_weights is None:
            raise TypeError("OffloadedExperts.forward needs top_k_index and top_k_weights")
        return self.runtime.run_layer(self.layer, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, offloaded"


def _with_experts(module: OffloadedExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    """Add the layer's fused expert parameters, read back from the runtime, under their own names."""
    state_dict.update({prefix + name: tensor for name, tensor in experts_state(module.runtime, module.layer).items()})
