"""Pinned: the most frequent experts (on the fit traces) stay resident, the rest share LRU slots.

A static split: `pinned_share` of the pool holds the globally most selected (layer, expert)
pairs and is never evicted; the remaining slots run LRU. It is the strongest simple baseline
when popularity is skewed, and what a placement plan's "pinned" tier does in the runtime.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import NoVictimError
from .lru import LRUPolicy


class PinnedPolicy(LRUPolicy):
    name = "pinned"

    def __init__(self, frequency: np.ndarray, capacity: int, top_k: int, pinned_share: float = 0.5):
        super().__init__(frequency.shape[-1] if frequency.ndim == 2 else None)  # [L, E]: a prompt's experts known by key
        count = min(int(capacity * pinned_share), capacity - top_k)  # a layer's top-k must still fit
        order = np.argsort(-frequency.reshape(-1), kind="stable")
        self.pinned = frozenset(int(k) for k in order[:count])

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int:
        for key in self._order:
            if key not in self.pinned and is_evictable(key):
                return key
        raise NoVictimError("every unpinned resident expert is protected")
