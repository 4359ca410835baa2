"""Routing statistics that placement works from, measured on traces.

popularity p[l, i]: expected selections of expert i at layer l per token;
transitions W[l, i, j]: tokens going from expert i at layer l to expert j at layer l + 1, each of
a token's K x K pairs weighted 1/K^2 (so one token contributes 1 per layer pair);
co-activation C[l, i, j]: tokens selecting both i and j at layer l.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_runtime.trace import Trace


@dataclass(frozen=True)
class RoutingStatistics:
    popularity: np.ndarray  # [L, E]
    transitions: np.ndarray  # [L-1, E, E]
    coactivation: np.ndarray  # [L, E, E]
    tokens: int

    @property
    def num_layers(self) -> int:
        return self.popularity.shape[0]

    @property
    def num_experts(self) -> int:
        return self.popularity.shape[1]


def routing_statistics(trace: Trace) -> RoutingStatistics:
    ids = trace.expert_ids.astype(np.int64)
    tokens, layers, top_k = ids.shape
    experts = trace.num_experts
    used = np.zeros((tokens, layers, experts), dtype=np.float32)
    np.put_along_axis(used, ids, 1.0, axis=2)
    transitions = np.einsum("tli,tlj->lij", used[:, :-1], used[:, 1:]) / top_k**2
    coactivation = np.einsum("tli,tlj->lij", used, used)
    return RoutingStatistics(used.mean(axis=0), transitions, coactivation, tokens)


def cut_fraction(device_of: np.ndarray, transitions: np.ndarray) -> float:
    """Share of consecutive-layer transition weight whose two experts sit on different devices."""
    same = sum(
        (transitions[layer] * (device_of[layer][:, None] == device_of[layer + 1][None, :])).sum()
        for layer in range(len(transitions))
    )
    return float(1 - same / transitions.sum())
