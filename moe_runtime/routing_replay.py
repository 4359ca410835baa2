"""Routing replay: a model of any weights routes exactly as a recorded trace says.

trace [T, L, K] -> a forward hook on every MoE router -> each router call of R rows takes the
next R tokens of the trace at its layer -> (router_logits, top_k_weights, top_k_index) in the
family's own output format, weights in the router's dtype.

A random-weight model of a real shape then behaves, for the runtime, exactly like the real
model on the real routing: the same experts in the same order with the same gate weights, so the
same loads. Tokens are consumed in the order the model sees them: feed a sequence's tokens in
order (a prefill of n rows takes n tokens, each decode step one). Each layer keeps its own
cursor; `position` says how many tokens the last layer has consumed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .adapters import adapter_for
from .trace import Trace


class RoutingReplay:
    """The router hooks of one replay; see `replay_routing`."""

    def __init__(self, model: nn.Module, trace: Trace):
        blocks = adapter_for(model.config).blocks(model)
        shape = (len(blocks), blocks[0].num_experts, blocks[0].top_k)
        if (trace.num_layers, trace.num_experts, trace.top_k) != shape:
            raise ValueError(
                f"the trace routes (L, E, K) = {(trace.num_layers, trace.num_experts, trace.top_k)} but the model has {shape}: "
                "replay a trace of this architecture (or build the model with the trace's shape)"
            )
        self.trace = trace
        self.blocks = blocks
        self.cursor = [0] * len(blocks)
        self._index = torch.as_tensor(trace.expert_ids.astype("int64"))  # [T, L, K]
        self._weights = torch.as_tensor(trace.gate_weights.astype("float32"))  # [T, L, K]
        self._handles = [block.router.register_forward_hook(self._hook(block.moe_index)) for block in blocks]

    @property
    def position(self) -> int:
        """Tokens of the trace the model has routed so far (at its last MoE layer)."""
        return self.cursor[-1]

    def _hook(self, layer: int):
        def replace(router, inputs, output):
            logits, weights, _ = output
            rows = logits.shape[0]
            begin = self.cursor[layer]
            if begin + rows > self.trace.num_tokens:
                raise IndexError(f"routing replay ran past the trace's {self.trace.num_tokens} tokens at MoE layer {layer}")
            self.cursor[layer] = begin + rows
            index = self._index[begin : begin + rows, layer].to(logits.device)
            chosen = self._weights[begin : begin + rows, layer].to(device=logits.device, dtype=weights.dtype)
            return logits, chosen, index

        return replace

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextlib.contextmanager
def replay_routing(model: nn.Module, trace: Trace) -> Iterator[RoutingReplay]:
    """Within the block, every MoE router of `model` (wrapped or not) returns the trace's experts
    and gate weights for the tokens it sees, in order. Refuses a trace of another shape."""
    replay = RoutingReplay(model, trace)
    try:
        yield replay
    finally:
        replay.close()
