"""Predictor files: one `.npz` holding the kind, the shape, the fitting fingerprints and the arrays.

save_predictor(predictor, path) / load_predictor(path); a file of another shape or kind is
refused with a clear error when used.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moe_runtime.atomic import write_atomically
from moe_runtime.errors import InvalidFileError
from moe_runtime.checked_reading import read_npz
from moe_runtime.trace import Trace

from .affinity import AffinityPredictor
from .base import RoutingPredictor
from .learned import LearnedPredictor, feature_count
from .pair_affinity import PairTable
from .popularity import PopularityPredictor
from .previous_token import PreviousTokenPredictor

MAX_LAYERS, MAX_EXPERTS = 4096, 65536  # beyond any MoE: a file claiming more is damaged
REFIT = "refit it with 'moe-runtime predictor fit'"


def _arrays(predictor: RoutingPredictor) -> dict[str, np.ndarray]:
    if isinstance(predictor, LearnedPredictor):
        out = {f"weights_{d}": w for d, w in predictor.weights.items()}
        out.update({f"affinity_{d}": t for d, t in predictor.affinity.tables.items()})
        for (d, layer), table in predictor.pairs.tables.items():
            out[f"pairs_{d}_{layer}_codes"], out[f"pairs_{d}_{layer}_rows"] = table.codes, table.rows
        out["top_k"] = np.int64(predictor.affinity.top_k)
        return out
    if isinstance(predictor, AffinityPredictor):
        return {**{f"affinity_{d}": t for d, t in predictor.tables.items()}, "top_k": np.int64(predictor.top_k)}
    if isinstance(predictor, PreviousTokenPredictor):
        return {"frequency": predictor.prior.frequency}
    if isinstance(predictor, PopularityPredictor):
        return {"frequency": predictor.frequency}
    raise ValueError(f"the {predictor.name} predictor cannot be saved (it needs a live model)")


def save_predictor(predictor: RoutingPredictor, path: str | os.PathLike) -> Path:
    path = Path(path)
    if predictor.num_layers is None:
        raise ValueError("fit the predictor before saving it")
    arrays = _arrays(predictor)
    arrays.update(
        kind=np.array(predictor.name),
        num_layers=np.int64(predictor.num_layers),
        num_experts=np.int64(predictor.num_experts),
        fitted_on=np.array(sorted(predictor.fitted_on), dtype=str),
    )
    return write_atomically(path, lambda handle: np.savez_compressed(handle, **arrays))


def load_predictor(path: str | os.PathLike) -> RoutingPredictor:
    """The predictor saved at `path`, checked by forecasting a small routing of its shape.

    Raises InvalidFileError (a ValueError) for a file that is truncated, corrupt, of an unknown
    kind or of another version, and FileNotFoundError for a missing one.
    """
    arrays = read_npz(path, "predictor file", REFIT)
    try:
        predictor = _from_arrays(path, arrays)
        _smoke_test(predictor)
    except InvalidFileError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as error:
        raise InvalidFileError(f"{path}: not a usable predictor file ({type(error).__name__}: {error}); {REFIT}") from None
    return predictor


def _from_arrays(path, arrays: dict[str, np.ndarray]) -> RoutingPredictor:
    if "kind" not in arrays:
        raise InvalidFileError(f"{path}: not a predictor file (no 'kind' array)")
    kind = str(arrays["kind"])
    tables = {int(k.split("_")[1]): v for k, v in arrays.items() if k.startswith("affinity_")}
    if kind == "learned":
        weights = {int(k.split("_")[1]): v for k, v in arrays.items() if k.startswith("weights_")}
        expected = feature_count(int(arrays["num_experts"]))
        if any(w.shape[1] != expected for w in weights.values()):
            raise InvalidFileError(
                f"{path}: this learned predictor has {next(iter(weights.values())).shape[1]} features per forecast, this "
                f"version uses {expected}: it was fitted by another version; refit it with 'moe-runtime predictor fit'"
            )
        predictor = LearnedPredictor(tuple(weights))
        predictor.weights = weights
        predictor.affinity.tables, predictor.affinity.top_k = tables, int(arrays["top_k"])
        predictor.pairs.top_k = int(arrays["top_k"])
        predictor.pairs.tables = {
            tuple(int(x) for x in key.split("_")[1:3]): PairTable(arrays[key], arrays[key.replace("_codes", "_rows")])
            for key in arrays
            if key.startswith("pairs_") and key.endswith("_codes")
        }
        _shape(predictor.affinity, arrays)
    elif kind == "affinity":
        predictor = AffinityPredictor()
        predictor.tables, predictor.top_k = tables, int(arrays["top_k"])
    elif kind == "previous-token":
        predictor = PreviousTokenPredictor()
        predictor.prior = PopularityPredictor()
        predictor.prior.frequency = arrays["frequency"]
        _shape(predictor.prior, arrays)
    elif kind == "popularity":
        predictor = PopularityPredictor()
        predictor.frequency = arrays["frequency"]
    else:
        raise InvalidFileError(f"{path}: unknown predictor kind {kind!r}")
    _shape(predictor, arrays)
    predictor.fitted_on = set(str(x) for x in arrays["fitted_on"])
    return predictor


def _shape(predictor: RoutingPredictor, arrays: dict) -> None:
    layers, experts = int(arrays["num_layers"]), int(arrays["num_experts"])
    if not (1 <= layers <= MAX_LAYERS and 1 <= experts <= MAX_EXPERTS):
        raise ValueError(f"implausible shape (L, E) = {(layers, experts)}")
    predictor.num_layers, predictor.num_experts = layers, experts


def _smoke_test(predictor: RoutingPredictor) -> None:
    """Forecast a two-sequence routing of the predictor's shape; damaged arrays fail here, not live."""
    layers, experts = predictor.num_layers, predictor.num_experts
    top_k = min(experts, getattr(predictor, "top_k", None) or getattr(getattr(predictor, "affinity", None), "top_k", 1))
    if not 1 <= top_k <= experts:
        raise ValueError(f"top_k = {top_k} outside 1..{experts}")
    ids = np.stack([np.random.default_rng(i).permutation(experts)[:top_k] for i in range(4 * layers)]).reshape(4, layers, top_k)
    trace = Trace(ids.astype(np.int16), np.full(ids.shape, 1 / top_k, np.float16), np.array([0, 2, 4]), experts, top_k)
    lookahead = min(getattr(predictor, "lookaheads", (1,)))
    if layers > lookahead and not np.isfinite(predictor.forecast_trace(trace, lookahead)).all():
        raise ValueError("it forecasts non-finite scores")
