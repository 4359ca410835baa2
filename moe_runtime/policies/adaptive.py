"""Adaptive: follow whichever candidate policy would have missed least on the recent routing.

Each candidate (LRU, LFU, next-use with the generic reuse model, and next-use with a reuse model
refitted every few hundred tokens on the routing served) runs twice: a ranker that sees
the real cache's events and can name a victim among the real residents, and a shadow cache
(shadow_cache.py: residency and the policy's bookkeeping only) that replays the same layer steps
as if that candidate alone ran the cache. Each layer step adds the shadows' misses to
decayed counts (a half-life of HALF_LIFE_TOKENS tokens); the real cache evicts with the ranker
of the candidate whose count is lowest, switching only when another is better by SWITCH_MARGIN.
The shadows replay a sample of at most SAMPLED_LAYERS layers, and about SAMPLED_USES expert uses
per token, with the capacity scaled to them (set dueling, Qureshi et al. 2007): it ranks the
candidates about as well at a fraction of the cost (16 uses saved 7-15 us per layer step but
made up to 5% more loads on ESFT and GPT-OSS at 50%, where it sampled 2 of 26 layers: not
taken). Only the leader's ranker names victims; the others are dormant (base.set_dormant: LFU
keeps no heap, next-use computes no expected next uses), and a ranker woken when its candidate
takes the lead chooses exactly as if it had never slept (tested), but for forecasts it received
asleep and a refit's model, which on waking applies to every layer at once: 7-15 us less per
layer step.

Why: no single policy wins on every model. On the shipped routing, next-use's generic table
beats LRU by 6-20%, but on flat-popularity routing it loses to LRU; LFU wins on some tasks; the
refitted model (which learns the experts' popularity and transitions) saves another 4-13% on
ESFT but loses to the generic one on some GPT-OSS tasks. A
default must be safe on routing it has never seen, and following the measured best of
candidates that include LRU stays close to LRU at worst. When every expert fits in the pool no
victim is ever chosen, and the policy does nothing at all (no per-layer cost at budget 1.0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .base import EvictionPolicy
from .next_use import ReuseModel
from .routing_history import RoutingHistory
from .shadow_cache import ShadowCache

HALF_LIFE_TOKENS = 64  # the recent window the candidates are compared over
SWITCH_MARGIN = 0.02  # a challenger must miss 2% less than the leader to take over
SAMPLED_LAYERS = 8  # shadows replay at most this many layers (evenly spaced), with capacity scaled
SAMPLED_USES = 32  # ... and at most about this many expert uses per token (layers x top-k): the cost per step


class AdaptivePolicy(EvictionPolicy):
    name = "adaptive"

    def __init__(
        self, candidates: Sequence[Callable[[list[int]], EvictionPolicy]], *, num_layers: int, num_experts: int, capacity: int,
        top_k: int = 1, learner: int | None = None,
    ):
        """candidates: factories of fresh policies for the given layers (each is built twice: a
        ranker for all layers, a shadow for the sampled ones); top_k: experts per token and layer
        (more of them: fewer layers sampled); learner: the index of a next-use candidate whose
        reuse model is refitted on the routing seen (routing_history.py)."""
        self.num_experts = num_experts
        self.rankers = [make(list(range(num_layers))) for make in candidates]
        self._access_hooks = [ranker.on_access for ranker in self.rankers if ranker.tracks_accesses]  # called per expert use
        sampled_layers = max(2, min(SAMPLED_LAYERS, SAMPLED_USES // top_k))
        stride = max(1, num_layers // sampled_layers)
        self.sampled = {layer: index for index, layer in enumerate(range(0, num_layers, stride))}  # layer -> shadow layer
        slots = max(1, round(capacity * len(self.sampled) / num_layers))
        self.shadows = [ShadowCache(make(list(self.sampled)), num_experts=num_experts, capacity=slots) for make in candidates]
        self.learner = learner
        self.history = RoutingHistory(num_layers, num_experts, top_k) if learner is not None else None
        self.refits = 0
        self.decay = 0.5 ** (1.0 / (HALF_LIFE_TOKENS * len(self.sampled)))  # per sampled layer step
        self.misses = np.zeros(len(candidates))  # decayed shadow misses
        self.leader = 0
        self.switches = 0
        for ranker in self.rankers[1:]:  # only the leader names victims: the others keep what waking them needs
            ranker.set_dormant(True)
        self.idle = capacity >= num_layers * num_experts  # every expert fits: nothing will ever be evicted

    @property
    def leader_name(self) -> str:
        return self.rankers[self.leader].name + (" (refitted)" if self.leader == self.learner else "")

    def on_layer_start(self, layer: int, keys: list[int]) -> None:
        if self.idle:
            return
        if self.history is not None:
            self.history.record(layer, keys)
            if self.history.refit_due:
                self._refit()
        for ranker in self.rankers:
            ranker.on_layer_start(layer, keys)
        sampled = self.sampled.get(layer)
        if sampled is None:
            return
        experts = [key % self.shadows[0].num_experts for key in keys]
        self.misses *= self.decay
        for index, shadow in enumerate(self.shadows):
            self.misses[index] += shadow.step(sampled, experts)
        best = int(self.misses.argmin())
        if best != self.leader and self.misses[best] < (1 - SWITCH_MARGIN) * self.misses[self.leader]:
            self.rankers[best].set_dormant(False)
            self.rankers[self.leader].set_dormant(True)
            self.leader = best
            self.switches += 1

    def _refit(self) -> None:
        """Fit the reuse model on the recent routing and hand it to the learning candidate's ranker
        and shadow."""
        model = ReuseModel.fit(self.history.as_trace())
        self.rankers[self.learner].use_model(model)
        self.shadows[self.learner].policy.use_model(model.select_layers(list(self.sampled), self.num_experts))
        self.refits += 1

    def on_forecast(self, layer: int, probabilities) -> None:
        for ranker in self.rankers:
            ranker.on_forecast(layer, probabilities)
        if layer in self.sampled:
            for shadow in self.shadows:
                shadow.policy.on_forecast(self.sampled[layer], probabilities)

    def on_insert(self, key: int) -> None:
        if self.idle:
            return
        for ranker in self.rankers:
            ranker.on_insert(key)

    def on_access(self, key: int) -> None:
        if self.idle:
            return
        for on_access in self._access_hooks:
            on_access(key)

    def on_evict(self, key: int) -> None:
        if self.idle:
            return
        for ranker in self.rankers:
            ranker.on_evict(key)

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int:
        return self.rankers[self.leader].choose_victim(is_evictable)
