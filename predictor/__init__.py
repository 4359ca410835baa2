"""Routing-path predictors: forecast the experts of the next MoE layers so loads overlap compute.

Imported as `moe_runtime.predictor`. `make_predictor(name)` builds one by name; every predictor
is fitted on traces and evaluated on other sequences.
"""

from __future__ import annotations

from .affinity import AffinityPredictor
from .base import RoutingPredictor
from .popularity import PopularityPredictor
from .previous_token import PreviousTokenPredictor

PREDICTORS: dict[str, type[RoutingPredictor]] = {
    cls.name: cls for cls in (PopularityPredictor, PreviousTokenPredictor, AffinityPredictor)
}


def make_predictor(name: str) -> RoutingPredictor:
    if name not in PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(sorted(PREDICTORS))}")
    return PREDICTORS[name]()


__all__ = ["PREDICTORS", "AffinityPredictor", "PopularityPredictor", "PreviousTokenPredictor", "RoutingPredictor", "make_predictor"]
