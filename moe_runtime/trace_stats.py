"""Summary statistics of a routing trace (`moe-runtime trace-info`).

reuse rate: share of a token's experts at layer l that the previous token of the same sequence
also used at layer l (what a per-layer cache can exploit; uniform random routing gives K/E).
popularity skew per layer: Gini coefficient of expert selection counts (0 = uniform) and the
share of selections taken by the most popular quarter of experts (uniform: 0.25).
"""

from __future__ import annotations

import numpy as np

from .trace import Trace


def selection_counts(trace: Trace) -> np.ndarray:
    """[L, E] how often each expert of each layer was selected."""
    return expert_uses(trace.expert_ids, trace.num_experts)


def expert_uses(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E] int64 uses of each expert at each layer in `expert_ids` [T, L, K] (one bincount
    over layer * E + expert)."""
    layers = expert_ids.shape[1]
    keys = expert_ids.astype(np.int64) + (np.arange(layers) * num_experts)[None, :, None]
    return np.bincount(keys.ravel(), minlength=layers * num_experts).reshape(layers, num_experts)


def reuse_rate(trace: Trace) -> float:
    """Mean over (t, l) with a predecessor in the same sequence of |E(t,l) & E(t-1,l)| / K."""
    ids = trace.expert_ids.astype(np.int64)
    present = np.zeros((trace.num_tokens, trace.num_layers, trace.num_experts), dtype=bool)
    np.put_along_axis(present, ids, True, axis=2)
    overlap = (present[1:] & present[:-1]).sum(axis=2) / trace.top_k  # [T-1, L]
    starts = trace.seq_offsets[1:-1]  # token index of each sequence start after the first
    valid = np.ones(trace.num_tokens - 1, dtype=bool)
    valid[starts - 1] = False  # pair (start-1, start) crosses a sequence boundary
    return float(overlap[valid].mean()) if valid.any() else 0.0


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0 = all equal, -> 1 = one takes all)."""
    values = np.sort(counts.astype(np.float64))
    total = values.sum()
    if total == 0:
        return 0.0
    n = len(values)
    return float((2 * np.arange(1, n + 1) - n - 1).dot(values) / (n * total))


def trace_summary(trace: Trace) -> dict:
    """The figures `trace-info` prints, as one JSON-ready dict."""
    counts = selection_counts(trace)
    quarter = max(1, trace.num_experts // 4)
    top_share = np.sort(counts, axis=1)[:, ::-1][:, :quarter].sum(axis=1) / counts.sum(axis=1)
    decoder_layer = trace.moe_layers or (None,) * trace.num_layers  # the model's own layer numbers, when recorded
    per_layer = [
        {"layer": layer, "decoder_layer": decoder_layer[layer], "gini": gini(counts[layer]), "top_quarter_share": float(top_share[layer])}
        for layer in range(trace.num_layers)
    ]
    return {
        "tokens": trace.num_tokens,
        "sequences": trace.num_sequences,
        "layers": trace.num_layers,
        "experts": trace.num_experts,
        "top_k": trace.top_k,
        "model_type": trace.model_type,
        "moe_layers": list(trace.moe_layers) if trace.moe_layers else None,
        "tasks": sorted(set(trace.tasks()) - {""}),
        "reuse_rate": reuse_rate(trace),
        "reuse_rate_uniform": trace.top_k / trace.num_experts,
        "mean_gini": float(np.mean([row["gini"] for row in per_layer])),
        "per_layer": per_layer,
    }
