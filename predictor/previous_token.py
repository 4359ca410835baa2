"""Previous token: the experts the previous token of the sequence used at the target layer.

Ties (and a sequence's first token) are broken by popularity from the fit traces, scaled far
below 1 so it only orders what the previous token does not decide.
"""

from __future__ import annotations

import numpy as np

from moe_runtime.trace import Trace

from .base import RoutingPredictor, one_hot_experts, previous_token_rows
from .popularity import PopularityPredictor


class PreviousTokenPredictor(RoutingPredictor):
    name = "previous-token"

    def _fit(self, trace: Trace) -> None:
        self.prior = PopularityPredictor().fit(trace)

    def forecast_trace(self, trace: Trace, lookahead: int) -> np.ndarray:
        self.check_shape(trace)
        used = one_hot_experts(trace)
        previous = previous_token_rows(trace)
        scores = 1e-3 * self.prior.forecast_trace(trace, lookahead)
        has_previous = previous >= 0
        shifted = np.zeros_like(used)
        shifted[has_previous] = used[previous[has_previous]]
        scores[:, : trace.num_layers - lookahead] += shifted[:, lookahead:]
        return scores
