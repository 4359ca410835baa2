"""Affinity: P(expert j at layer l + d | expert i at layer l), measured on the fit traces.

The inter-layer conditional table ExFlow places with; a token's forecast is the mean of the
rows of its K experts at layer l: scores[j] = 1/K sum_i P(j at l+d | i at l), rows normalised
to sum to K so scores are expected selections. Rows of experts never seen fall back to the
target layer's popularity.
"""

from __future__ import annotations

import numpy as np

from moe_runtime.trace import Trace

from .base import RoutingPredictor
from .context import RoutingContext, context_from_trace

MAX_LOOKAHEAD = 4


class AffinityPredictor(RoutingPredictor):
    name = "affinity"

    def _fit(self, trace: Trace) -> None:
        used = (context_from_trace(trace, history=0).current > 0).astype(np.float32)
        self.top_k = trace.top_k
        self.tables = {d: conditional_tables(used, d, trace.top_k) for d in range(1, min(MAX_LOOKAHEAD, trace.num_layers - 1) + 1)}

    def predict_rows(self, layer: int, lookahead: int, context: RoutingContext) -> np.ndarray:
        if lookahead not in self.tables:
            raise ValueError(f"the affinity predictor covers lookahead 1..{MAX_LOOKAHEAD}, not {lookahead}")
        return context.chosen(layer) @ self.tables[lookahead][layer] / self.top_k


def conditional_tables(used: np.ndarray, lookahead: int, top_k: int) -> np.ndarray:
    """[L - d, E, E]: row i of layer l = P(j at l + d | i at l) x K/sum; unseen rows = popularity."""
    tables = []
    for layer in range(used.shape[1] - lookahead):
        counts = used[:, layer].T @ used[:, layer + lookahead]  # [E, E] co-occurrences
        seen = counts.sum(axis=1, keepdims=True)
        popularity = used[:, layer + lookahead].mean(axis=0)
        tables.append(np.where(seen > 0, counts / np.maximum(seen, 1), popularity))
    table = np.stack(tables).astype(np.float32)
    return table / np.maximum(table.sum(axis=2, keepdims=True), 1e-12) * top_k
