"""Least frequently used, with aging: evict the resident expert used least, recently weighted.

Counts are kept for every key seen (resident or not), so an expert evicted and needed again
comes back with its history. Every `age_every` accesses all counts halve, so popularity that
has passed fades (a long-dead burst does not pin an expert forever). Ties go to the least
recently used. Victims come from a lazily invalidated heap: O(log S) per access and eviction;
a dormant policy keeps the counts and stamps only and rebuilds the heap when woken (the same
victims: a resident key's valid heap entry is always its current count and stamp).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from .base import EvictionPolicy, NoVictimError

AGE_EVERY = 4096  # accesses between halvings of every count


class LFUPolicy(EvictionPolicy):
    name = "lfu"

    def __init__(self, age_every: int = AGE_EVERY) -> None:
        if age_every <= 0:
            raise ValueError("age_every must be positive")
        self.age_every = age_every
        self._count: dict[int, float] = {}
        self._stamp: dict[int, int] = {}  # last-use tick of resident keys
        self._heap: list[tuple[float, int, int]] = []  # (count, tick, key); stale entries skipped
        self._tick = 0
        self._accesses = 0
        self._dormant = False

    def _push(self, key: int) -> None:
        self._tick += 1
        self._stamp[key] = self._tick
        if not self._dormant:
            heapq.heappush(self._heap, (self._count.get(key, 0.0), self._tick, key))

    def set_dormant(self, dormant: bool) -> None:
        self._dormant = dormant
        if dormant:
            self._heap = []
        else:
            self._rebuild()

    def on_insert(self, key: int) -> None:
        self._push(key)

    def on_access(self, key: int) -> None:
        self._count[key] = self._count.get(key, 0.0) + 1.0
        self._push(key)
        self._accesses += 1
        if self._accesses % self.age_every == 0:
            self._age()

    def on_evict(self, key: int) -> None:
        del self._stamp[key]

    def _age(self) -> None:
        self._count = {key: count / 2 for key, count in self._count.items()}
        if not self._dormant:
            self._rebuild()

    def _rebuild(self) -> None:
        self._heap = [(self._count.get(key, 0.0), tick, key) for key, tick in self._stamp.items()]
        heapq.heapify(self._heap)

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int:
        skipped = []
        try:
            while self._heap:
                count, tick, key = heapq.heappop(self._heap)
                if self._stamp.get(key) != tick:
                    continue  # stale: re-pushed since, or evicted
                skipped.append((count, tick, key))
                if is_evictable(key):
                    skipped.pop()
                    heapq.heappush(self._heap, (count, tick, key))
                    return key
            raise NoVictimError("every resident expert is protected")
        finally:
            for entry in skipped:
                heapq.heappush(self._heap, entry)

    def count(self, key: int) -> float:
        return self._count.get(key, 0.0)
