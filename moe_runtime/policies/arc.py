"""ARC (Megiddo and Modha, 2003): adaptive balance between recency (T1) and frequency (T2).

Resident keys live in T1 (seen once recently) or T2 (seen at least twice); ghost lists B1/B2
remember recently evicted keys of each, and a hit on a ghost shifts the target size p of T1.
Adapted to the cache's interface: the cache decides when to evict and which keys are protected.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from .base import EvictionPolicy, NoVictimError


class ARCPolicy(EvictionPolicy):
    name = "arc"

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self.p = 0.0
        self.t1: OrderedDict[int, None] = OrderedDict()
        self.t2: OrderedDict[int, None] = OrderedDict()
        self.b1: OrderedDict[int, None] = OrderedDict()
        self.b2: OrderedDict[int, None] = OrderedDict()
        self._fresh: set[int] = set()  # inserted, first use not yet seen (it is not a re-reference)

    def on_insert(self, key: int) -> None:
        if key in self.b1:  # recency would have kept it: grow T1's target
            self.p = min(self.capacity, self.p + max(1.0, len(self.b2) / max(1, len(self.b1))))
            del self.b1[key]
            self.t2[key] = None
        elif key in self.b2:  # frequency would have kept it: shrink T1's target
            self.p = max(0.0, self.p - max(1.0, len(self.b1) / max(1, len(self.b2))))
            del self.b2[key]
            self.t2[key] = None
        else:
            self.t1[key] = None
        self._fresh.add(key)
        self._trim_ghosts()

    def on_access(self, key: int) -> None:
        if key in self._fresh:
            self._fresh.discard(key)
        elif key in self.t1:
            del self.t1[key]
            self.t2[key] = None
        elif key in self.t2:
            self.t2.move_to_end(key)

    def on_evict(self, key: int) -> None:
        self._fresh.discard(key)
        if key in self.t1:
            del self.t1[key]
            self.b1[key] = None
        else:
            del self.t2[key]
            self.b2[key] = None
        self._trim_ghosts()

    def _trim_ghosts(self) -> None:
        while len(self.b1) > self.capacity:
            self.b1.popitem(last=False)
        while len(self.b2) > self.capacity:
            self.b2.popitem(last=False)

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int:
        first, second = (self.t1, self.t2) if len(self.t1) > self.p else (self.t2, self.t1)
        for pool in (first, second):
            for key in pool:
                if is_evictable(key):
                    return key
        raise NoVictimError("every resident expert is protected")
