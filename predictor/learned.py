"""Learned: a ridge regression per (lookahead d, target layer) on what is known at layer l.

ExpertFlow's idea of a lightweight routing-path predictor, fitted offline on traces. Features of
a token after layer l, for target layer j = l + d (29 E + 1 values):
  its gate weights and its one-hot routing at layers l, l-1, ..., l-9 (20 E);
  the previous token's experts at layers j-1, j, j+1 and l, and the two before it at j (6 E);
  the affinity table's forecast for j (E) and the pair tables' from layers l and l-1 (2 E,
  pair_affinity.py); a bias.
The ridge is solved on standardised features (so one penalty suits gate weights of ~0.1 and
one-hots alike) and the scaling is folded back into the weights, so a forecast stays a feature
gather and one small matrix product: [1, 29 E + 1] x [29 E + 1, E].
Chosen by measurement on held-out ESFT sequences (fit on the first half of each task's
sequences, scored on the second; recall@6 at d = 1): gate weights at l..l-2 only 0.726; l..l-5
0.747; + more history and the affinity forecast 0.754 (raw features, penalty 1); penalty 0.03
0.764; + one-hots 0.769; l..l-9 0.773; standardised, penalty 300: 0.775; + pairs at l 0.779;
+ pairs at l-1 0.781 (at l-2 as well: 0.782, not worth 20 MB more per file). A per-layer MLP
(0.721-0.726), a shared MLP over all layers on these features with the ridge score as input
(0.776 after 4 minutes of training), logistic per-expert losses (within +-0.01 per layer) and a
softmax-loss linear model (0.693) did not pay for their cost.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from moe_runtime.trace import Trace

from .affinity import AffinityPredictor
from .base import RoutingPredictor
from .context import RoutingContext, context_from_trace
from .pair_affinity import SOURCE_LAYERS, PairAffinity

CURRENT_LAYERS = 10
FEATURE_BLOCKS = 2 * CURRENT_LAYERS + 7 + SOURCE_LAYERS  # blocks of E features, then the bias
RIDGE = 300.0  # penalty on standardised features, with about 8,500 fitting tokens per layer


def feature_count(num_experts: int) -> int:
    return FEATURE_BLOCKS * num_experts + 1


class LearnedPredictor(RoutingPredictor):
    name = "learned"

    def __init__(self, lookaheads: tuple[int, ...] = (1, 2, 3), progress: bool = False) -> None:
        super().__init__()
        self.lookaheads = tuple(sorted(lookaheads))
        self.progress = progress  # a progress bar over the (lookahead, layer) solves: a minute on all ESFT traces
        self.affinity = AffinityPredictor()
        self.pairs = PairAffinity()
        self.weights: dict[int, np.ndarray] = {}  # d -> [L - d, F, E]

    def _fit(self, trace: Trace) -> None:
        self.affinity.fit(trace)
        context = context_from_trace(trace)
        self.pairs.fit((context.current > 0).astype(np.float32), self.lookaheads, trace.top_k)
        solves = sum(trace.num_layers - d for d in self.lookaheads)
        with tqdm(total=solves, desc="fitting learned predictor", unit="layer", disable=not self.progress) as bar:
            for d in self.lookaheads:
                layers = []
                for layer in range(trace.num_layers - d):
                    layers.append(standardised_ridge(self.features(layer, d, context), context.chosen(layer + d)))
                    bar.update()
                self.weights[d] = np.stack(layers)

    def features(self, layer: int, lookahead: int, context: RoutingContext) -> np.ndarray:
        """[N, 29 E + 1] features of each token after `layer`, for target `layer + lookahead`."""
        target, last = layer + lookahead, context.current.shape[1] - 1
        rows, num_experts = context.num_rows, context.current.shape[2]
        history = np.zeros((rows, 2, CURRENT_LAYERS, num_experts), dtype=np.float32)  # gates, one-hots at l, l-1, ...
        seen = context.current[:, max(layer + 1 - CURRENT_LAYERS, 0) : layer + 1][:, ::-1]
        history[:, 0, : seen.shape[1]] = seen
        history[:, 1, : seen.shape[1]] = seen > 0
        previous = context.previous
        parts = [history.reshape(rows, -1)]
        parts += [previous[0, :, target - 1], previous[0, :, target], previous[0, :, min(target + 1, last)], previous[0, :, layer]]
        parts += [previous[1, :, target], previous[2, :, target]]
        parts.append(self.affinity.predict_rows(layer, lookahead, context))
        parts.append(self.pairs.features(layer, lookahead, context))
        parts.append(np.ones((rows, 1), dtype=np.float32))
        return np.concatenate(parts, axis=1)

    def predict_rows(self, layer: int, lookahead: int, context: RoutingContext) -> np.ndarray:
        if lookahead not in self.weights:
            raise ValueError(f"this learned predictor was fitted for lookahead {self.lookaheads}, not {lookahead}")
        return self.features(layer, lookahead, context) @ self.weights[lookahead][layer]


def standardised_ridge(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weights [F, E] for x [N, F] (last column the bias) and targets y [N, E]: the ridge
    solution on z-scored features, folded back so that x @ weights gives the forecast."""
    mean = x[:, :-1].mean(axis=0)
    centred = x[:, :-1] - mean
    scale = centred.std(axis=0).astype(np.float64) + 1e-3
    target_mean = y.mean(axis=0)
    gram = (centred.T @ centred).astype(np.float64) / np.outer(scale, scale) + RIDGE * np.eye(len(scale))
    weights = np.linalg.solve(gram, (centred.T @ (y - target_mean)).astype(np.float64) / scale[:, None]) / scale[:, None]
    bias = target_mean - mean @ weights
    return np.concatenate([weights, bias[None]]).astype(np.float32)
