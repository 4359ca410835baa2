"""The routing-predictor interface: forecast expert scores for layer l + d from what is known at l.

What is known when token t finishes MoE layer l: token t's experts at layers <= l, and every
layer of earlier tokens of the same sequence. A predictor turns that into scores [E] for the
experts of layer l + d (higher = more likely). Two entry points share one model:
- `forecast_trace(trace, lookahead)`: all positions at once, vectorised (evaluation, simulator);
- `Forecaster` (see `session`): step by step for live models, batch-aware.
Predictors are fitted on traces (`fit`), never on the sequences they are scored on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from moe_runtime.trace import Trace


class RoutingPredictor(ABC):
    name: ClassVar[str]
    needs_fit: ClassVar[bool] = True

    def __init__(self) -> None:
        self.num_layers: int | None = None
        self.num_experts: int | None = None

    def fit(self, trace: Trace) -> RoutingPredictor:
        self.num_layers, self.num_experts = trace.num_layers, trace.num_experts
        self._fit(trace)
        return self

    def _fit(self, trace: Trace) -> None:  # noqa: B027 - predictors without statistics
        pass

    def check_shape(self, trace: Trace) -> None:
        if self.num_layers is None:
            raise ValueError(f"the {self.name} predictor is not fitted: call fit(trace) first")
        if (trace.num_layers, trace.num_experts) != (self.num_layers, self.num_experts):
            raise ValueError(
                f"the {self.name} predictor was fitted on (L, E) = {(self.num_layers, self.num_experts)}, "
                f"the trace has {(trace.num_layers, trace.num_experts)}"
            )

    @abstractmethod
    def forecast_trace(self, trace: Trace, lookahead: int) -> np.ndarray:
        """scores [T, L, E] float32: row [t, l] forecasts layer l + lookahead of token t from
        what is known after token t's layer l (rows with l + lookahead >= L are zero)."""


def one_hot_experts(trace: Trace) -> np.ndarray:
    """[T, L, E] float32, 1 where token t used expert e at layer l."""
    out = np.zeros((trace.num_tokens, trace.num_layers, trace.num_experts), dtype=np.float32)
    np.put_along_axis(out, trace.expert_ids.astype(np.int64), 1.0, axis=2)
    return out


def previous_token_rows(trace: Trace) -> np.ndarray:
    """[T] index of the previous token of the same sequence, -1 at a sequence start."""
    previous = np.arange(trace.num_tokens) - 1
    previous[trace.seq_offsets[:-1]] = -1
    return previous
