"""Least recently used: evict the resident expert whose last use is oldest."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from .base import EvictionPolicy, NoVictimError


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()  # oldest first

    def on_insert(self, key: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: int) -> None:
        self._order.move_to_end(key)

    def on_evict(self, key: int) -> None:
        del self._order[key]

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int:
        for key in self._order:
            if is_evictable(key):
                return key
        raise NoVictimError("every resident expert is protected")

    def order(self) -> list[int]:
        """Resident keys, least recently used first (for tests and inspection)."""
        return list(self._order)
