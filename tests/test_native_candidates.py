"""The adaptive default's compiled candidates (policies/candidates.cpp) against their Python
reference (policies/candidates.py): the same victim at every eviction and the same leader at
every layer step, on real and synthetic routing, with forecasts, refits and a fitted start."""

from pathlib import Path

import numpy as np
import pytest

from moe_runtime.policies import AdaptivePolicy, EvictionPolicy, NoVictimError, ReuseModel, make_policy, native_candidates
from moe_runtime.policies.shadow_cache import ShadowCache
from moe_runtime.simulator import replay
from moe_runtime.synthetic import flat_routing
from moe_runtime.trace import load_trace

ROUTING = Path(__file__).parents[1] / "moe_runtime" / "data" / "routing"
compiled_only = pytest.mark.skipif(not native_candidates.available(), reason="the compiled candidates cannot be built here")


class _Lockstep(EvictionPolicy):
    """Every event to the compiled default and to its reference; their victims and leaders must agree."""

    name = "lockstep"

    def __init__(self, compiled: AdaptivePolicy, reference: AdaptivePolicy):
        self.compiled, self.reference = compiled, reference
        self.evictions = 0

    def on_layer_start(self, layer, keys):
        self.compiled.on_layer_start(layer, keys)
        self.reference.on_layer_start(layer, keys)
        assert self.compiled.leader_name == self.reference.leader_name

    def on_forecast(self, layer, probabilities):
        self.compiled.on_forecast(layer, probabilities)
        self.reference.on_forecast(layer, probabilities)

    def on_prompt(self, layer, routing):
        self.compiled.on_prompt(layer, routing)
        self.reference.on_prompt(layer, routing)

    def on_insert(self, key):
        self.compiled.on_insert(key)
        self.reference.on_insert(key)

    def on_access(self, key):
        self.compiled.on_access(key)
        self.reference.on_access(key)

    def on_evict(self, key):
        self.compiled.on_evict(key)
        self.reference.on_evict(key)

    def choose_victim(self, is_evictable):
        victim = self.reference.choose_victim(is_evictable)
        assert self.compiled.choose_victim(is_evictable) == victim
        self.evictions += 1
        return victim


def _lockstep_replay(trace, capacity: int, model: ReuseModel, forecasts: bool) -> _Lockstep:
    """`trace` through one cache of `capacity` run by both engines; with `forecasts`, random
    probabilities (some outside [0, 1], clipped) for a later layer of the token after each step
    (one for the next layer only would be overwritten by its visit before any eviction here)."""
    shape = {"num_layers": trace.num_layers, "num_experts": trace.num_experts, "capacity": capacity, "top_k": trace.top_k}
    pair = _Lockstep(AdaptivePolicy(model, **shape, native=True), AdaptivePolicy(model, **shape, native=False))
    cache = ShadowCache(pair, num_experts=trace.num_experts, capacity=capacity)
    random = np.random.default_rng(0)
    for token in range(trace.num_tokens):
        for layer in range(trace.num_layers):
            cache.step(layer, trace.expert_ids[token, layer].tolist())
            if forecasts and layer + 2 < trace.num_layers:
                pair.on_forecast(int(random.integers(layer + 2, trace.num_layers)), random.random(trace.num_experts) * 1.4 - 0.2)
    return pair


@compiled_only
@pytest.mark.parametrize(
    "routing, budget, fitted, forecasts",
    [
        ("esft-vanilla-lite/law", 0.1, False, True), ("gpt-oss-20b/gpqa", 0.25, True, False), ("flat", 0.5, False, True), ("flat, 48 layers", 0.1, False, False),
        ("flat, Mixtral's shape", 0.5, False, False),
    ],
)
def test_the_compiled_candidates_decide_exactly_as_the_python_ones(routing, budget, fitted, forecasts):
    """The last two cases are ones where the live loads overrule a shadow (the leader goes back to
    LRU after next-use's live loads belied its shadow) and where that evidence fades and next-use
    leads again (test_policies)."""
    if routing == "flat":
        trace, fit = flat_routing(8, 32, 4, 700, seed=1), None
    elif routing == "flat, 48 layers":
        trace, fit = flat_routing(48, 128, 8, 300, reuse=0.5, sequences=1, seed=4), None
    elif routing == "flat, Mixtral's shape":
        trace, fit = flat_routing(32, 8, 2, 1500, reuse=0.5, seed=4), None
    else:
        whole = load_trace(ROUTING / f"{routing}.npz")
        trace, fit = whole.select_sequences(range(3)), whole.select_sequences(range(3, 9))
    model = ReuseModel.fit(fit) if fitted else ReuseModel.generic(trace.num_layers, trace.num_experts)
    capacity = max(trace.top_k, int(budget * trace.num_layers * trace.num_experts))
    pair = _lockstep_replay(trace, capacity, model, forecasts)
    assert pair.evictions > 1000 and pair.reference.refits >= 1
    assert pair.compiled.switches == pair.reference.switches
    assert np.allclose(pair.compiled.candidates.misses, pair.reference.candidates.misses, rtol=0, atol=1e-9)
    assert np.allclose(pair.compiled.candidates.scores(), pair.reference.candidates.scores(), rtol=0, atol=1e-9)
    if routing == "flat, 48 layers":
        assert pair.reference.switches >= 2 and pair.reference.leader_name == "lru"
    if routing == "flat, Mixtral's shape":
        assert pair.reference.switches >= 3 and pair.reference.leader_name != "lru"


@compiled_only
@pytest.mark.parametrize("routing, budget", [("esft-vanilla-lite/summary", 0.25), ("gpt-oss-20b/misc", 0.5)])
def test_the_compiled_candidates_take_prompts_exactly_as_the_python_ones(routing, budget):
    """Each sequence's first half one prefill step (simulator.replay's prompts), replayed by
    both engines in lockstep: the prompts reach LRU's and next-use's rankers and shadows in both
    alike (fails when the compiled LRU ignores them: checked)."""
    trace = load_trace(ROUTING / f"{routing}.npz").select_sequences(range(2))
    model = ReuseModel.generic(trace.num_layers, trace.num_experts)
    capacity = max(trace.top_k, int(budget * trace.num_layers * trace.num_experts))
    shape = {"num_layers": trace.num_layers, "num_experts": trace.num_experts, "capacity": capacity, "top_k": trace.top_k}
    pair = _Lockstep(AdaptivePolicy(model, **shape, native=True), AdaptivePolicy(model, **shape, native=False))
    replay(trace, pair, capacity, prompts=np.diff(trace.seq_offsets) // 2)
    assert pair.evictions > 1000 and pair.reference.refits >= 1
    assert pair.compiled.switches == pair.reference.switches
    assert np.allclose(pair.compiled.candidates.misses, pair.reference.candidates.misses, rtol=0, atol=1e-9)


@compiled_only
def test_an_error_while_choosing_leaves_the_compiled_candidates_usable():
    """An exception (here an interrupt) raised by the cache's own check in the middle of a choice
    reaches the caller as it was, a key outside the model is refused, and the next choice is the
    same as if neither had happened."""
    policy = AdaptivePolicy(ReuseModel.generic(2, 8), num_layers=2, num_experts=8, capacity=4, native=True)
    for key in (0, 1, 2, 3):
        policy.on_layer_start(0, [key])
        policy.on_insert(key)
        policy.on_access(key)
    first = policy.choose_victim(lambda key: True)

    def interrupted(key):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        policy.choose_victim(interrupted)
    assert policy.choose_victim(lambda key: True) == first
    with pytest.raises(NoVictimError):
        policy.choose_victim(lambda key: False)
    for bad in (lambda: policy.on_insert(16), lambda: policy.on_access(99), lambda: policy.on_evict(-1)):
        with pytest.raises(IndexError):  # outside the 2 x 8 experts: refused, nothing written
            bad()
    assert policy.choose_victim(lambda key: True) == first


@pytest.mark.parametrize("native", [pytest.param(True, marks=compiled_only), False])
def test_only_the_next_use_candidates_take_a_reuse_model(native):
    from moe_runtime.policies.candidates import LEARNER, NEXT_USE

    model = ReuseModel.generic(2, 8)
    candidates = AdaptivePolicy(model, num_layers=2, num_experts=8, capacity=4, native=native).candidates
    for candidate in (0, 1, -1, LEARNER + 1):
        with pytest.raises(ValueError, match="only the next-use candidates"):
            candidates.use_model(candidate, model, model.select_layers([0, 1], 8))
    for candidate in (NEXT_USE, LEARNER):
        candidates.use_model(candidate, model, model.select_layers([0, 1], 8))


def test_the_default_is_compiled_wherever_the_candidates_can_be_built():
    policy = make_policy("adaptive", num_layers=4, num_experts=8, capacity=8, top_k=2)
    assert policy.native == native_candidates.available()
    assert not make_policy("adaptive", num_layers=4, num_experts=8, capacity=32, top_k=2).native  # idle: every expert fits


def _same_model(a: ReuseModel, b: ReuseModel) -> bool:
    transitions = (a.transitions is None and b.transitions is None) or np.array_equal(a.transitions, b.transitions)
    return transitions and all(np.array_equal(x, y) for x, y in [(a.bucket, b.bucket), (a.wait, b.wait), (a.forecast_edges, b.forecast_edges)])


@compiled_only
@pytest.mark.parametrize("routing", ["esft-vanilla-lite/law", "gpt-oss-20b/gpqa", "repeats"])
def test_the_compiled_fit_counts_exactly_as_numpy(routing):
    """reuse_fit.cpp's counts give numpy's model bit for bit: popularity buckets, transitions, the
    forecast edges and every cell's wait, with and without a prior and with one bucket each; on
    real routing and on rows that name an expert twice (a token uses it once), sequences of one
    token among them."""
    from moe_runtime.policies.next_use import generic_wait
    from moe_runtime.trace import Trace

    if routing == "repeats":
        ids = np.random.default_rng(3).integers(0, 5, size=(300, 3, 4)).astype(np.int16)
        trace = Trace(ids, np.zeros(ids.shape, dtype=np.float16), np.array([0, 1, 120, 121, 300]), 5, 4)
    else:
        trace = load_trace(ROUTING / f"{routing}.npz").select_sequences(range(5))
    prior = generic_wait() if routing != "repeats" else np.full((1, 65, 17, 1), 2.5)
    for options in ({}, {"prior": prior, "prior_weight": 20.0}, {"popularity_buckets": 1, "forecast_buckets": 1}):
        assert _same_model(ReuseModel.fit(trace, compiled=True, **options), ReuseModel.fit(trace, compiled=False, **options)), options


def test_refits_count_with_the_compiled_passes_where_they_can_be_built():
    """The refit schedule assumes the fit's cost, so the default asks for the engine it priced."""
    policy = make_policy("adaptive", num_layers=4, num_experts=8, capacity=8, top_k=2)
    assert policy.compiled_fit == native_candidates.available()
    from moe_runtime.policies.routing_history import COMPILED_FIT_NS_PER_CELL, NUMPY_FIT_NS_PER_CELL

    assert policy.history.fit_ns_per_cell == (COMPILED_FIT_NS_PER_CELL if policy.compiled_fit else NUMPY_FIT_NS_PER_CELL)
