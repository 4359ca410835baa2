"""Routing-path predictors: forecast the experts of the next MoE layers so loads overlap compute.

Imported as `moe_runtime.predictor`. `make_predictor(name)` builds one by name; `load_predictor`
reads a fitted one from a file; every predictor is fitted on traces and evaluated on others.
"""

from __future__ import annotations

import os
from pathlib import Path

from .affinity import AffinityPredictor
from .base import RoutingPredictor
from .context import RoutingContext, context_from_trace
from .cross_layer import CrossLayerGatePredictor
from .evaluation import evaluate
from .learned import LearnedPredictor
from .live import LiveForecaster
from .popularity import PopularityPredictor
from .previous_token import PreviousTokenPredictor
from .storage import load_predictor, save_predictor

PREDICTORS: dict[str, type[RoutingPredictor]] = {
    cls.name: cls for cls in (PopularityPredictor, PreviousTokenPredictor, AffinityPredictor, LearnedPredictor)
}


def make_predictor(name: str) -> RoutingPredictor:
    if name not in PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; choose one of {', '.join(sorted(PREDICTORS))} or a predictor file")
    return PREDICTORS[name]()


def predictor_from(name_or_path: str | os.PathLike | RoutingPredictor) -> tuple[RoutingPredictor, bool]:
    """(predictor, fitted): a fitted instance or file as is, else a fresh one by name."""
    if isinstance(name_or_path, RoutingPredictor):
        return name_or_path, name_or_path.num_layers is not None
    if Path(name_or_path).suffix == ".npz" or Path(name_or_path).is_file():
        return load_predictor(name_or_path), True
    return make_predictor(str(name_or_path)), False


__all__ = [
    "PREDICTORS",
    "AffinityPredictor",
    "CrossLayerGatePredictor",
    "LearnedPredictor",
    "LiveForecaster",
    "PopularityPredictor",
    "PreviousTokenPredictor",
    "RoutingContext",
    "RoutingPredictor",
    "context_from_trace",
    "evaluate",
    "load_predictor",
    "make_predictor",
    "predictor_from",
    "save_predictor",
]
