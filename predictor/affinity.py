"""Affinity: P(expert j at layer l + d | expert i at layer l), measured on the fit traces.

The inter-layer conditional table ExFlow places with; a token's forecast is the mean of the
rows of its K experts at layer l: scores[j] = 1/K sum_i P(j at l+d | i at l). Rows of experts
never seen fall back to the layer's popularity.
"""

from __future__ import annotations

import numpy as np

from moe_runtime.trace import Trace

from .base import RoutingPredictor, one_hot_experts


class AffinityPredictor(RoutingPredictor):
    name = "affinity"

    def __init__(self, max_lookahead: int = 4) -> None:
        super().__init__()
        self.max_lookahead = max_lookahead

    def _fit(self, trace: Trace) -> None:
        used = one_hot_experts(trace)  # [T, L, E]
        self.tables = {}
        for d in range(1, self.max_lookahead + 1):
            self.tables[d] = conditional_tables(used, d)

    def forecast_trace(self, trace: Trace, lookahead: int) -> np.ndarray:
        self.check_shape(trace)
        if lookahead not in self.tables:
            raise ValueError(f"the affinity predictor was fitted for lookahead 1..{self.max_lookahead}, not {lookahead}")
        used = one_hot_experts(trace)
        table = self.tables[lookahead]  # [L - d, E, E]
        scores = np.zeros_like(used)
        k = trace.top_k
        for layer in range(trace.num_layers - lookahead):
            scores[:, layer] = used[:, layer] @ table[layer] / k
        return scores


def conditional_tables(used: np.ndarray, lookahead: int) -> np.ndarray:
    """[L - d, E, E]: row i of layer l = P(j at l + d | i at l); unseen rows = popularity."""
    num_layers = used.shape[1]
    tables = []
    for layer in range(num_layers - lookahead):
        counts = used[:, layer].T @ used[:, layer + lookahead]  # [E, E] co-occurrences
        seen = counts.sum(axis=1, keepdims=True)
        popularity = used[:, layer + lookahead].mean(axis=0)
        tables.append(np.where(seen > 0, counts / np.maximum(seen, 1), popularity))
    table = np.stack(tables).astype(np.float32)
    # Normalise rows to the K experts a token uses, so rows are expected counts that sum to K.
    k = used[0, 0].sum()
    return table / np.maximum(table.sum(axis=2, keepdims=True), 1e-12) * k
