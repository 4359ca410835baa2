"""The eviction-policy interface shared by the live slot cache and the trace simulator.

Keys are ints (`layer * E + expert`) so the simulator can replay millions of accesses quickly.
The cache owns residency (which key sits in which slot); a policy only orders the resident keys
and names a victim. Keys the cache must keep (in use by the running layer, pinned by a plan,
still loading) are excluded through `is_evictable`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar


class NoVictimError(RuntimeError):
    """Every resident key is protected: the caller must wait for a load or use fewer slots."""


class EvictionPolicy(ABC):
    name: ClassVar[str]
    tracks_accesses: ClassVar[bool] = True  # False: on_access does nothing, and callers that care about cost skip it

    @abstractmethod
    def on_insert(self, key: int) -> None:
        """`key` became resident (a load into a slot was issued)."""

    @abstractmethod
    def on_access(self, key: int) -> None:
        """`key` was used by a layer while resident."""

    @abstractmethod
    def on_evict(self, key: int) -> None:
        """`key` left its slot."""

    @abstractmethod
    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int:
        """A resident key to evict; raises NoVictimError when none is evictable."""

    def on_layer_start(self, layer: int, keys: list[int]) -> None:  # noqa: B027 - optional hook
        """MoE layer `layer` starts and uses `keys`; policies that track the layer clock use it."""

    def on_forecast(self, layer: int, probabilities) -> None:  # noqa: B027 - optional hook
        """A predictor's forecast [E] (probability each expert is used) for the coming `layer`."""

    def on_prompt(self, layer: int, routing) -> None:  # noqa: B027 - optional hook
        """A step of several tokens per sequence (a prefill) at `layer`, after its on_layer_start
        (which names the union of their experts): each token's experts, [B, T, K] int64 for B
        sequences of T consecutive tokens."""

    def set_dormant(self, dormant: bool) -> None:  # noqa: B027 - optional hook
        """While dormant, choose_victim is not called: a policy may keep only the state it needs to
        name victims again once woken (set_dormant(False)), and skip the rest (the adaptive
        default's candidates that do not lead: adaptive.py)."""
