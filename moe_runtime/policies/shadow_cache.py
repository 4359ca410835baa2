"""A shadow cache: which keys a policy alone would keep resident, with nothing else.

The adaptive default replays the recent routing through one shadow per candidate policy and
follows the one that misses least. A shadow needs only residency and the policy's own
bookkeeping: no slots, no prefetches, no admissions, no statistics, so it is a set and a loop.
It makes exactly the misses a CacheCore of the same capacity makes with the same policy on the
same steps when nothing is prefetched or pinned (tested), for a fraction of the core's full
acquire path: the default runs four of them on every sampled layer step (BENCHMARKS.md). A
tiering plan's miss rates come from one too (placement/tiering.py: the pinned experts left out
of the steps and the capacity, the transient ones dropped after theirs).
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import EvictionPolicy


class ShadowCache:
    def __init__(self, policy: EvictionPolicy, *, num_experts: int, capacity: int):
        self.policy = policy
        self.num_experts = num_experts
        self.capacity = capacity
        self.resident: set[int] = set()

    def step(self, layer: int, experts: Sequence[int]) -> int:
        """One layer step using `experts`; returns its misses. Steps with more experts than the
        capacity run in waves (a prefill does so live); a wave's experts are never each other's
        victims."""
        keys = [layer * self.num_experts + expert for expert in experts]
        self.policy.on_layer_start(layer, keys)
        misses = 0
        for begin in range(0, len(keys), self.capacity):
            wave = keys[begin : begin + self.capacity]
            misses += self._wave(set(wave), wave)
        return misses

    def _wave(self, protected: set[int], wave: list[int]) -> int:
        policy, resident = self.policy, self.resident
        misses = 0
        for key in wave:
            if key not in resident:
                misses += 1
                if len(resident) >= self.capacity:
                    victim = policy.choose_victim(lambda candidate: candidate not in protected)
                    resident.discard(victim)
                    policy.on_evict(victim)
                resident.add(key)
                policy.on_insert(key)
            if policy.tracks_accesses:
                policy.on_access(key)
        return misses

    def drop(self, keys: Sequence[int]) -> None:
        """`keys` leave without being anyone's victim (a tiering plan's transient experts, after
        their layer step, as CacheCore.release drops them)."""
        for key in keys:
            if key in self.resident:
                self.resident.discard(key)
                self.policy.on_evict(key)
