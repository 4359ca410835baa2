"""Popularity: each layer's expert selection frequency on the fit traces, the same for every token."""

from __future__ import annotations

import numpy as np

from moe_runtime.trace import Trace

from .base import RoutingPredictor
from .context import RoutingContext, context_from_trace


class PopularityPredictor(RoutingPredictor):
    name = "popularity"

    def _fit(self, trace: Trace) -> None:
        self.frequency = (context_from_trace(trace, history=0).current > 0).mean(axis=0)  # [L, E]

    def predict_rows(self, layer: int, lookahead: int, context: RoutingContext) -> np.ndarray:
        return np.broadcast_to(self.frequency[layer + lookahead], (context.num_rows, self.num_experts)).astype(np.float32)
