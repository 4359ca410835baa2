"""Belady's MIN: the fewest loads any demand cache can make on a known access stream.

On a miss with a full pool, evict the resident expert whose next use lies farthest in the
future. The access order is the simulator's: tokens in order, layers in order, a layer's K
experts together and protected from each other (a layer's experts are never evicted while it
runs). Next uses come from one vectorised pass; the replay is a heap with lazy invalidation.
"""

from __future__ import annotations

import heapq

import numpy as np

NEVER = np.iinfo(np.int64).max


def next_use(keys: np.ndarray) -> np.ndarray:
    """next_use[i] = index j > i of the next access with keys[j] == keys[i], or NEVER."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    following = np.full(len(keys), NEVER, dtype=np.int64)
    same = sorted_keys[1:] == sorted_keys[:-1]
    following[order[:-1][same]] = order[1:][same]
    return following


def belady_misses(keys: np.ndarray, group_size: int, capacity: int) -> int:
    """Misses of MIN with `capacity` slots on `keys` [N] (N = groups x group_size, in order)."""
    following = (-next_use(keys)).reshape(-1, group_size).tolist()  # negated: heapq is a min-heap
    groups = keys.reshape(-1, group_size).tolist()
    resident: dict[int, int] = {}  # key -> minus its next use
    heap: list[tuple[int, int]] = []  # (-next use, key); stale entries skipped
    push = heapq.heappush
    misses = 0
    limit = 4 * capacity + 64
    for group, upcoming in zip(groups, following):
        protected = None
        for key, negative in zip(group, upcoming):
            if key not in resident:
                misses += 1
                if len(resident) >= capacity:
                    protected = protected or set(group)
                    _evict_farthest(resident, heap, protected)
            resident[key] = negative
            push(heap, (negative, key))
        if len(heap) > limit:  # drop stale entries so heap operations stay O(log S)
            heap = [(negative, key) for key, negative in resident.items()]
            heapq.heapify(heap)
    return misses


def _evict_farthest(resident: dict[int, int], heap: list, protected: set[int]) -> None:
    kept = []
    while True:
        negative, key = heapq.heappop(heap)
        if resident.get(key) != negative:
            continue  # stale
        if key in protected:
            kept.append((negative, key))
            continue
        del resident[key]
        break
    for entry in kept:
        heapq.heappush(heap, entry)


def layer_keys(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[T, L, K] expert ids -> [T * L * K] keys layer * E + expert, in access order."""
    layers = np.arange(expert_ids.shape[1], dtype=np.int64)[None, :, None]
    return (layers * num_experts + expert_ids.astype(np.int64)).reshape(-1)
