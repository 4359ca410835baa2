"""The adaptive default's candidates and their duel, in Python: the reference for candidates.cpp.

Four candidates in a fixed order (LRU, LFU, next-use with the model the default starts from,
next-use refitted on the routing served: LEARNER), each twice: a ranker that sees the real
cache's events and names victims while its candidate leads, and a shadow cache
(shadow_cache.py) that replays the sampled layers as if that candidate alone ran the cache.
Each sampled layer step decays the candidates' miss counts and adds the shadows' misses; the
leader changes when another candidate misses less by the switch margin. Only the leader's
ranker is awake (base.set_dormant). The compiled twin (native_candidates.py) makes exactly
these decisions for a fraction of the cost; this one serves where it cannot be built.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import EvictionPolicy, NoVictimError
from .lfu import LFUPolicy
from .lru import LRUPolicy
from .next_use import NextUsePolicy, ReuseModel
from .shadow_cache import ShadowCache

NAMES = ("lru", "lfu", "next-use", "next-use")
LEARNER = 3  # the candidate whose reuse model is refitted
NO_VICTIM = -1


class Candidates:
    def __init__(
        self, model: ReuseModel, sampled_model: ReuseModel, *, num_layers: int, num_experts: int, sampled: list[int], shadow_slots: int,
        decay: float, keep: float,
    ):
        """model: next-use's reuse model for all layers (sampled_model: for the `sampled` layers,
        renumbered); shadow_slots: the shadows' capacity; decay: of the miss counts per sampled
        layer step; keep: a challenger leads when its misses are below keep x the leader's."""
        self.num_experts = num_experts
        self.rankers = self._made(num_layers, num_experts, model)
        self.shadows = [ShadowCache(policy, num_experts=num_experts, capacity=shadow_slots) for policy in self._made(len(sampled), num_experts, sampled_model)]
        self.shadow_of = {layer: index for index, layer in enumerate(sampled)}
        self._access_hooks = [ranker.on_access for ranker in self.rankers if ranker.tracks_accesses]
        self.decay, self.keep = decay, keep
        self.misses = np.zeros(len(NAMES))  # decayed shadow misses
        self.leader = 0
        self.switches = 0
        for ranker in self.rankers[1:]:
            ranker.set_dormant(True)

    @staticmethod
    def _made(num_layers: int, num_experts: int, model: ReuseModel) -> list[EvictionPolicy]:
        return [LRUPolicy(), LFUPolicy(), NextUsePolicy(num_layers, num_experts, model), NextUsePolicy(num_layers, num_experts, model)]

    def layer_start(self, layer: int, keys: list[int]) -> None:
        for ranker in self.rankers:
            ranker.on_layer_start(layer, keys)
        sampled = self.shadow_of.get(layer)
        if sampled is None:
            return
        experts = [key % self.num_experts for key in keys]
        self.misses *= self.decay
        for index, shadow in enumerate(self.shadows):
            self.misses[index] += shadow.step(sampled, experts)
        best = int(self.misses.argmin())
        if best != self.leader and self.misses[best] < self.keep * self.misses[self.leader]:
            self.rankers[best].set_dormant(False)
            self.rankers[self.leader].set_dormant(True)
            self.leader = best
            self.switches += 1

    def forecast(self, layer: int, probabilities) -> None:
        for ranker in self.rankers:
            ranker.on_forecast(layer, probabilities)
        if layer in self.shadow_of:
            for shadow in self.shadows:
                shadow.policy.on_forecast(self.shadow_of[layer], probabilities)

    def insert(self, key: int) -> None:
        for ranker in self.rankers:
            ranker.on_insert(key)

    def access(self, key: int) -> None:
        for on_access in self._access_hooks:
            on_access(key)

    def evict(self, key: int) -> None:
        for ranker in self.rankers:
            ranker.on_evict(key)

    def victim(self, is_evictable: Callable[[int], bool]) -> int:
        """The leader's victim, NO_VICTIM if every resident key is protected."""
        try:
            return self.rankers[self.leader].choose_victim(is_evictable)
        except NoVictimError:
            return NO_VICTIM

    def use_model(self, model: ReuseModel, sampled_model: ReuseModel) -> None:
        """The learner's refit: `model` for its ranker, `sampled_model` for its shadow."""
        self.rankers[LEARNER].use_model(model)
        self.shadows[LEARNER].policy.use_model(sampled_model)
