"""Forecasts inside a running model: the routing context built step by step, batch-aware.

observe(layer, top_k_index [T, K], top_k_weights [T, K], hidden [T, H]) after each MoE router;
forecast(layer, d) -> [E], the expected number of tokens in flight that will use each expert of
layer l + d (the sum of per-token scores, so the union of their needs ranks first).

A forward step is recognised by the layer index starting again. Tokens of a decode step follow
the tokens of the previous step row by row; after a prefill of B x S tokens, row b follows
token b * S + S - 1 (the last of its prompt). Other shape changes start without history.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import RoutingPredictor
from .context import HISTORY, RoutingContext


class LiveForecaster:
    def __init__(self, predictor: RoutingPredictor, num_layers: int, num_experts: int):
        predictor.check_shape(num_layers, num_experts)
        self.predictor = predictor
        self.num_layers, self.num_experts = num_layers, num_experts
        self.context: RoutingContext | None = None
        self.layer = num_layers

    def observe(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, hidden: torch.Tensor | None) -> None:
        rows = top_k_index.shape[0]
        if layer <= self.layer or self.context is None or self.context.num_rows != rows:
            self._new_step(rows, hidden)
        self.layer = layer
        current = np.zeros((rows, self.num_experts), dtype=np.float32)
        # Host syncs, with a forecaster only: the routing (already on the host: the runtime read it)
        # and, for predictors that read the router input, the hidden state [T, H] (the predictors
        # are numpy models; on a GPU this copy waits for the layer's attention to finish).
        np.put_along_axis(current, top_k_index.cpu().numpy().astype(np.int64), np.maximum(top_k_weights.detach().float().cpu().numpy(), 1e-6), axis=1)
        self.context.current[:, layer] = current
        if self.predictor.needs_hidden and hidden is not None:
            self.context.hidden[:, layer] = hidden.detach().float().cpu().numpy()

    def _new_step(self, rows: int, hidden: torch.Tensor | None) -> None:
        previous = np.zeros((HISTORY, rows, self.num_layers, self.num_experts), dtype=np.float32)
        old = self.context
        if old is not None:
            mapping = _follow(old.num_rows, rows)
            if mapping is not None:
                previous[0] = (old.current[mapping] > 0).astype(np.float32)
                previous[1:] = old.previous[:-1, mapping]
        width = hidden.shape[-1] if (hidden is not None and self.predictor.needs_hidden) else 0
        hidden_layers = np.zeros((rows, self.num_layers, width), dtype=np.float32) if width else None
        self.context = RoutingContext(np.zeros((rows, self.num_layers, self.num_experts), dtype=np.float32), previous, hidden_layers)

    def forecast(self, layer: int, lookahead: int) -> np.ndarray:
        """[E] summed scores of the tokens in flight for layer `layer + lookahead`."""
        return self.predictor.predict_rows(layer, lookahead, self.context).sum(axis=0)


def _follow(old_rows: int, new_rows: int) -> np.ndarray | None:
    """Row of the previous step that each new row continues, or None when unknown."""
    if old_rows == new_rows:
        return np.arange(new_rows)
    if new_rows and old_rows % new_rows == 0:
        length = old_rows // new_rows
        return np.arange(new_rows) * length + length - 1
    return None
