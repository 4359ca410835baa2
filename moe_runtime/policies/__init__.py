"""Cache eviction policies, one implementation each, shared by the runtime and the simulator."""

from __future__ import annotations

from .base import EvictionPolicy, NoVictimError
from .lfu import LFUPolicy
from .lru import LRUPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {cls.name: cls for cls in (LRUPolicy, LFUPolicy)}


def make_policy(name: str | EvictionPolicy) -> EvictionPolicy:
    """A fresh policy by name (or the instance given)."""
    if isinstance(name, EvictionPolicy):
        return name
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name]()


__all__ = ["POLICIES", "EvictionPolicy", "LFUPolicy", "LRUPolicy", "NoVictimError", "make_policy"]
