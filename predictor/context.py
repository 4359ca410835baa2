"""What a predictor may look at: the routing known when token t finishes MoE layer l.

current [N, L, E]: gate weights of the N tokens in flight at every layer (only layers <= l are
read); previous [P, N, L, E]: one-hot routing of the P tokens before each of them in its
sequence (zeros where there is none); hidden [N, L, H]: router inputs (only for predictors that
read hidden states, e.g. the cross-layer gate; from traces recorded with router_inputs=True).
Built all at once from a trace (evaluation, simulator) or step by step in a live model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_runtime.trace import Trace

HISTORY = 3  # previous tokens a predictor may read


@dataclass
class RoutingContext:
    current: np.ndarray  # [N, L, E] float32 gate weights (0 where not chosen)
    previous: np.ndarray  # [P, N, L, E] float32 one-hot of the p-th previous token
    hidden: np.ndarray | None = None  # [N, L, H] router inputs

    @property
    def num_rows(self) -> int:
        return self.current.shape[0]

    def chosen(self, layer: int) -> np.ndarray:
        """[N, E] one-hot of the current tokens' experts at `layer`."""
        return (self.current[:, layer] > 0).astype(np.float32)


def dense_weights(trace: Trace) -> np.ndarray:
    """[T, L, E] gate weights scattered to their experts (0 elsewhere)."""
    out = np.zeros((trace.num_tokens, trace.num_layers, trace.num_experts), dtype=np.float32)
    np.put_along_axis(out, trace.expert_ids.astype(np.int64), np.maximum(trace.gate_weights.astype(np.float32), 1e-6), axis=2)
    return out


def context_from_trace(trace: Trace, history: int = HISTORY) -> RoutingContext:
    """The context of every token of a trace (previous tokens stop at sequence starts)."""
    current = dense_weights(trace)
    chosen = (current > 0).astype(np.float32)
    previous = np.zeros((history, *current.shape), dtype=np.float32)
    step = np.arange(trace.num_tokens) - 1
    step[trace.seq_offsets[:-1]] = -1
    rows = np.arange(trace.num_tokens)
    for p in range(history):
        rows = np.where(rows >= 0, step[np.maximum(rows, 0)], -1)
        has = rows >= 0
        previous[p, has] = chosen[rows[has]]
    hidden = None if trace.router_inputs is None else trace.router_inputs.astype(np.float32)
    return RoutingContext(current, previous, hidden)
