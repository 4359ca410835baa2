"""The cache core: which expert sits in which of S slots, shared by the live runtime and the simulator.

start_layer -> acquire(layer, experts) (hits in place, misses mapped to free or evicted slots, all
protected) -> prefetch(next layer, forecast experts) (into free or evicted slots, never blocking)
-> release(layer, experts) (protection ends; transient experts leave their slot).

The core is thread-free and moves no bytes: it decides residency, runs the eviction policy,
protects the running layer's experts, keeps pinned experts (a placement plan's) out of the
policy and out of eviction, drops transient experts (a plan's host tier) after their layer, and
counts hits, misses, loads and prefetches in `stats.layers`. The live SlotCache adds tickets and
the loader on top of it (`busy` names the keys whose copy is still in flight, which are never
evicted); the trace simulator adds a timing model. So a trace replayed through either makes the
same decisions, token by token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from ..outcome_rates import AdmissionRate, PrefetchOutcomes
from ..policies import EvictionPolicy, NoVictimError
from ..stats import RuntimeStats


class Access(NamedTuple):  # a tuple, not a dataclass: the simulator makes millions (3x faster)
    """One expert use of an acquire: its key and slot, and whether it had to be loaded."""

    key: int
    slot: int
    hit: bool
    prefetched: bool  # a hit on an expert a prefetch loaded and nothing had used yet


class CacheCore:
    def __init__(
        self,
        *,
        num_experts: int,
        num_slots: int,
        policy: EvictionPolicy,
        stats: RuntimeStats,
        pinned: Sequence[int] = (),
        transient: Sequence[int] = (),
        busy: Callable[[int], bool] = lambda key: False,
        wait_for_slot: Callable[[], bool] = lambda: False,
        on_evicted: Callable[[int], None] = lambda key: None,
    ):
        """busy(key): its load is still in flight (never evicted). wait_for_slot(): called when
        every resident key is protected; returns True once it has waited for a load to finish
        (then the search is retried), False when there is nothing to wait for.
        on_evicted(key): the key left its slot (the live cache drops its finished ticket)."""
        self.num_experts = num_experts
        self.num_slots = num_slots
        self.policy = policy
        self.stats = stats
        self.pinned: frozenset[int] = frozenset(pinned)
        self.transient: frozenset[int] = frozenset(transient)
        self.busy = busy
        self.wait_for_slot = wait_for_slot
        self.on_evicted = on_evicted
        self.slot_of: dict[int, int] = {}
        self.key_of: list[int | None] = [None] * num_slots
        self.free: list[int] = list(range(num_slots - 1, -1, -1))  # slot 0 is handed out first
        self.protected: set[int] = set()  # the running layer's experts
        self.prefetched: set[int] = set()  # loaded by a prefetch, its layer not reached yet
        self.missed_forecasts: dict[int, None] = {}  # prefetched, unused when their layer came: evicted first, oldest first
        self.wasted_prefetches = 0  # prefetched experts their layer did not use
        self.admitted: set[int] = set()  # admitted after a CPU computation, not used yet
        self.admission_value = AdmissionRate()
        self.prefetch_outcomes = PrefetchOutcomes(horizon_steps=len(stats.layers))  # a token's worth of layer steps
        self.prefetch_probability: dict[int, float] = {}  # prefetched key -> its forecast probability

    # ------------------------------------------------------------------ queries
    def key(self, layer: int, expert: int) -> int:
        return layer * self.num_experts + expert

    def resident(self, layer: int) -> list[int]:
        """Experts of `layer` that sit in a slot (loaded or loading)."""
        low = layer * self.num_experts
        return sorted(key - low for key in self.slot_of if low <= key < low + self.num_experts)

    def evictable(self, key: int) -> bool:
        return key not in self.protected and key not in self.pinned and not self.busy(key)

    def waves(self, layer: int, experts: list[int]) -> list[list[int]]:
        """`experts` of `layer` in passes that fit the pool (a prefill's union can hold more than
        it), resident experts first; one pass keeps the router's order."""
        room = self.num_slots - len(self.pinned)
        if not experts:
            return []
        if len(experts) <= room:
            return [experts]
        resident = set(self.resident(layer))
        ordered = [e for e in experts if e in resident] + [e for e in experts if e not in resident]
        return [ordered[i : i + room] for i in range(0, len(ordered), room)]

    # ------------------------------------------------------------------ the layer's steps
    def start_layer(self, layer: int, experts: Sequence[int]) -> None:
        """Tell the policy which experts this layer step uses (once per step, before any wave),
        and settle the prefetches made for it: those it does not use were wrong forecasts."""
        keys = [self.key(layer, expert) for expert in experts]
        self.policy.on_layer_start(layer, keys)
        if self.prefetched:
            self._settle_prefetches(layer, keys)

    def _settle_prefetches(self, layer: int, used: list[int]) -> None:
        """Prefetched experts of `layer` that this step does not use are wasted, and become the
        first victims: the policy ranked them as just inserted, but nothing used them, and left
        where it put them a wrong forecast would hold a slot for a whole turn of the cache."""
        low, high = layer * self.num_experts, (layer + 1) * self.num_experts
        used_keys = set(used)
        wrong = [key for key in self.prefetched if low <= key < high and key not in used_keys]
        for key in wrong:
            self.prefetched.discard(key)
            self.wasted_prefetches += 1
            self.prefetch_outcomes.record_use(self.prefetch_probability.pop(key, 1.0), False)
            self.missed_forecasts[key] = None

    def forecast(self, layer: int, lookahead: int, probabilities) -> None:
        """A predictor's forecast [E] for `layer`, `lookahead` layers ahead: the policy hears the
        next layer's only. Further ahead it misled next-use: learned forecasts three layers ahead
        made it load 4.2% more on ESFT law with nothing prefetched (BENCHMARKS.md)."""
        if lookahead == 1:
            self.policy.on_forecast(layer, probabilities)

    def acquire(self, layer: int, experts: Sequence[int]) -> list[Access]:
        """Protect `experts` of `layer` and give each a slot: hits where they are, misses mapped
        to free or evicted slots (the caller loads them). All or nothing: if no slot can be found
        for one, the misses mapped so far are forgotten and the error is raised."""
        counters = self.stats.layers[layer]
        base = layer * self.num_experts
        keys = [base + expert for expert in experts]
        if len(keys) > self.num_slots - len(self.pinned) and len(set(keys) - self.pinned) > self.num_slots - len(self.pinned):
            raise AssertionError(f"wave of {len(keys)} experts exceeds the {self.num_slots} slots")
        self.protected.update(keys)
        accesses: list[Access] = []
        missed: list[int] = []
        slot_of, prefetched_keys, pinned, on_access = self.slot_of, self.prefetched, self.pinned, self.policy.on_access
        try:
            for key in keys:
                hit = key in slot_of
                prefetched = hit and key in prefetched_keys
                if hit:
                    counters.hits += 1
                    self.missed_forecasts.pop(key, None)
                    if key in self.admitted:
                        self.admitted.discard(key)
                        self.admission_value.record(True)
                    if prefetched:
                        prefetched_keys.discard(key)
                        counters.prefetches_used += 1
                        self.prefetch_outcomes.record_use(self.prefetch_probability.pop(key, 1.0), True)
                else:
                    counters.misses += 1
                    missed.append(key)
                    self._place(layer, key)
                if key not in pinned:
                    on_access(key)
                accesses.append(Access(key, slot_of[key], hit, prefetched))
        except BaseException:
            self.forget([access.key for access in accesses if not access.hit])
            self.protected.difference_update(keys)
            raise
        self.prefetch_outcomes.next_step(missed)
        return accesses

    def compute_elsewhere(self, layer: int, experts: Sequence[int]) -> None:
        """`experts` of `layer` (none resident) are computed on the CPU this step: misses without
        a load, and no slot changes (the policy saw them in start_layer)."""
        counters = self.stats.layers[layer]
        counters.misses += len(experts)
        counters.host_computes += len(experts)

    def prefetch(
        self, layer: int, experts: Sequence[int], *, admission: bool = False, probabilities: dict[int, float] | None = None,
    ) -> list[Access]:
        """Map those `experts` of `layer` that are not resident to free or evicted slots, until
        no slot can be had without waiting; the caller loads them in the background.
        admission: the experts were just computed on the CPU and are admitted for later steps
        (counted as admissions, not as forecasts). probabilities: each expert's forecast, whose
        outcomes (used or wasted) calibrate the prefetch gate."""
        placed: list[Access] = []
        try:
            for expert in experts:
                key = self.key(layer, expert)
                if key in self.slot_of:
                    continue
                if not self.free:
                    try:
                        victim = self._evict_one()
                    except NoVictimError:
                        break
                    if not admission:
                        self.prefetch_outcomes.evicted_by_prefetch(victim)
                self._place(layer, key)
                if probabilities is not None:
                    self.prefetch_probability[key] = probabilities[expert]
                self.protected.add(key)  # until the call ends: a later one of this call never evicts it
                (self.admitted if admission else self.prefetched).add(key)
                placed.append(Access(key, self.slot_of[key], False, False))
        except BaseException:
            self.protected.difference_update(access.key for access in placed)
            self.forget([access.key for access in placed])
            raise
        self.protected.difference_update(access.key for access in placed)
        self.count_prefetches(layer, len(placed), admission=admission)
        return placed

    def count_prefetches(self, layer: int, count: int, *, admission: bool) -> None:
        """Add `count` (negative: take back) to the layer's prefetches issued, or its admissions."""
        counters = self.stats.layers[layer]
        if admission:
            counters.admissions += count
        else:
            counters.prefetches_issued += count

    def release(self, layer: int, experts: Sequence[int]) -> list[int]:
        """The layer is done with `experts`; transient ones leave their slot (unless still
        loading). Returns the slots of the released experts that stay mapped."""
        kept = []
        base, slot_of, transient = layer * self.num_experts, self.slot_of, self.transient
        for expert in experts:
            key = base + expert
            self.protected.discard(key)
            if key not in slot_of:
                continue
            if transient and key in transient and not self.busy(key):  # loaded on use, never kept
                self._drop(key)
            else:
                kept.append(slot_of[key])
        return kept

    def forget(self, keys: Sequence[int]) -> None:
        """Undo loads that failed or were never started: the keys leave, their slots are free,
        and the loads are not counted (nothing moved)."""
        for key in keys:
            counters = self.stats.layers[key // self.num_experts]
            counters.loads -= 1
            self.prefetched.discard(key)
            self._drop(key)

    # ------------------------------------------------------------------ slots
    def _place(self, layer: int, key: int) -> None:
        """Map `key` to a slot (free, else a victim's) and count the load."""
        if not self.free:
            self._evict_one_waiting()
        slot = self.free.pop()
        self.slot_of[key] = slot
        self.key_of[slot] = key
        if key not in self.pinned:
            self.policy.on_insert(key)
        self.stats.layers[layer].loads += 1

    def _evict_one_waiting(self) -> None:
        while True:
            try:
                self._evict_one()
                return
            except NoVictimError:
                if not self.wait_for_slot():
                    raise AssertionError("no evictable slot: every slot is in use by the running layer or pinned") from None

    def _evict_one(self) -> int:
        """Evict a missed forecast if one can go, else the policy's victim among evictable keys
        (returned); raises NoVictimError if there is none."""
        victim = next((key for key in self.missed_forecasts if self.evictable(key)), None)
        if victim is None:
            victim = self.policy.choose_victim(self.evictable)
        if victim in self.prefetched:
            self.wasted_prefetches += 1
            self.prefetch_outcomes.record_use(self.prefetch_probability.get(victim, 1.0), False)
        if victim in self.admitted:
            self.admission_value.record(False)
        self._drop(victim)
        return victim

    def _drop(self, key: int) -> None:
        slot = self.slot_of.pop(key)
        self.key_of[slot] = None
        if key not in self.pinned:
            self.policy.on_evict(key)
        self.prefetched.discard(key)
        self.missed_forecasts.pop(key, None)
        self.prefetch_probability.pop(key, None)
        self.admitted.discard(key)
        self.free.append(slot)
        self.on_evicted(key)

    def check_invariants(self) -> None:
        """Internal consistency (tests call this after every scenario)."""
        assert len(self.slot_of) + len(self.free) == self.num_slots, "every slot is either mapped or free"
        assert set(self.slot_of.values()).isdisjoint(self.free), "a free slot is still mapped"
        for key, slot in self.slot_of.items():
            assert self.key_of[slot] == key, f"slot {slot} maps back to {self.key_of[slot]}, not {key}"
        assert self.prefetched <= set(self.slot_of), "a prefetched key is not resident"
        assert set(self.missed_forecasts) <= set(self.slot_of) and self.prefetched.isdisjoint(self.missed_forecasts), "a missed forecast is not resident, or still pending"
        assert self.admitted <= set(self.slot_of), "an admitted key is not resident"
