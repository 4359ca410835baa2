"""Synthetic routing for the cases real traces do not cover: flat popularity at any (L, E, K).

flat_routing: every expert equally likely at every layer; each expert of the previous token
stays chosen with probability `reuse` (real decode keeps about 0.3-0.45 of a layer's experts
from one token to the next), the rest are drawn uniformly. Used to check that defaults tuned on
skewed real routing do not lose where there is no skew to exploit. `skew` > 0 departs from flat
by degrees: the rest are drawn with probability proportional to rank ** -skew (Zipf, ranks
shuffled per layer), for the models in between. `drift` > 0 changes that popularity from one
sequence to the next, as requests on different topics do: at each sequence's start a share
`drift` of a layer's experts trade ranks among themselves (1: a new popularity per sequence).
"""

from __future__ import annotations

import numpy as np

from .trace import Trace


def flat_routing(
    layers: int, experts: int, top_k: int, tokens: int, *, reuse: float = 0.3, skew: float = 0.0, drift: float = 0.0, sequences: int = 8, seed: int = 0,
) -> Trace:
    """A trace of `tokens` decode tokens in `sequences` equal sequences, gate weights 1/K."""
    if not (0 <= reuse <= 1 and 0 <= drift <= 1 and skew >= 0):
        raise ValueError(f"reuse and drift are shares between 0 and 1 and skew is at least 0, got reuse {reuse}, drift {drift}, skew {skew}")
    if drift and not skew:
        raise ValueError("drift changes a popularity skew from one sequence to the next: give skew > 0 with it")
    rng = np.random.default_rng(seed)
    ids = np.zeros((tokens, layers, top_k), dtype=np.int16)
    offsets = np.linspace(0, tokens, sequences + 1).astype(np.int64)
    starts = set(offsets[1:-1].tolist())
    for layer in range(layers):
        popularity = _zipf(experts, skew, rng) if skew else None
        previous: list[int] = []
        for token in range(tokens):
            if drift and token in starts:
                popularity = _drifted(popularity, drift, rng)
            kept = [e for e in previous if rng.random() < reuse]
            order = rng.permutation(experts) if popularity is None else _drawn_order(popularity, rng)
            fresh = [int(e) for e in order if e not in kept][: top_k - len(kept)]
            previous = kept + fresh
            ids[token, layer] = previous
    return Trace(ids, np.full(ids.shape, 1 / top_k, np.float16), offsets, experts, top_k, task=f"flat-E{experts}-K{top_k}")


def _zipf(experts: int, skew: float, rng: np.random.Generator) -> np.ndarray:
    """[E] probabilities proportional to rank ** -skew, the ranks shuffled."""
    weights = np.arange(1, experts + 1, dtype=np.float64) ** -skew
    return weights[rng.permutation(experts)] / weights.sum()


def _drifted(popularity: np.ndarray, drift: float, rng: np.random.Generator) -> np.ndarray:
    """`popularity` with a random share `drift` of its experts' probabilities permuted among them."""
    moved = rng.choice(len(popularity), size=round(drift * len(popularity)), replace=False)
    drifted = popularity.copy()
    drifted[moved] = popularity[rng.permutation(moved)]
    return drifted


def _drawn_order(popularity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All experts in the order of a draw without replacement weighted by `popularity`
    (Efraimidis-Spirakis keys: u ** (1 / w), largest first)."""
    return np.argsort(-(rng.random(len(popularity)) ** (1.0 / popularity)))
