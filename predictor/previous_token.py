"""Previous token: the experts the previous token of the sequence used at the target layer.

Ties (and a sequence's first token) are broken by popularity from the fit traces, scaled far
below 1 so it only orders what the previous token does not decide.
"""

from __future__ import annotations

import numpy as np

from moe_runtime.trace import Trace

from .base import RoutingPredictor
from .context import RoutingContext
from .popularity import PopularityPredictor


class PreviousTokenPredictor(RoutingPredictor):
    name = "previous-token"

    def _fit(self, trace: Trace) -> None:
        self.prior = PopularityPredictor().fit(trace)

    def predict_rows(self, layer: int, lookahead: int, context: RoutingContext) -> np.ndarray:
        target = layer + lookahead
        return context.previous[0, :, target] + 1e-3 * self.prior.frequency[target]
