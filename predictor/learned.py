"""Learned: a ridge regression per (lookahead d, target layer) on what is known at layer l.

ExpertFlow's idea of a lightweight routing-path predictor, fitted offline on traces. Features of
a token after layer l, for target layer j = l + d (13 E + 1 values):
  its gate weights at layers l, l-1, ..., l-5 (6 E);
  the previous token's experts at layers j-1, j, j+1 and l, and the two before it at j (6 E);
  the affinity table's forecast for j (E); a bias.
Chosen by measurement on held-out ESFT sequences (fit on the first half of each task's
sequences, scored on the second; recall@6 at d = 1): current layers l..l-2 only 0.726; l..l-5
0.747; + more history and the affinity forecast 0.754. A per-layer MLP (0.721-0.726) and a
softmax-loss linear model (0.693) did worse on this much data. One prediction is two small
matrix products: [1, 13 E + 1] x [13 E + 1, E].
"""

from __future__ import annotations

import numpy as np

from moe_runtime.trace import Trace

from .affinity import AffinityPredictor
from .base import RoutingPredictor
from .context import RoutingContext, context_from_trace

CURRENT_LAYERS = 6
RIDGE = 1.0


class LearnedPredictor(RoutingPredictor):
    name = "learned"

    def __init__(self, lookaheads: tuple[int, ...] = (1, 2, 3)) -> None:
        super().__init__()
        self.lookaheads = tuple(sorted(lookaheads))
        self.affinity = AffinityPredictor()
        self.weights: dict[int, np.ndarray] = {}  # d -> [L - d, F, E]

    def _fit(self, trace: Trace) -> None:
        self.affinity.fit(trace)
        context = context_from_trace(trace)
        for d in self.lookaheads:
            layers = []
            for layer in range(trace.num_layers - d):
                x = self.features(layer, d, context)
                y = context.chosen(layer + d)
                gram = x.T @ x + RIDGE * np.eye(x.shape[1], dtype=np.float32)
                layers.append(np.linalg.solve(gram, x.T @ y).astype(np.float32))
            self.weights[d] = np.stack(layers)

    def features(self, layer: int, lookahead: int, context: RoutingContext) -> np.ndarray:
        """[N, 13 E + 1] features of each token after `layer`, for target `layer + lookahead`."""
        target, last = layer + lookahead, context.current.shape[1] - 1
        zeros = np.zeros_like(context.current[:, 0])
        parts = [context.current[:, layer - r] if layer - r >= 0 else zeros for r in range(CURRENT_LAYERS)]
        previous = context.previous
        parts += [previous[0, :, target - 1], previous[0, :, target], previous[0, :, min(target + 1, last)], previous[0, :, layer]]
        parts += [previous[1, :, target], previous[2, :, target]]
        parts.append(self.affinity.predict_rows(layer, lookahead, context))
        parts.append(np.ones((context.num_rows, 1), dtype=np.float32))
        return np.concatenate(parts, axis=1)

    def predict_rows(self, layer: int, lookahead: int, context: RoutingContext) -> np.ndarray:
        if lookahead not in self.weights:
            raise ValueError(f"this learned predictor was fitted for lookahead {self.lookaheads}, not {lookahead}")
        return self.features(layer, lookahead, context) @ self.weights[lookahead][layer]
