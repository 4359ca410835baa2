"""Which experts to keep: a share of all experts, allocated across layers by importance.

`global` (default): every layer keeps its top-k most important experts (a token always finds K),
then the remaining budget goes to the most important experts of any layer, so layers whose
routing is spread out keep more than concentrated ones. `per-layer`: the same share per layer.
"""

from __future__ import annotations

import numpy as np

ALLOCATIONS = ("global", "per-layer")


def keep_plan(scores: np.ndarray, keep: float, top_k: int, allocation: str = "global") -> list[list[int]]:
    """Kept expert ids per layer (sorted) for importance `scores` [L, E]."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be a share of experts in (0, 1], got {keep}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    num_layers, num_experts = scores.shape
    per_layer = max(top_k, int(round(keep * num_experts)))
    order = np.argsort(-scores, axis=1, kind="stable")
    mask = np.zeros(scores.shape, dtype=bool)
    if allocation == "per-layer":
        np.put_along_axis(mask, order[:, :per_layer], True, axis=1)
    else:
        np.put_along_axis(mask, order[:, :top_k], True, axis=1)
        remaining = max(0, per_layer * num_layers - int(mask.sum()))
        candidates = np.where(mask, -np.inf, scores).ravel()
        mask.ravel()[np.argsort(-candidates, kind="stable")[:remaining]] = True
    return [sorted(int(e) for e in np.flatnonzero(row)) for row in mask]
