"""Popularity: each layer's expert selection frequency on the fit traces, the same for every token."""

from __future__ import annotations

import numpy as np

from moe_runtime.trace import Trace

from .base import RoutingPredictor, one_hot_experts


class PopularityPredictor(RoutingPredictor):
    name = "popularity"

    def _fit(self, trace: Trace) -> None:
        self.frequency = one_hot_experts(trace).mean(axis=0)  # [L, E]

    def forecast_trace(self, trace: Trace, lookahead: int) -> np.ndarray:
        self.check_shape(trace)
        scores = np.zeros((trace.num_tokens, trace.num_layers, trace.num_experts), dtype=np.float32)
        scores[:, : trace.num_layers - lookahead] = self.frequency[lookahead:]
        return scores
