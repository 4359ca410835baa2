"""The expert-to-expert transitions of a routing history, counted as tokens enter and leave it.

The adaptive default's learner predicts an expert's next use partly from the transitions of its
layer (next_use.py's transition bucket: P(e' used by the next token | e used now)). A full
refit counts them afresh with the rest of the reuse model, and costs enough to come only every
few hundred tokens at a full history (routing_history.py); the transitions alone can be kept
current for 20-50 us a token (under 1 us per layer step), by adding the pair each new token
makes with the one before and removing the pair of each token that leaves. Handed to the
learner every REFIT_EVERY_TOKENS tokens between full refits (its wait table, popularity buckets
and forecast edges kept), they made fewer loads than the full refits alone in 20 of the 24
cases on the fit halves of the shipped ESFT and GPT-OSS routing, up to 0.9% of LRU's, and at
most 0.01% more (BENCHMARKS.md, "Transitions kept current"). The counts are those of
next_use.expert_transitions over the history as one sequence, exactly (tested), so a full refit
takes them from here instead of counting them again (1.4 ms of a 30 ms refit at ESFT's 2048
tokens, the same model).
"""

from __future__ import annotations

import numpy as np

from .next_use import transition_table

FLUSH_PAIRS = 64  # pairs queued before they are counted: one vectorised pass for many tokens


class SlidingTransitions:
    """Counts of (e at layer l now, e' at layer l next) over consecutive token pairs [L, E, E],
    and of e with a next token [L, E]; int32, as a pair's counts are integers (a model of
    61 x 384 experts holds 36 MB of them). Pairs are queued and counted FLUSH_PAIRS at a time,
    or when the table is read: counted one token at a time, numpy's calls cost 100-250 us a
    token (4-5 us per layer step), queued 19-47 us (2-core EPYC VM; 24 x 32 to 61 x 384
    experts)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k
        self.pairs = np.zeros((num_layers, num_experts, num_experts), dtype=np.int32)
        self.seen = np.zeros((num_layers, num_experts), dtype=np.int32)
        self.layer_of = np.arange(num_layers)[:, None]  # [L, 1]: a key's layer, layer * E + expert its flat index
        self.queued: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {1: [], -1: []}
        self.queued_pairs = 0

    def add(self, older: np.ndarray, newer: np.ndarray, sign: int = 1) -> None:
        """Count the pairs (older[i], newer[i]), [P, L, K] expert ids each, arrays the caller
        does not change afterwards (sign -1: remove them)."""
        if len(older) == 0:
            return
        self.queued[sign].append((older, newer))
        self.queued_pairs += len(older)
        if self.queued_pairs >= FLUSH_PAIRS:
            self.flush()

    def flush(self) -> None:
        for sign, queued in self.queued.items():
            if queued:
                self._count(np.concatenate([older for older, _ in queued]), np.concatenate([newer for _, newer in queued]), sign)
                queued.clear()
        self.queued_pairs = 0

    def _count(self, older: np.ndarray, newer: np.ndarray, sign: int) -> None:
        """Count (or with sign -1 uncount) [P, L, K] pairs at flat indices (np.add.at with an
        array of weights; a scalar one is four times slower). A token names each expert once:
        a repeat within a row counts nothing (as a token's row of the use matrix has it); real
        top-k routing has none, and is counted without looking for them."""
        num_experts = self.num_experts
        now, following = _first_uses(older), _first_uses(newer)  # [P, L, K] 1 or 0
        seen_at = self.layer_of * num_experts + older  # [P, L, K]
        pair_at = seen_at[..., :, None] * num_experts + newer[..., None, :]  # [P, L, K, K]
        np.add.at(self.seen.reshape(-1), seen_at.ravel(), sign * now.ravel())
        np.add.at(self.pairs.reshape(-1), pair_at.ravel(), sign * (now[..., :, None] * following[..., None, :]).ravel())

    def table(self) -> np.ndarray:
        """[L, E, E] fp32 transition probabilities, as a full refit fits them (transition_table)."""
        self.flush()
        return transition_table(self.pairs, self.seen, self.top_k)


def _first_uses(ids: np.ndarray) -> np.ndarray:
    """[..., K] ids -> [..., K] int32: 1 where an id does not repeat an earlier one of its row."""
    ids = ids.astype(np.int64)
    if not (np.diff(np.sort(ids, axis=-1), axis=-1) == 0).any():
        return np.ones(ids.shape, dtype=np.int32)
    earlier = np.tril(np.ones((ids.shape[-1], ids.shape[-1]), dtype=bool), k=-1)  # [k, j]: j before k
    repeats = ((ids[..., :, None] == ids[..., None, :]) & earlier).any(axis=-1)
    return (~repeats).astype(np.int32)
