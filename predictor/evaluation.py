"""Scoring forecasts against what the trace actually routed: recall@m and precision@m.

recall@m = |top-m forecast & true K| / K; precision@m = |top-m forecast & true K| / m, averaged
over tokens, per target layer and overall. Scoring on a sequence the predictor was fitted on is
refused: held-out figures only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moe_runtime.trace import Trace

from .base import RoutingPredictor, sequence_fingerprints
from .context import context_from_trace


def evaluate(predictor: RoutingPredictor, trace: Trace, lookaheads: Sequence[int], ms: Sequence[int]) -> list[dict]:
    """One row per (lookahead, m): recall, precision and per-layer recall (target layers d..L-1)."""
    seen = predictor.fitted_on & sequence_fingerprints(trace)
    if seen:
        raise ValueError(
            f"{len(seen)} sequence(s) of the evaluation trace were used to fit this predictor: "
            "score it on held-out sequences (split the trace by sequence, e.g. Trace.split)"
        )
    context = context_from_trace(trace)
    truth = (context.current > 0).astype(np.float32)  # [T, L, E]
    rows = []
    for d in lookaheads:
        scores = predictor.forecast_trace(trace, d, context)[:, : trace.num_layers - d]  # [T, L-d, E]
        order = np.argsort(-scores, axis=2, kind="stable")
        target = truth[:, d:]
        for m in ms:
            hits = np.take_along_axis(target, order[:, :, :m], axis=2).sum(axis=2)  # [T, L-d]
            per_layer = hits.mean(axis=0) / trace.top_k
            rows.append(
                {
                    "lookahead": d,
                    "m": m,
                    "recall": float(per_layer.mean()),
                    "precision": float(hits.mean() / m),
                    "per_layer_recall": [float(x) for x in per_layer],
                }
            )
    return rows
