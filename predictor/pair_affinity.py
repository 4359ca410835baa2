"""Pair affinity: P(expert j at layer l + d | experts a and b both chosen at layer s), s = l, l - 1.

A token's K experts at a layer say more together than one by one: the pair (a, b) narrows where
the token goes next more than a's and b's rows of the affinity table averaged (as a feature of
the learned predictor, held-out recall@6 at d = 1 rises from 0.775 to 0.781). Per (lookahead,
layer, source layer) the table keeps the MAX_PAIRS pairs seen most often (every pair while
E (E - 1) / 2 <= MAX_PAIRS, i.e. E <= 91), each row smoothed toward the target layer's popularity p:
    row(a, b)[j] = (n(a, b -> j) / K + ALPHA p[j]) / (n(a, b) + ALPHA),
where n(a, b) counts the tokens with both a and b and n(a, b -> j) those of them that chose j.
Pairs not kept read p. A token's forecast from one source layer is the mean of its
K (K - 1) / 2 pairs' rows. Both source layers of one (d, l) share one table (codes carry the
source), so a forecast is one gather: tens of microseconds at batch 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .context import RoutingContext

MAX_PAIRS = 4096  # per source layer
ALPHA = 1.0
SOURCE_LAYERS = 2  # the pairs at layer l and at l - 1


@dataclass
class PairTable:
    """The pair rows of one (lookahead, layer): codes back * E^2 + a * E + b (a < b) of the pairs
    kept at source layer l - back, and their rows; the last row (popularity) serves the rest."""

    codes: np.ndarray  # [P] int64, sorted
    rows: np.ndarray  # [P + 1, E] float16

    def forecast(self, ids: np.ndarray) -> np.ndarray:
        """[N, S, E] mean row of each token's pairs at each source layer; ids [N, S, K] its
        experts there (any order)."""
        if ids.shape[-1] < 2:  # top-1 routing has no pairs
            return np.broadcast_to(self.rows[-1], (*ids.shape[:-1], self.rows.shape[1])).astype(np.float32)
        index = self.row_index(ids)
        return self.rows_float32[index].sum(axis=-2) / index.shape[-1]

    @functools.cached_property
    def rows_float32(self) -> np.ndarray:
        """The rows widened once (float16 halves the file; summing float16 doubles a forecast's cost)."""
        return self.rows.astype(np.float32)

    def row_index(self, ids: np.ndarray) -> np.ndarray:
        """[N, S, K (K - 1) / 2] row of each pair of ids [N, S, K]."""
        first, second = _pair_columns(ids.shape[-1])
        return self.row_of[_source_column(ids.shape[1]), ids[..., first], ids[..., second]]

    @functools.cached_property
    def row_of(self) -> np.ndarray:
        """[SOURCE_LAYERS, E, E] row of every pair, both ways round (the popularity row for pairs
        not kept): one gather per forecast instead of a sort and a search."""
        num_experts = self.rows.shape[1]
        row_of = np.full((SOURCE_LAYERS, num_experts, num_experts), len(self.codes), dtype=np.int32)
        back, rest = np.divmod(self.codes, num_experts**2)
        first, second = np.divmod(rest, num_experts)
        row_of[back, first, second] = row_of[back, second, first] = np.arange(len(self.codes))
        return row_of


def top_ids(gates: np.ndarray, top_k: int) -> np.ndarray:
    """[..., K] the experts with the K largest gate weights of rows [..., E] (in no set order)."""
    return np.argpartition(gates, gates.shape[-1] - top_k, axis=-1)[..., gates.shape[-1] - top_k :]


def pair_codes(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[..., K (K - 1) / 2] int64 codes a * E + b (a < b) of the pairs among expert ids [..., K]."""
    ids = np.sort(ids, axis=-1).astype(np.int64)
    first, second = _pair_columns(ids.shape[-1])
    return ids[..., first] * num_experts + ids[..., second]


@functools.cache
def _source_column(sources: int) -> np.ndarray:
    """[S, 1] the source axis, to broadcast against [N, S, C] pair positions."""
    return np.arange(sources)[:, None]


@functools.cache
def _pair_columns(top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The (first, second) positions of the K (K - 1) / 2 pairs among K ids (cached:
    np.triu_indices alone takes thirty microseconds)."""
    return np.triu_indices(top_k, 1)


def fit_pair_table(sources: list[np.ndarray], target: np.ndarray, top_k: int, max_pairs: int = MAX_PAIRS) -> PairTable:
    """The table from one-hot routing at source layers l, l - 1, ... (each [N, E]) and at the
    target layer l + d ([N, E])."""
    num_experts = target.shape[1]
    ids = np.stack([top_ids(source, top_k) for source in sources], axis=1)  # [N, S, K]
    codes = pair_codes(ids, num_experts) + _source_column(len(sources)) * num_experts**2  # [N, S, C]
    kept = []
    for back in range(len(sources)):  # the most frequent pairs of each source layer
        seen, counts = np.unique(codes[:, back], return_counts=True)
        kept.append(seen[np.argsort(-counts, kind="stable")[:max_pairs]])
    kept = np.sort(np.concatenate(kept))
    popularity = target.mean(axis=0)
    chosen_next = np.zeros((len(kept) + 1, num_experts))
    if codes.shape[2]:
        index = PairTable(kept, chosen_next).row_index(ids).reshape(len(target), -1)  # [N, S C]
        token, expert = np.nonzero(target)  # every (token, expert it chose at l + d)
        cells = (index[token] * num_experts + expert[:, None]).ravel()
        chosen_next = np.bincount(cells, minlength=chosen_next.size).reshape(chosen_next.shape).astype(np.float64)
    together = chosen_next.sum(axis=1, keepdims=True) / top_k
    rows = (chosen_next / top_k + ALPHA * popularity) / (together + ALPHA)
    rows[-1] = popularity
    return PairTable(kept, rows.astype(np.float16))


class PairAffinity:
    """One pair table per (lookahead d, layer l), fitted on one-hot routing."""

    def __init__(self) -> None:
        self.top_k = 0
        self.tables: dict[tuple[int, int], PairTable] = {}

    def fit(self, used: np.ndarray, lookaheads: tuple[int, ...], top_k: int) -> None:
        """used [T, L, E] one-hot routing of the fitting tokens."""
        self.top_k = top_k
        for d in lookaheads:
            for layer in range(used.shape[1] - d):
                sources = [used[:, layer - back] for back in range(min(SOURCE_LAYERS, layer + 1))]
                self.tables[d, layer] = fit_pair_table(sources, used[:, layer + d], top_k)

    def features(self, layer: int, lookahead: int, context: RoutingContext) -> np.ndarray:
        """[N, SOURCE_LAYERS * E]: the forecasts from the pairs at l, l - 1 (zeros before layer 0)."""
        rows, num_experts = context.num_rows, context.current.shape[2]
        sources = min(SOURCE_LAYERS, layer + 1)
        gates = context.current[:, layer + 1 - sources : layer + 1][:, ::-1]  # [N, S, E] at l, l - 1
        forecast = self.tables[lookahead, layer].forecast(top_ids(gates, self.top_k))  # [N, S, E]
        if sources < SOURCE_LAYERS:
            forecast = np.concatenate([forecast, np.zeros((rows, SOURCE_LAYERS - sources, num_experts), np.float32)], axis=1)
        return forecast.reshape(rows, -1)
