"""The adaptive default's candidates and their duel, in Python: the reference for candidates.cpp.

Four candidates in a fixed order (LRU, LFU, next-use with the model the default starts from:
NEXT_USE, next-use refitted on the routing served: LEARNER), each twice: a ranker that sees the real
cache's events and names victims while its candidate leads, and a shadow cache
(shadow_cache.py) that replays the sampled layers as if that candidate alone ran the cache.
Each sampled layer step decays the candidates' miss counts and adds the shadows' misses; the
leader changes when another candidate's count, scaled by the live cache's loads over its
shadow's misses at the sampled steps it led (scores; that evidence fades while others lead),
is lower by the switch margin. Only the leader's ranker is awake (base.set_dormant). The
compiled twin (native_candidates.py) makes exactly these decisions for a fraction of the cost;
this one serves where it cannot be built.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import EvictionPolicy, NoVictimError
from .lfu import LFUPolicy
from .lru import LRUPolicy
from .next_use import NextUsePolicy, ReuseModel, summarize_prompt
from .shadow_cache import ShadowCache

NAMES = ("lru", "lfu", "next-use", "next-use")
LRU = 0  # the candidate whose shadow is faithful to the whole cache, never calibrated
NEXT_USE = 2  # the candidate with the reuse model the default starts from (its ages refitted if generic: adaptive.py)
LEARNER = 3  # the candidate whose reuse model is refitted
KIND = np.array([0, 1, 2, 2])  # each candidate's calibration: both next-use's are one policy (two models) that a sample misjudges alike
NO_VICTIM = -1


class Candidates:
    def __init__(
        self, model: ReuseModel, sampled_model: ReuseModel, *, num_layers: int, num_experts: int, sampled: list[int], shadow_slots: int,
        decay: float, keep: float, prior: float, settle: int, forget: float,
    ):
        """model: next-use's reuse model for all layers (sampled_model: for the `sampled` layers,
        renumbered); shadow_slots: the shadows' capacity; decay: of the miss counts per sampled
        layer step; keep: a challenger leads when its score is below keep x the leader's; prior:
        a candidate's live-to-shadow ratio starts at 1 with the weight of this many misses;
        settle: loads after a switch before the live cache is taken as the new leader's (the
        cache's capacity: until then it holds what the last leader chose); forget: the decay per
        sampled layer step of the live-to-shadow evidence of the kinds not leading (slower than
        `decay`: a ratio measured once is retested when it has faded, not held for ever)."""
        self.num_experts = num_experts
        self.rankers = self._made(num_layers, num_experts, model)
        self.shadows = [ShadowCache(policy, num_experts=num_experts, capacity=shadow_slots) for policy in self._made(len(sampled), num_experts, sampled_model)]
        self.shadow_of = {layer: index for index, layer in enumerate(sampled)}
        self._access_hooks = [ranker.on_access for ranker in self.rankers if ranker.tracks_accesses]
        self.decay, self.keep, self.prior, self.forget = decay, keep, prior, forget
        self.misses = np.zeros(len(NAMES))  # decayed shadow misses
        self.live = np.zeros(KIND.max() + 1)  # decayed live loads at the sampled steps a candidate of each KIND led
        self.shadowed = np.zeros(KIND.max() + 1)  # ... and the leader's own shadow's misses at those steps
        self.kinds = np.arange(KIND.max() + 1)  # [3] 0, 1, 2: masks the kinds not leading
        self.step = (-1, 0, 0)  # the running sampled step: (its layer, -1 if none; its leader; that leader's shadow misses)
        self.step_loads = 0  # the live cache's loads of the running sampled step's layer
        self.settle, self.unsettled = settle, 0  # loads the live cache still owes the last leader
        self.leader = 0
        self.switches = 0
        for ranker in self.rankers[1:]:
            ranker.set_dormant(True)

    @staticmethod
    def _made(num_layers: int, num_experts: int, model: ReuseModel) -> list[EvictionPolicy]:
        return [LRUPolicy(num_experts), LFUPolicy(), NextUsePolicy(num_layers, num_experts, model), NextUsePolicy(num_layers, num_experts, model)]

    def layer_start(self, layer: int, keys: list[int]) -> None:
        for ranker in self.rankers:
            ranker.on_layer_start(layer, keys)
        sampled = self.shadow_of.get(layer)
        if self.step[0] >= 0:
            self._calibrate()
        if sampled is None:
            return
        experts = [key % self.num_experts for key in keys]
        self.misses *= self.decay
        step_misses = [shadow.step(sampled, experts) for shadow in self.shadows]
        self.misses += step_misses
        scores = self.scores()
        best = int(scores.argmin())
        if best != self.leader and scores[best] < self.keep * scores[self.leader]:
            self.rankers[best].set_dormant(False)
            self.rankers[self.leader].set_dormant(True)
            self.leader = best
            self.switches += 1
            self.unsettled = self.settle
        self.step, self.step_loads = (layer, self.leader, step_misses[self.leader]), 0

    def scores(self) -> np.ndarray:
        """[4] each candidate's decayed shadow misses, times how much more the live cache loaded
        than its shadow missed while it (or the other next-use) led: at least 1, and 1 until it
        has led (a prior of `prior` misses). Never less: a live cache that did better than its
        leader's shadow may owe it to prefetches or to what the last leader left resident."""
        return self.misses * np.maximum(1.0, (self.live + self.prior) / (self.shadowed + self.prior))[KIND]

    def _calibrate(self) -> None:
        """Add the sampled step just ended to its leader's live loads and shadow misses; LRU's
        shadow is faithful to the whole cache (adaptive.py) and never calibrated, and no leader is
        until the cache has loaded `settle` experts since it took over: before, its live loads
        are partly what the last leader left resident. The other kinds' evidence fades by
        `forget`: what the live cache showed of a candidate that no longer leads was measured on
        routing, and for the learner on a model, that have since moved on."""
        _, leader, shadow_misses = self.step
        self.step = (-1, 0, 0)
        kind = KIND[leader]
        idle = self.kinds != kind
        self.live[idle] *= self.forget
        self.shadowed[idle] *= self.forget
        if leader == LRU or self.unsettled:
            return
        self.live[kind] = self.live[kind] * self.decay + self.step_loads
        self.shadowed[kind] = self.shadowed[kind] * self.decay + shadow_misses

    def prompt(self, layer: int, routing) -> None:
        """A prefill's tokens at `layer` [B, T, K] (after its layer_start): LRU's and next-use's
        rankers, and their shadows at a sampled layer, take them as if decoded (learn_prompt); LFU
        keeps the step as it came."""
        summary = summarize_prompt(routing, self.num_experts)
        sampled = self.shadow_of.get(layer)
        for candidate in (LRU, NEXT_USE, LEARNER):
            self.rankers[candidate].learn_prompt(layer, summary)
            if sampled is not None:
                self.shadows[candidate].policy.learn_prompt(sampled, summary)

    def forecast(self, layer: int, probabilities) -> None:
        for ranker in self.rankers:
            ranker.on_forecast(layer, probabilities)
        if layer in self.shadow_of:
            for shadow in self.shadows:
                shadow.policy.on_forecast(self.shadow_of[layer], probabilities)

    def insert(self, key: int) -> None:
        if key // self.num_experts == self.step[0]:
            self.step_loads += 1
        if self.unsettled:
            self.unsettled -= 1
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

    def use_model(self, candidate: int, model: ReuseModel, sampled_model: ReuseModel) -> None:
        """A next-use candidate's refit: `model` for its ranker, `sampled_model` for its shadow."""
        if not 0 <= candidate < len(NAMES) or KIND[candidate] != KIND[LEARNER]:
            raise ValueError("only the next-use candidates take a reuse model")
        self.rankers[candidate].use_model(model)
        self.shadows[candidate].policy.use_model(sampled_model)
