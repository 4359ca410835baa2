"""The routing-predictor interface: forecast expert scores for layer l + d from what is known at l.

Every predictor implements `predict_rows(layer, lookahead, context) -> [N, E]` scores (higher =
more likely) from a RoutingContext (see context.py). Two entry points share it:
- `forecast_trace(trace, lookahead)`: every position of a trace at once (evaluation, simulator);
- the live runtime's forecaster, which builds the context step by step, batch-aware.
Predictors are fitted on traces (`fit`) and refuse to be scored on the sequences they saw.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from moe_runtime.trace import Trace

from .context import RoutingContext, context_from_trace


def sequence_fingerprints(trace: Trace) -> set[str]:
    """A hash of each sequence's routing, to recognise fitting sequences later."""
    return {
        hashlib.sha1(trace.expert_ids[begin:end].tobytes()).hexdigest()[:16]
        for begin, end in zip(trace.seq_offsets[:-1], trace.seq_offsets[1:])
    }


class RoutingPredictor(ABC):
    name: ClassVar[str]
    needs_hidden: ClassVar[bool] = False  # reads router input hidden states (live models only)

    def __init__(self) -> None:
        self.num_layers: int | None = None
        self.num_experts: int | None = None
        self.fitted_on: set[str] = set()

    def fit(self, trace: Trace) -> RoutingPredictor:
        self.num_layers, self.num_experts = trace.num_layers, trace.num_experts
        self.fitted_on = sequence_fingerprints(trace)
        self._fit(trace)
        return self

    def _fit(self, trace: Trace) -> None:  # noqa: B027 - predictors without statistics
        pass

    def check_shape(self, num_layers: int, num_experts: int) -> None:
        if self.num_layers is None:
            raise ValueError(f"the {self.name} predictor is not fitted: call fit(trace) first")
        if (num_layers, num_experts) != (self.num_layers, self.num_experts):
            raise ValueError(
                f"the {self.name} predictor was fitted on (L, E) = {(self.num_layers, self.num_experts)}, "
                f"the routing has {(num_layers, num_experts)}"
            )

    @abstractmethod
    def predict_rows(self, layer: int, lookahead: int, context: RoutingContext) -> np.ndarray:
        """[N, E] scores for layer `layer + lookahead` of each token in `context`."""

    def forecast_trace(self, trace: Trace, lookahead: int, context: RoutingContext | None = None) -> np.ndarray:
        """scores [T, L, E] float32: row [t, l] forecasts layer l + lookahead of token t from
        what is known after token t's layer l (rows with l + lookahead >= L are zero)."""
        self.check_shape(trace.num_layers, trace.num_experts)
        context = context or context_from_trace(trace)
        scores = np.zeros((trace.num_tokens, trace.num_layers, trace.num_experts), dtype=np.float32)
        for layer in range(trace.num_layers - lookahead):
            scores[:, layer] = self.predict_rows(layer, lookahead, context)
        return scores
