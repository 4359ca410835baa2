"""Adaptive: follow whichever candidate policy would have missed least on the recent routing.

Each candidate (LRU, LFU, next-use with the model the default starts from, and next-use with a
reuse model refitted every few dozen tokens on the routing served) runs twice: a ranker that sees
the real cache's events and can name a victim among the real residents, and a shadow cache
(shadow_cache.py: residency and the policy's bookkeeping only) that replays the same layer steps
as if that candidate alone ran the cache (candidates.py; compiled: native_candidates.py). Each
layer step adds the shadows' misses to decayed counts (a half-life of HALF_LIFE_TOKENS tokens);
the real cache evicts with the ranker of the candidate whose count is lowest, switching only
when another is better by SWITCH_MARGIN. Each count is first scaled by how the live cache bore
its shadow out: the live cache's loads at the sampled layers over that shadow's misses there,
both over the steps its candidate led once the cache had loaded as many experts as it holds
since the candidate took over (decayed alike; 1 until it has led, with the weight of
CALIBRATION_PRIOR_TOKENS tokens' sampled uses; never below 1; LRU's never scaled), and while
another candidate leads the evidence against it fades with a half-life of
CALIBRATION_FORGET_TOKENS tokens, so that it is retested, not held against it for ever: at
Mixtral-8x7B's shape (flat, half of a layer's experts kept, 50%) the generic next-use's early
lead left a ratio of 1.105 that the refitted next-use, whose shadow missed 5% less than LRU's,
inherited, and the default stayed with LRU (0.999x its loads); fading, 0.948x. A sample is
faithful to LRU (its shadow on 4 of Qwen3-30B-A3B's 48 layers missed 15.08 per token where LRU
over the whole pool loaded 15.07 on them) but not to next-use, whose choices depend on how many
layers share the pool: on flat routing at that shape (10%, half of a layer's experts kept from
token to token) its shadow missed 15.02 where next-use over the whole pool loaded 17.02, so the
default, trusting the shadow, followed next-use to 1.13x LRU's loads; calibrated, 1.000x
(benchmarks/adaptive_shapes.py).
The shadows replay a sample of at most SAMPLED_LAYERS layers, and about SAMPLED_USES expert uses
per token, with the capacity scaled to them (set dueling, Qureshi et al. 2007): it ranks the
candidates about as well at a fraction of the cost (16 uses saved 7-15 us per layer step but
made up to 5% more loads on ESFT and GPT-OSS at 50%, where it sampled 2 of 26 layers: not
taken). Only the leader's ranker names victims; the others are dormant (base.set_dormant: LFU
keeps no heap, next-use computes no expected next uses), and a ranker woken when its candidate
takes the lead chooses exactly as if it had never slept (tested), but for forecasts it received
asleep and a refit's model, which on waking applies to every layer at once: 7-15 us less per
layer step. This module keeps what is the same for either engine: the sample, the routing
history and its refits.

The model the default starts from is the generic table (how age and recent uses predict reuse on
the shipped ESFT routing) or, with policy_fit (or the sessions generate --learn recorded), one
fitted on the user's traces (starting_model). The generic one
is refitted with each refit of the learner, from the same counts with popularity and transitions
pooled (next_use.ReuseModel.fit_with_age_table; no extra pass): at shapes whose routing we do
not ship, ESFT's ages misjudged the routing served (Qwen3-30B-A3B's shape, reuse 0.5, Zipf 0.7,
10%: 1.0023x LRU's loads with the shipped table, 0.943x refitted; 90 cases: worst 1.0023 ->
1.000x, mean 0.892 -> 0.888x), while on the shipped routing the default's loads moved by at most
0.3% either way. A user's fit is kept: replaced by the refitted ages, it made more loads in 22
of the 24 real-task cases, up to 0.809 -> 0.830x LRU's (ESFT translation, 50%; measured with the
fit leaning on "far", before starting_model). The learner keeps the experts' popularity it
refits only while popularity learnt from earlier tokens has predicted the later ones
(popularity_persistence.py); where each request brings new favourites it takes the age table.
Between its full refits the learner's transitions are refreshed every few dozen tokens from
counts the history keeps current (sliding_transitions.py).

Why: no single policy wins on every model. On the shipped routing, next-use's generic table
beats LRU by 6-20%, but on flat-popularity routing it loses to LRU; LFU wins on some tasks; the
refitted model (which learns the experts' popularity and transitions) saves another 4-13% on
ESFT but loses to the generic one on some GPT-OSS tasks. A
default must be safe on routing it has never seen, and following the measured best of
candidates that include LRU stays close to LRU at worst. When every expert fits in the pool no
victim is ever chosen, and the policy does nothing at all (no per-layer cost at budget 1.0).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from ..trace import Trace
from . import native_candidates
from .base import EvictionPolicy, NoVictimError
from .candidates import LEARNER, NAMES, NEXT_USE, NO_VICTIM, Candidates
from .next_use import ReuseModel, generic_wait
from .popularity_persistence import PopularityPersistence
from .routing_history import COMPILED_FIT_NS_PER_CELL, NUMPY_FIT_NS_PER_CELL, RoutingHistory

HALF_LIFE_TOKENS = 64  # the recent window the candidates are compared over
SWITCH_MARGIN = 0.02  # a challenger must miss 2% less than the leader to take over
SAMPLED_LAYERS = 8  # shadows replay at most this many layers (evenly spaced), with capacity scaled
SAMPLED_USES = 32  # ... and at most about this many expert uses per token (layers x top-k): the cost per step
CALIBRATION_PRIOR_TOKENS = 4  # a candidate's live-to-shadow ratio starts at 1 with the weight of this many tokens' sampled uses
CALIBRATION_FORGET_TOKENS = 256  # ... and while another leads, the evidence against it fades with this half-life
REFIT_PRIOR_WEIGHT = 20.0  # a refit's cells lean towards the generic table with the weight of this many observations


def starting_model(num_layers: int, num_experts: int, fit: Trace | None = None) -> ReuseModel:
    """The reuse model the default starts from: the generic table, or with `fit` (a trace of the
    user's task: policy_fit, or the sessions `--learn` recorded) one fitted on it whose cells lean
    towards the generic table with the weight of REFIT_PRIOR_WEIGHT observations, as the online
    refits' do, not towards "far" as a fitted next-use's: a fit of a few sessions leaves most
    cells seen a few times. On the shipped traces' held-out halves (fit on the other half) it made
    fewer loads than the "far" fit in 22 of 24 stream cases (up to 1.4% of LRU's), 0.5% more at
    worst (ESFT intent at 25%); sessions each fitted on the ones before, 0.2-2.2% fewer at 25%
    (BENCHMARKS.md, "Learning across sessions")."""
    if fit is None:
        return ReuseModel.generic(num_layers, num_experts)
    return ReuseModel.fit(fit, prior=generic_wait(), prior_weight=REFIT_PRIOR_WEIGHT)


class AdaptivePolicy(EvictionPolicy):
    name = "adaptive"

    def __init__(
        self, model: ReuseModel, *, num_layers: int, num_experts: int, capacity: int, top_k: int = 1, learn: bool = True, native: bool | None = None,
    ):
        """model: the reuse model next-use starts from (generic, or fitted on a user's traces);
        top_k: experts per token and layer (more of them: fewer layers sampled); learn: refit the
        learner's model on the routing seen (routing_history.py); native: the compiled candidates
        (None: where they can be built; never while idle, where nothing would call them, so a
        budget that holds every expert compiles nothing)."""
        self.num_experts = num_experts
        self.refit_age_table = model.transitions is None and not model.bucket.any()  # generic: refit; fitted on the user's traces: kept
        self.idle = capacity >= num_layers * num_experts  # every expert fits: nothing will ever be evicted
        sampled_layers = max(2, min(SAMPLED_LAYERS, SAMPLED_USES // top_k))
        stride = max(1, num_layers // sampled_layers)
        self.sampled = list(range(0, num_layers, stride))
        self.shadow_slots = max(1, round(capacity * len(self.sampled) / num_layers))
        self.native = not self.idle and (native_candidates.available() if native is None else native)
        engine = native_candidates.NativeCandidates if self.native else Candidates
        self.candidates = engine(
            model, model.select_layers(self.sampled, num_experts), num_layers=num_layers, num_experts=num_experts, sampled=self.sampled,
            shadow_slots=self.shadow_slots, decay=0.5 ** (1.0 / (HALF_LIFE_TOKENS * len(self.sampled))), keep=1 - SWITCH_MARGIN,
            prior=CALIBRATION_PRIOR_TOKENS * len(self.sampled) * top_k, settle=capacity,
            forget=0.5 ** (1.0 / (CALIBRATION_FORGET_TOKENS * len(self.sampled))),
        )
        self.compiled_fit = not self.idle and native_candidates.available()  # the refits' counts (the same models either way: tested)
        fit_ns_per_cell = COMPILED_FIT_NS_PER_CELL if self.compiled_fit else NUMPY_FIT_NS_PER_CELL
        self.history = RoutingHistory(num_layers, num_experts, top_k, fit_ns_per_cell=fit_ns_per_cell) if learn else None
        self.persistence = PopularityPersistence(num_experts, self.history.capacity) if learn else None
        self.refits = self.refreshes = 0
        self.refit_seconds = 0.0  # spent refitting, all refits together (and refreshing)
        self.learner_model: ReuseModel | None = None  # the learner's last full refit, while it keeps its transitions
        if not self.idle:  # each expert use, load and eviction straight to the candidates, no frame of ours
            self.on_insert, self.on_access, self.on_evict = self.candidates.insert, self.candidates.access, self.candidates.evict

    @property
    def leader_name(self) -> str:
        leader = self.candidates.leader
        if leader != LEARNER:
            return NAMES[leader]
        ages_only = self.persistence is not None and not self.persistence.persists
        return NAMES[leader] + (" (refitted ages)" if ages_only else " (refitted)")

    @property
    def switches(self) -> int:
        return self.candidates.switches

    def on_layer_start(self, layer: int, keys: list[int]) -> None:
        if self.idle:
            return
        if self.history is not None:
            self.history.record(layer, keys)
            if self.history.refit_due:
                self._refit()
            elif self.history.refresh_due:
                self._refresh_transitions()
        self.candidates.layer_start(layer, keys)

    def _refit(self) -> None:
        """Fit the reuse model on the recent routing and hand it to the learning candidate (and its
        age x recent-uses table to the other next-use, where that started generic). A few
        hundred tokens leave most of its cells (popularity x age x recent uses x transition) seen
        a few times: they lean towards what the generic table expects at their age and recent
        uses, not towards "far" as an offline fit's do (4-8% fewer loads at 50% on the fit halves
        of ESFT and GPT-OSS, the same on flat routing: BENCHMARKS.md). While the popularity it
        learns does not persist, the learner takes the age table instead
        (popularity_persistence.py)."""
        start = time.perf_counter()
        new_tokens = self.history.since_fit
        history = self.history.as_trace()
        model, age_table = ReuseModel.fit_with_age_table(
            history, prior=generic_wait(), prior_weight=REFIT_PRIOR_WEIGHT, compiled=self.compiled_fit, transitions=self.history.transitions.table(),
        )
        self.persistence.add_refit(history.expert_ids, new_tokens)
        if not self.persistence.persists:
            model = age_table
        self.learner_model = model if model.transitions is not None else None
        self.candidates.use_model(LEARNER, model, model.select_layers(self.sampled, self.num_experts))
        if self.refit_age_table:
            self.candidates.use_model(NEXT_USE, age_table, age_table.select_layers(self.sampled, self.num_experts))
        self.refits += 1
        self.refit_seconds += time.perf_counter() - start

    def _refresh_transitions(self) -> None:
        """Between full refits, hand the learner its model with the transitions of the tokens
        kept now (sliding_transitions.py); the rest of it stays the last refit's."""
        self.history.refreshed()
        if self.learner_model is None:  # the learner holds the age table: no transitions to refresh
            return
        start = time.perf_counter()
        self.learner_model = replace(self.learner_model, transitions=self.history.transitions.table())
        self.candidates.use_model(LEARNER, self.learner_model, self.learner_model.select_layers(self.sampled, self.num_experts))
        self.refreshes += 1
        self.refit_seconds += time.perf_counter() - start

    def on_prompt(self, layer: int, routing) -> None:
        """A prefill's tokens join the routing learnt from (its refit comes at the next step),
        and next-use's candidates take them as if decoded."""
        if self.idle:
            return
        if self.history is not None:
            self.history.record_prompt(layer, routing)
        self.candidates.prompt(layer, routing)

    def on_forecast(self, layer: int, probabilities) -> None:
        if not self.idle:
            self.candidates.forecast(layer, probabilities)

    def on_insert(self, key: int) -> None:  # idle; else the candidates' (__init__)
        pass

    def on_access(self, key: int) -> None:
        pass

    def on_evict(self, key: int) -> None:
        pass

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int:
        victim = self.candidates.victim(is_evictable)
        if victim == NO_VICTIM:
            raise NoVictimError("every resident expert is protected")
        return victim
