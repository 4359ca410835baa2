"""Trace replay: known answers, Belady's optimality, counters, and agreement with the runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_runtime.belady import belady_misses, layer_keys, next_use
from moe_runtime.runtime.slot_cache import SlotCache
from moe_runtime.runtime.expert_loader import Loader
from moe_runtime.policies import POLICIES, make_policy
from moe_runtime.runtime.slot_pool import SlotPool
from moe_runtime.simulator import Prefetch, TimingModel, replay
from moe_runtime.stats import RuntimeStats
from moe_runtime.host_tier import RamSource
from moe_runtime.trace import Trace
from moe_runtime.expert_format import ExpertSpec


def _trace(ids, num_experts: int, sequences=None) -> Trace:
    ids = np.asarray(ids, dtype=np.int16)
    offsets = sequences or [0, ids.shape[0]]
    return Trace(ids, np.ones_like(ids, dtype=np.float16), np.array(offsets), num_experts=num_experts, top_k=ids.shape[2])


def test_next_use_indices():
    assert next_use(np.array([5, 3, 5, 5, 3])).tolist() == [2, 4, 3, np.iinfo(np.int64).max, np.iinfo(np.int64).max]


def test_belady_on_a_hand_made_stream():
    # One layer, K = 1, 2 slots: a b c a b.  MIN: a b (miss, miss), c evicts b (a is used sooner), a hit, b miss.
    keys = np.array([0, 1, 2, 0, 1])
    assert belady_misses(keys, 1, 2) == 4
    assert belady_misses(keys, 1, 3) == 3


def test_lru_replay_on_a_hand_made_stream():
    # One layer, K = 1, capacity 2: a b c a b -> LRU misses everything.
    trace = _trace([[[0]], [[1]], [[2]], [[0]], [[1]]], num_experts=3)
    result = replay(trace, make_policy("lru"), 2)
    assert (result.hits, result.misses, result.loads) == (0, 5, 5)


def test_global_pool_lru_evicts_the_next_layer_first():
    """Two layers, K = 1, 3 slots: keys cycle 0, 2, 1, 3 (4 keys), so LRU always evicts the next one.

    MIN: 3 cold misses, then 3 evicts 1 (used last), 0 and 2 hit, 1 misses, 3 hits: 5 misses."""
    trace = _trace([[[0], [0]], [[1], [1]], [[0], [0]], [[1], [1]]], num_experts=2)
    lru = replay(trace, make_policy("lru"), 3)
    nxt = replay(trace, make_policy("next-use", num_layers=2, num_experts=2, capacity=3, top_k=1), 3)
    optimum = belady_misses(layer_keys(trace.expert_ids, 2), 1, 3)
    assert lru.misses == 8 and optimum == 5
    assert optimum <= nxt.misses <= lru.misses


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_experts=st.integers(4, 9),
    top_k=st.integers(1, 3),
    layers=st.integers(1, 4),
    extra=st.integers(0, 8),
)
def test_belady_is_never_worse_than_any_policy(seed, num_experts, top_k, layers, extra):
    rng = np.random.default_rng(seed)
    tokens = 30
    ids = np.stack([np.stack([rng.choice(num_experts, top_k, replace=False) for _ in range(layers)]) for _ in range(tokens)])
    trace = _trace(ids, num_experts, [0, 12, tokens])
    capacity = top_k + extra
    fit = _trace(ids[:10], num_experts)
    optimum = belady_misses(layer_keys(trace.expert_ids, num_experts), top_k, capacity)
    for name in POLICIES:
        policy = make_policy(name, num_layers=layers, num_experts=num_experts, capacity=capacity, top_k=top_k, fit=fit)
        pinned = getattr(policy, "pinned", frozenset())
        result = replay(trace, policy, capacity, pinned=pinned)
        assert result.misses + len(pinned) >= optimum, name  # pinned experts load once, before the first token
        assert result.hits + result.misses == tokens * layers * top_k


def test_counters_add_up_with_prefetching(trace_paths):
    from moe_runtime.predictor import make_predictor
    from moe_runtime.trace import load_trace

    fit, held_out = load_trace(trace_paths["summary"]).split(0.5)
    held_out = held_out.select_sequences([0])
    scores = make_predictor("affinity").fit(fit).forecast_trace(held_out, 1)
    result = replay(held_out, make_policy("lru"), 400, prefetch=Prefetch(scores, 6, 1), timing=TimingModel())
    assert result.hits + result.misses == held_out.num_tokens * 26 * 6
    assert result.loads == result.misses + result.prefetch_loads
    assert result.prefetch_hits + result.wasted_prefetches <= result.prefetch_loads
    assert result.late_prefetches <= result.prefetch_hits
    assert result.total_ms >= held_out.num_tokens * 26 * TimingModel().layer_ms  # never faster than compute


def test_simulator_and_runtime_lru_agree(trace_paths):
    """The same access stream through the simulator and the runtime's slot cache: same hits."""
    from moe_runtime.trace import load_trace

    trace = load_trace(trace_paths["intent"]).select_sequences([0, 1])
    num_experts, capacity = trace.num_experts, 300
    simulated = replay(trace, make_policy("lru"), capacity)
    fused = [{"w": torch.zeros(num_experts, 1)} for _ in range(trace.num_layers)]
    pool = SlotPool(ExpertSpec({"w": (1,)}, torch.float32), capacity, torch.device("cpu"))
    stats = RuntimeStats(trace.num_layers)
    cache = SlotCache(num_experts=num_experts, num_slots=capacity, policy=make_policy("lru"), loader=Loader(RamSource(fused), pool), stats=stats)
    for token in trace.expert_ids.tolist():
        for layer, experts in enumerate(token):
            cache.start_layer(layer, experts)
            cache.acquire(layer, experts)
            cache.release(layer, experts)
    assert stats.total().hits == simulated.hits and stats.total().misses == simulated.misses


def test_capacity_below_top_k_is_refused():
    trace = _trace([[[0, 1]]], num_experts=4)
    with pytest.raises(ValueError, match="below top-k"):
        replay(trace, make_policy("lru"), 1)


def test_timing_model_validates():
    assert TimingModel(expert_mb=25.0, h2d_gbps=25.0).load_ms == pytest.approx(1.0)
    with pytest.raises(ValueError):
        TimingModel(h2d_gbps=0)


def test_per_layer_pools_run_every_policy_below_belady(trace_paths):
    from moe_runtime.bench import BenchSettings, run_bench
    from moe_runtime.policies import POLICIES
    from moe_runtime.trace import load_trace

    trace = load_trace(trace_paths["translation"]).select_sequences(range(6))
    settings = BenchSettings(budgets=(0.25,), policies=tuple(sorted(POLICIES)), per_layer_slots=12)
    report = run_bench({"t": trace}, settings)
    optimum = report["belady"][0]["hit_rate"]
    assert sorted(r["policy"] for r in report["results"]) == sorted(POLICIES)
    assert all(0 < r["hit_rate"] <= optimum for r in report["results"])


def test_host_execution_computes_every_expert_on_the_cpu_beside_the_layer():
    ids = np.random.default_rng(0).integers(0, 8, size=(20, 3, 2))  # 20 tokens, 3 layers, top-2 of 8
    ids[:, :, 1] = (ids[:, :, 0] + 1) % 8  # distinct experts per token
    timing = TimingModel(expert_mb=20.0, host_gbps=40.0, layer_ms=0.25)  # 0.5 ms per expert on the CPU
    result = replay(_trace(ids, 8), make_policy("lru", num_experts=8, capacity=4), 4, timing=timing, execution="host")
    assert result.loads == 0 and result.hits == 0 and result.host_computes == result.misses == 20 * 3 * 2
    assert result.total_ms == pytest.approx(20 * 3 * max(0.25, 2 * 0.5))


def test_hybrid_is_never_slower_than_loading_or_computing_on_the_cpu(trace_paths):
    from moe_runtime.trace import load_trace

    _, held_out = load_trace(trace_paths["law"]).split(0.5)
    trace = Trace(held_out.expert_ids[:300], held_out.gate_weights[:300], np.array([0, 300]), held_out.num_experts, held_out.top_k)
    capacity = int(0.25 * trace.num_layers * trace.num_experts)
    ms = {}
    for execution in ("device", "host", "hybrid"):
        policy = make_policy("lru", num_experts=trace.num_experts, capacity=capacity)
        result = replay(trace, policy, capacity, execution=execution)
        ms[execution] = result.total_ms / result.tokens
        assert result.hits + result.misses == trace.num_tokens * trace.num_layers * trace.top_k
        if execution == "hybrid":
            assert 0 < result.host_computes < result.misses and result.loads == result.misses - result.host_computes + result.admissions
    assert ms["hybrid"] <= 0.6 * ms["device"] and ms["hybrid"] < ms["host"]


def test_admissions_stop_when_admitted_experts_are_not_used_again():
    from moe_runtime.outcome_rates import AdmissionRate

    rate = AdmissionRate()
    assert rate.worthwhile()  # no evidence yet: one use, one waste
    for _ in range(30):
        rate.record(False)
    refusals = [rate.worthwhile() for _ in range(AdmissionRate.TRIAL_EVERY)]
    assert refusals.count(True) == 1  # one trial admission keeps the rate measurable
    for _ in range(40):
        rate.record(True)
    assert rate.worthwhile()


def test_the_prefetch_gate_weighs_saving_against_cost():
    from moe_runtime.outcome_rates import PrefetchOutcomes
    from moe_runtime.prefetch_gate import PrefetchGate

    gate = PrefetchGate(load_ms=0.69, layer_ms=0.25)
    outcomes = PrefetchOutcomes(horizon_steps=4)
    # One layer ahead, idle link: a sure forecast saves 0.25 ms against a victim's 0.25 x 0.69.
    assert gate.select([(3, 0.99), (5, 0.95)], 1, 0.0, outcomes) == [3]  # the second waits behind the first: no saving left
    assert gate.select([(3, 0.3)], 1, 0.0, outcomes) == []  # a likely-wrong prefetch holds the link 0.44 ms too long
    assert gate.select([(3, 0.99)], 1, 2.0, outcomes) == []  # a busy link: it would land after its layer starts
    assert gate.select([(3, 0.9), (4, 0.9)], 3, 0.0, outcomes) == [3]  # further ahead: the next layer's loads wait behind it
    for _ in range(200):  # this routing's forecasts of 0.9 turn out wrong: the gate stops trusting them
        outcomes.record_use(0.9, False)
    assert gate.select([(3, 0.99)], 1, 0.0, outcomes) == []


def test_gated_prefetching_costs_at_most_a_little_where_ungated_costs_much(trace_paths):
    from moe_runtime.trace import load_trace

    fit, held_out = load_trace(trace_paths["law"]).split(0.5)
    part = Trace(held_out.expert_ids[:300], held_out.gate_weights[:300], np.array([0, 300]), held_out.num_experts, held_out.top_k)
    scores = np.zeros((300, part.num_layers, part.num_experts), dtype=np.float32)
    scores[:, :-1] = 0.9 * np.eye(part.num_experts, dtype=np.float32)[part.expert_ids[:, 1:]].max(axis=2)  # right, 0.9 each
    scores[:, :-1] += 0.6 * np.eye(part.num_experts, dtype=np.float32)[(part.expert_ids[:, 1:] + 7) % part.num_experts].max(axis=2)
    capacity = int(0.25 * part.num_layers * part.num_experts)
    ms = {}
    for name, prefetch in (("none", None), ("ungated", Prefetch(scores, 12, 1, gated=False)), ("gated", Prefetch(scores, 12, 1))):
        ms[name] = replay(part, make_policy("lru", num_experts=part.num_experts, capacity=capacity), capacity, prefetch=prefetch).total_ms
    assert ms["ungated"] > 1.05 * ms["none"] and ms["gated"] <= 1.01 * ms["none"]


def test_a_right_prefetch_overlaps_the_layer_before_its_target():
    """Prefetches are issued as layer l starts, behind its misses (as the runtime issues them
    while the layer's loads are in flight): with loads shorter than a layer, a perfect forecast
    one layer ahead hides every load but the first layer's."""
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(16)[:2] for _ in range(40 * 4)]).reshape(40, 4, 2)
    trace = _trace(ids, 16)
    perfect = np.zeros((40, 4, 16), dtype=np.float32)
    perfect[:, :-1] = np.eye(16, dtype=np.float32)[ids[:, 1:]].max(axis=2)
    timing = TimingModel(expert_mb=2.0, h2d_gbps=25.0, layer_ms=0.25)  # 0.08 ms a load
    capacity = 8
    runs = {
        name: replay(trace, make_policy("lru"), capacity, timing=timing, prefetch=prefetch)
        for name, prefetch in (("none", None), ("perfect", Prefetch(perfect, 2, 1)))
    }
    assert runs["perfect"].late_prefetches == 0 and runs["perfect"].prefetch_hits > 0
    assert runs["perfect"].stall_ms < 0.35 * runs["none"].stall_ms
    assert runs["perfect"].total_ms < runs["none"].total_ms


def test_a_missed_forecast_is_the_next_victim():
    """A prefetched expert its layer did not use is wasted and goes before the policy's victim:
    left as the policy ranked it (just inserted), it would hold a slot for a whole turn of the cache."""
    from moe_runtime.runtime.cache_core import CacheCore

    core = CacheCore(num_experts=8, num_slots=4, policy=make_policy("lru"), stats=RuntimeStats(2))
    for experts in ([0, 1], [2]):
        core.start_layer(0, experts)
        core.acquire(0, experts)
        core.release(0, experts)
    core.prefetch(1, [5], probabilities={5: 0.9})  # layer 1, expert 5: key 13
    core.start_layer(1, [6])  # the forecast was wrong
    assert core.wasted_prefetches == 1 and 13 in core.missed_forecasts
    accesses = core.acquire(1, [6])  # the pool is full: LRU would evict key 0; the missed forecast goes first
    assert [access.hit for access in accesses] == [False]
    assert 13 not in core.slot_of and 0 in core.slot_of
    core.release(1, [6])
    core.check_invariants()


def test_only_the_next_layers_forecast_reaches_the_policy(trace_paths):
    """Forecasts further ahead misled next-use (+4% loads on ESFT law, learned, three layers
    ahead, with no prefetch at all): the policy hears the next layer's forecast only."""
    from moe_runtime.trace import load_trace

    fit, held_out = load_trace(trace_paths["law"]).split(0.5)
    part = held_out.select_sequences(range(6))
    scores = np.random.default_rng(0).random((part.num_tokens, part.num_layers, part.num_experts)).astype(np.float32)
    capacity = int(0.25 * part.num_layers * part.num_experts)

    def loads(prefetch):
        policy = make_policy("next-use", num_layers=part.num_layers, num_experts=part.num_experts, capacity=capacity, fit=fit)
        return replay(part, policy, capacity, prefetch=prefetch).loads

    assert loads(Prefetch(scores, 0, 3)) == loads(None)  # forecasts three layers ahead, nothing prefetched
