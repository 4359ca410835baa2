"""Eviction policies on hand-made access streams with known answers."""

import numpy as np
import pytest

from moe_runtime.policies import ARCPolicy, EvictionPolicy, LFUPolicy, LRUPolicy, NextUsePolicy, NoVictimError, PinnedPolicy, ReuseModel, make_policy
from moe_runtime.policies.next_use import AGE_CAP, FAR_WAIT, QUANTILE_SAMPLE, WINDOW, _quantile_edges, reuse_history, used_matrix
from moe_runtime.synthetic import flat_routing
from moe_runtime.trace import Trace, load_trace


def test_lru_evicts_least_recently_used():
    policy = LRUPolicy()
    for key in (1, 2, 3):
        policy.on_insert(key)
    policy.on_access(1)
    assert policy.order() == [2, 3, 1]
    assert policy.choose_victim(lambda k: True) == 2
    assert policy.choose_victim(lambda k: k != 2) == 3  # protected keys are skipped
    policy.on_evict(2)
    assert policy.order() == [3, 1]
    with pytest.raises(NoVictimError):
        policy.choose_victim(lambda k: False)


def test_lfu_evicts_least_frequent_with_lru_ties_and_aging():
    policy = LFUPolicy(age_every=1000)
    for key in (1, 2, 3):
        policy.on_insert(key)
    for key in (1, 1, 1, 2, 2, 3, 3):
        policy.on_access(key)
    assert policy.choose_victim(lambda k: True) == 2  # 2 and 3 tie at 2 uses; 2 was used longer ago
    assert policy.choose_victim(lambda k: k != 2) == 3
    policy.on_evict(2)
    policy.on_insert(4)  # never used: count 0
    assert policy.choose_victim(lambda k: True) == 4
    policy.on_evict(4)
    policy.on_insert(2)  # comes back with its history (2 uses)
    assert policy.count(2) == 2


def test_lfu_aging_lets_old_favourites_fade():
    policy = LFUPolicy(age_every=4)
    policy.on_insert(1)
    policy.on_insert(2)
    for _ in range(3):
        policy.on_access(1)  # tick 3 ...
    policy.on_access(2)  # tick 4: ages, counts 1.5 and 0.5
    assert policy.count(1) == 1.5 and policy.count(2) == 0.5


def test_make_policy():
    assert isinstance(make_policy("lru"), LRUPolicy) and isinstance(make_policy("lfu"), LFUPolicy)
    with pytest.raises(ValueError, match="choose one of"):
        make_policy("random")


def test_arc_keeps_reused_keys_over_one_time_keys():
    policy = ARCPolicy(capacity=3)
    for key in (1, 2):
        policy.on_insert(key)
        policy.on_access(key)  # the first use that came with the load: not a re-reference
    policy.on_access(1)  # 1 is re-referenced -> frequency list
    policy.on_insert(3)
    policy.on_access(3)
    assert policy.choose_victim(lambda k: True) == 2  # oldest in the recency list, not 1


def test_pinned_never_offers_its_pinned_experts():
    frequency = np.array([[0.9, 0.1, 0.5, 0.2]])  # expert 0 most popular, then 2
    policy = PinnedPolicy(frequency, capacity=4, top_k=1)
    assert policy.pinned == frozenset({0, 2})
    for key in (0, 1, 2, 3):
        policy.on_insert(key)
    assert policy.choose_victim(lambda k: True) == 1
    with pytest.raises(NoVictimError):
        policy.choose_victim(lambda k: k in (0, 2))


def test_next_use_prefers_evicting_what_is_needed_last():
    # 3 layers x 2 experts, uniform reuse: at layer 0, keys of layer 2 come back before layer 0's.
    policy = NextUsePolicy(3, 2, ReuseModel.uniform(3, 2, 1))
    for key in range(6):
        policy.on_insert(key)
    policy.on_layer_start(0, [0])
    steps = policy.expected_steps()
    assert steps[2] < steps[4] < steps[1]  # layer 1 next, then layer 2, then layer 0 again
    assert policy.choose_victim(lambda k: k != 0) == 1  # expert 1 of the running layer: a full cycle away
    policy.on_forecast(1, np.array([1.0, 0.0]))  # layer 1: expert 0 surely used, expert 1 surely not
    assert policy.choose_victim(lambda k: k not in (0, 1)) == 3



def _trace(ids, num_experts):
    """A one-sequence trace from [T, L, K] expert ids."""
    ids = np.asarray(ids, dtype=np.int16)
    return Trace(ids, np.ones_like(ids, dtype=np.float16), np.array([0, len(ids)]), num_experts=num_experts, top_k=ids.shape[2])


def test_reuse_model_measures_weighted_waits_per_age():
    # One layer, K = 1: expert 0 on every other token, expert 1 in between, expert 2 never.
    model = ReuseModel.fit(_trace(np.array([0, 1] * 1000)[:, None, None], num_experts=3), forecast_buckets=1)
    zero, one, never = (model.wait[model.bucket[e], ..., 0] for e in range(3))
    # Just used (age 0) with a long history: back in exactly 2 tokens.
    assert zero[0, 8] == pytest.approx(2.0, abs=0.05) and one[0, 8] == pytest.approx(2.0, abs=0.05)
    # Unused last token (age 1): back next token.
    assert zero[1, 8] == pytest.approx(1.0, abs=0.05)
    # Never used: every wait is "far".
    assert never[AGE_CAP, 0] == pytest.approx(FAR_WAIT)


def test_a_wait_beyond_near_tokens_counts_at_the_tail_weight():
    """Experts 0-5 take turns (each back after 6 tokens), 6 is never used: the waits count the
    first NEAR = 4 tokens in full and the next ones, up to FAR = 8, at a quarter."""
    model = ReuseModel.fit(_trace(np.array(list(range(6)) * 400)[:, None, None], num_experts=7), popularity_buckets=1, forecast_buckets=1)
    wait = model.wait[0, :4, 3, 0]  # ages 0-3, 3 uses in the last 16 tokens: back in 6, 5, 4, 3 tokens
    assert wait == pytest.approx([4.5, 4.25, 4.0, 3.0], abs=0.01)
    assert FAR_WAIT == 5.0 and ReuseModel.uniform(1, 7, 1).wait.max() < FAR_WAIT


def test_a_fit_leans_towards_its_prior_where_it_saw_little():
    """Cells the trace never reaches take the prior's wait (FAR_WAIT, "far", by default); cells it
    reaches often keep what it measured (the adaptive default's refits lean on the generic table)."""
    trace = _trace(np.array([0, 1] * 1000)[:, None, None], num_experts=3)
    prior = np.random.default_rng(0).uniform(1.0, FAR_WAIT, size=(1, AGE_CAP + 1, WINDOW + 1, 1))
    far, near = ReuseModel.fit(trace, forecast_buckets=1), ReuseModel.fit(trace, forecast_buckets=1, prior=prior, prior_weight=20.0)
    unseen = (slice(None), AGE_CAP - 1, WINDOW, 0)  # unused for 63 tokens yet used in each of the last 16: never
    assert np.all(far.wait[unseen] == FAR_WAIT) and np.allclose(near.wait[unseen], prior[0, AGE_CAP - 1, WINDOW, 0])
    often = (far.bucket[0], 0, 8, 0)  # expert 0 just used, 8 uses in the last 16 tokens: about 1000 times
    assert near.wait[often] == pytest.approx(2.0, abs=0.2) and far.wait[often] == pytest.approx(2.0, abs=0.05)


def test_the_default_started_from_a_fit_leans_on_the_generic_table_where_it_saw_little():
    """policy_fit and generate --learn start the default from adaptive.starting_model: a fit
    whose unseen cells take the generic table's wait, as its refits' do, not "far" as fitted
    next-use's (a session or two of routing leaves most cells unseen); no fit: the generic table."""
    from moe_runtime.policies.adaptive import REFIT_PRIOR_WEIGHT, starting_model
    from moe_runtime.policies.next_use import generic_wait

    trace = _trace(np.array([0, 1] * 300)[:, None, None], num_experts=3)
    started = starting_model(1, 3, trace)
    unseen = (slice(None), 5, 1, slice(None))  # used once, 5 tokens ago: never, where experts 0 and 1 take turns
    assert np.allclose(started.wait[unseen], generic_wait()[0, 5, 1, 0]) and generic_wait()[0, 5, 1, 0] < FAR_WAIT - 0.5
    assert np.array_equal(started.wait, ReuseModel.fit(trace, prior=generic_wait(), prior_weight=REFIT_PRIOR_WEIGHT).wait)
    assert np.all(ReuseModel.fit(trace).wait[unseen] == FAR_WAIT)
    assert np.array_equal(starting_model(1, 3).wait, ReuseModel.generic(1, 3).wait)


def test_reuse_model_learns_which_expert_follows_which():
    """Expert 0 is always followed by 1, 1 by 2, 2 by 0: the transition table and the waits of its
    forecast buckets both say so."""
    trace = _trace(np.array([0, 1, 2] * 500)[:, None, None], num_experts=4)
    model = ReuseModel.fit(trace, popularity_buckets=1, forecast_buckets=2)
    follows = model.transitions[0]
    assert follows[0, 1] > 0.95 and follows[1, 2] > 0.95 and follows[2, 0] > 0.95
    assert follows[0, 0] < 0.05 and follows[0, 2] < 0.05
    policy = NextUsePolicy(1, 4, model)
    for expert in [0, 1, 2] * 10:
        policy.on_layer_start(0, [expert])
    steps = policy.expected_steps()  # after a token that used 2: 0 comes next, then 1; 3 never
    assert steps[0] == pytest.approx(1.0, abs=0.1) and steps[1] == pytest.approx(2.0, abs=0.1)
    assert steps[3] > 4.5  # never seen: about FAR_WAIT


@pytest.mark.parametrize("seed", range(4))
def test_quantile_edges_are_numpys_quantiles_of_the_strided_sample(seed):
    """The edges come from a full sort (faster than np.quantile's partition) and must be
    np.quantile's to the bit, ties, skew and sample striding included."""
    rng = np.random.default_rng(seed)
    for size in (2, 7, 1000, 3 * QUANTILE_SAMPLE + 11):
        values = rng.random(size, dtype=np.float32) ** rng.uniform(0.5, 4)
        if seed % 2:
            values = np.round(values * 20) / 20  # many ties
        buckets = int(rng.integers(2, 12))
        sample = values[:: max(1, size // QUANTILE_SAMPLE)]
        assert np.array_equal(_quantile_edges(values, buckets), np.quantile(sample, np.linspace(0, 1, buckets + 1)[1:-1]))


def test_next_use_tracks_ages_and_recent_uses_as_the_fit_measures_them():
    """The policy's online age and window counts equal the fit's offline ones on a random stream."""
    ids = np.random.default_rng(0).choice(5, size=(60, 2, 2))  # 60 tokens, 2 layers, K = 2 of 5 (repeats allowed)
    age, recent, _ = reuse_history(used_matrix(_trace(ids, num_experts=5)))
    policy = NextUsePolicy(2, 5, ReuseModel.uniform(2, 5, 2))
    for token in range(60):
        for layer in range(2):
            policy.on_layer_start(layer, (layer * 5 + ids[token, layer]).tolist())
        assert policy.recent.tolist() == recent[token].tolist()
        assert np.minimum(token - policy.last_use, AGE_CAP).tolist() == age[token].tolist()
    assert 2 <= recent.max() <= WINDOW


def _foresight_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "foresight.py"
    spec = importlib.util.spec_from_file_location("foresight", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_next_use_told_every_next_use_makes_beladys_choices(seed):
    """With foresight past the end of the trace, next-use's due times are the exact next uses, so
    its misses equal MIN's: this checks the policy's step arithmetic (and the foresight benchmark)."""
    from moe_runtime.belady import belady_misses, layer_keys
    from moe_runtime.simulator import replay

    rng = np.random.default_rng(seed)
    ids = np.stack([[rng.choice(8, 2, replace=False) for _ in range(3)] for _ in range(80)])  # 80 tokens, 3 layers, 2 of 8
    trace = _trace(ids, num_experts=8)
    foresight = _foresight_module().ForesightPolicy(trace, ReuseModel.fit(trace), horizon=len(ids))
    misses = replay(trace, foresight, 9).misses
    assert misses == belady_misses(layer_keys(trace.expert_ids, 8), 2, 9)
    assert misses < replay(trace, make_policy("lru"), 9).misses


def test_next_use_evicts_the_longer_idle_of_two_far_experts():
    """Both idle past the age cap, so the same cell ("far"); the one of the layer just run was
    evicted first (its due counted from that visit) whatever its idleness. Each IDLE_PER_WAIT
    tokens idle beyond the cap add a token to the wait: the expert idle for 200 tokens goes before the
    one idle for 70, as LRU would choose."""
    policy = NextUsePolicy(2, 4, ReuseModel.uniform(2, 4, 1))
    for token in range(201):
        policy.on_layer_start(0, [0] if token == 0 else [1])
        policy.on_layer_start(1, [4] if token == 130 else [5])
    for key in (0, 4):
        policy.on_insert(key)
    assert policy.choose_victim(lambda key: True) == 0


def test_generic_reuse_model_from_the_shipped_routing():
    """Without fit traces next-use takes the shipped ESFT table: an expert every recent token used
    is expected back sooner than one used once lately, and that one sooner than one never used."""
    model = make_policy("next-use", num_layers=3, num_experts=4, capacity=6).model
    assert model.wait.shape == (1, AGE_CAP + 1, WINDOW + 1, 1) and model.bucket.tolist() == [0] * 12
    wait = model.wait[0, ..., 0]
    assert 1.0 <= wait[0, WINDOW] < wait[1, 1] < wait[AGE_CAP, 0] <= FAR_WAIT


@pytest.mark.parametrize("compiled", [False, True])
def test_the_age_table_pools_a_fits_counts(compiled):
    """The refit's second model: fit's counts with popularity and transitions pooled, the very
    table a fit with one bucket of each gives (to the bit), beside fit's own model unchanged."""
    from moe_runtime.policies import native_candidates
    from moe_runtime.policies.next_use import generic_wait

    if compiled and not native_candidates.available():
        pytest.skip("the compiled counts cannot be built here")
    trace = flat_routing(6, 16, 2, 300, reuse=0.4, skew=0.7, seed=3)
    fitting = {"prior": generic_wait(), "prior_weight": 20.0, "compiled": compiled}
    model, age_table = ReuseModel.fit_with_age_table(trace, **fitting)
    pooled = ReuseModel.fit(trace, popularity_buckets=1, forecast_buckets=1, **fitting)
    assert np.array_equal(model.wait, ReuseModel.fit(trace, **fitting).wait) and model.transitions is not None
    assert np.array_equal(age_table.wait, pooled.wait) and age_table.transitions is None and not age_table.bucket.any()


def test_next_use_refuses_a_reuse_model_of_another_shape():
    with pytest.raises(ValueError, match="the reuse model describes 6 experts, not 2 layers x 4"):
        NextUsePolicy(2, 4, ReuseModel.uniform(2, 3, 1))


def _loads(name: str, trace, capacity: int, fit=None) -> int:
    from moe_runtime.simulator import replay

    policy = make_policy(name, num_layers=trace.num_layers, num_experts=trace.num_experts, capacity=capacity, top_k=trace.top_k, fit=fit)
    return replay(trace, policy, capacity).loads


def test_the_adaptive_default_never_loses_to_lru_where_the_generic_table_does():
    """Flat popularity, E = 8, K = 2, 32 layers (the routing where next-use's shipped table loses)."""
    trace = flat_routing(32, 8, 2, 600, reuse=0.3, sequences=1)
    capacity = 64  # 25% of the experts
    lru, generic, adaptive = (_loads(name, trace, capacity) for name in ("lru", "next-use", "adaptive"))
    assert generic > 1.05 * lru  # the case that hurts
    assert adaptive <= lru


def test_the_adaptive_default_trusts_a_shadow_only_as_far_as_the_live_cache_bears_it_out():
    """Qwen3-30B-A3B's shape (48 layers, 128 experts, top-8), flat popularity, half of a layer's
    experts kept from token to token, 10% of the experts: next-use's shadow, which replays 4 of the
    48 layers, misses about as often as LRU's, but next-use running the whole cache loads 13% more
    than LRU. Calibrated by the live loads while it led, the default goes back to LRU (it
    followed next-use to 1.13x LRU's loads before)."""
    trace = flat_routing(48, 128, 8, 500, reuse=0.5, sequences=1, seed=4)
    capacity = 614  # 10% of the experts
    lru, generic, adaptive = (_loads(name, trace, capacity) for name in ("lru", "next-use", "adaptive"))
    assert generic > 1.08 * lru  # the case that hurts
    assert adaptive <= 1.01 * lru


def test_the_adaptive_default_retests_a_shadow_the_live_cache_once_belied():
    """Mixtral-8x7B's shape (32 layers, 8 experts, top-2), flat popularity, half of a layer's
    experts kept, 50% of the experts: in the first tokens the generic next-use leads, the live
    cache loads 10% more than its shadow missed, and the default goes back to LRU. The refitted
    next-use that comes later shares that ratio though its shadow misses 5% less than LRU's
    (next-use fitted on such routing makes 0.94x LRU's loads over the whole cache); with the
    evidence fading while LRU leads, the default tries it again and keeps it (0.999x LRU's loads
    when the ratio was kept for ever)."""
    trace = flat_routing(32, 8, 2, 1500, reuse=0.5, seed=4)
    lru, adaptive = (_loads(name, trace, 128) for name in ("lru", "adaptive"))
    assert adaptive <= 0.96 * lru


def test_the_adaptive_default_keeps_its_lead_where_popularity_changes_with_each_request():
    """Qwen1.5-MoE's shape, Zipf 0.7 popularity redrawn for each of 4 sequences (requests on
    different topics), 0.3 of a layer's experts kept, 10% of the experts: a model refitted on the
    last 2048 tokens spans requests whose favourites differ; the default still makes 0.91x LRU's
    loads (python benchmarks/adaptive_shapes.py: at most 1.000x over 45 such cases)."""
    trace = flat_routing(24, 60, 4, 600, reuse=0.3, skew=0.7, drift=1.0, sequences=4, seed=2)
    lru, adaptive = (_loads(name, trace, 144) for name in ("lru", "adaptive"))
    assert adaptive <= 0.95 * lru


def test_the_adaptive_default_sets_popularity_aside_where_favourites_move_with_each_request():
    """DeepSeek-V2-Lite's shape, Zipf 1.5 popularity redrawn for each of 12 requests of 125
    tokens, 0.3 of a layer's experts kept, 50% of the experts: the popularity the learner refits
    on one request misleads it in the next (1.0008x LRU's loads when it kept it:
    adaptive_shapes.py --requests 12 --skew 1.5). Its persistence test sets it aside, and the
    learner takes the age table; where the favourites stay, it keeps them."""
    from moe_runtime.policies import AdaptivePolicy
    from moe_runtime.policies.candidates import LEARNER
    from moe_runtime.simulator import replay

    shape = {"num_layers": 26, "num_experts": 64, "capacity": 832, "top_k": 6}
    for drift, persists in ((1.0, False), (0.0, True)):
        trace = flat_routing(26, 64, 6, 1500, reuse=0.3, skew=1.5, drift=drift, sequences=12, seed=40)
        policy = AdaptivePolicy(ReuseModel.generic(26, 64), **shape, native=False)  # the Python engine: its rankers can be read
        adaptive = replay(trace, policy, 832).loads
        assert policy.persistence.persists == persists and policy.candidates.rankers[LEARNER].model.bucket.any() == persists
        if drift:
            assert adaptive <= replay(trace, make_policy("lru", **shape), 832).loads


def test_the_adaptive_default_refits_the_generic_tables_ages():
    """Qwen1.5-MoE's shape (24 layers, 60 experts, top-4), popularity skewed (Zipf 0.7), 0.3 of a
    layer's experts kept, 10% of the experts: the shipped ESFT table misjudges how age and
    recent uses predict reuse here; with that next-use candidate's table refitted on the routing
    served (its age x recent-uses cells, from the learner's counts) the default makes 0.90x
    LRU's loads (with the table kept as shipped: 0.96x)."""
    trace = flat_routing(24, 60, 4, 600, reuse=0.3, skew=0.7, seed=2)
    lru, adaptive = (_loads(name, trace, 144) for name in ("lru", "adaptive"))
    assert adaptive <= 0.93 * lru


def test_a_fitted_start_is_not_refitted_away():
    """Started from the user's traces (policy_fit), the default's next-use keeps that model
    through the learner's refits; started from the generic table, it takes the refitted ages."""
    from moe_runtime.policies import AdaptivePolicy
    from moe_runtime.policies.candidates import NEXT_USE
    from moe_runtime.simulator import replay

    trace = flat_routing(6, 16, 2, 400, reuse=0.4, seed=5)
    shape = {"num_layers": 6, "num_experts": 16, "capacity": 24, "top_k": 2}
    for model, kept in ((ReuseModel.fit(flat_routing(6, 16, 2, 400, reuse=0.4, seed=6)), True), (ReuseModel.generic(6, 16), False)):
        policy = AdaptivePolicy(model, **shape, native=False)
        replay(trace, policy, 24)
        assert policy.refits >= 1 and (policy.candidates.rankers[NEXT_USE].model is model) == kept


def test_the_adaptive_default_keeps_next_uses_gain_on_real_routing(trace_paths):
    held_out = load_trace(trace_paths["translation"]).split(0.5)[1]
    lru, adaptive = (_loads(name, held_out, 416) for name in ("lru", "adaptive"))
    assert adaptive <= 0.92 * lru


def test_bench_default_is_what_wrap_uses(trace_paths):
    from moe_runtime.bench import BenchSettings, run_bench
    from moe_runtime.policies import DEFAULT_POLICY

    trace = load_trace(trace_paths["intent"]).select_sequences(range(8))
    report = run_bench({"intent": trace}, BenchSettings(budgets=(0.25,), policies=("default",)))
    held_out = trace.split(0.5)[1]
    capacity = report["results"][0]["capacity"]
    assert DEFAULT_POLICY == "adaptive"
    assert report["results"][0]["loads_per_token"] * held_out.num_tokens == _loads(DEFAULT_POLICY, held_out, capacity)


def test_the_adaptive_default_on_gpt_oss_routing():
    """The second shipped model (24 layers, 32 experts, top-4): held-out half, 25% of the experts."""
    from pathlib import Path

    path = Path(__file__).parents[1] / "moe_runtime" / "data" / "routing" / "gpt-oss-20b" / "gpqa.npz"
    held_out = load_trace(path).split(0.5)[1].select_sequences(range(8))
    lru, adaptive = (_loads(name, held_out, 192) for name in ("lru", "adaptive"))
    assert adaptive <= 0.9 * lru


def test_the_default_started_from_a_fit_that_misleads_stays_well_below_lru():
    """GPT-OSS misc: next-use fitted on the first half of the sequences makes more loads than LRU
    on the second half at 50% of the experts; the default started from the same fit
    (wrap(policy_fit=...)) follows another candidate there."""
    from pathlib import Path

    fit, held_out = load_trace(Path(__file__).parents[1] / "moe_runtime" / "data" / "routing" / "gpt-oss-20b" / "misc.npz").split(0.5)
    capacity = held_out.num_layers * held_out.num_experts // 2
    lru = _loads("lru", held_out, capacity)
    assert _loads("next-use", held_out, capacity, fit) > 1.05 * lru  # the fit misleads (1.09x)
    assert _loads("adaptive", held_out, capacity, fit) <= 0.8 * lru  # 0.76x


def test_a_fit_of_another_models_shape_is_refused():
    fit = flat_routing(4, 8, 2, 50, sequences=1)
    with pytest.raises(ValueError, match="recorded on 4 MoE layers x 8 experts but the model has 3 x 8; record a trace of this model"):
        make_policy("adaptive", num_layers=3, num_experts=8, capacity=6, top_k=2, fit=fit)


def test_the_adaptive_shadows_sample_fewer_layers_when_tokens_use_more_experts():
    """Set dueling keeps the shadows' work per token near SAMPLED_USES expert uses: all of 8
    layers at top-2, half of them at top-8 (E = 128 routing cost 86-100 us a step with all)."""
    from moe_runtime.policies.adaptive import SAMPLED_USES

    few = make_policy("adaptive", num_layers=8, num_experts=128, capacity=256, top_k=2)
    many = make_policy("adaptive", num_layers=8, num_experts=128, capacity=256, top_k=8)
    assert len(few.sampled) == 8 and len(many.sampled) * 8 <= SAMPLED_USES
    assert many.shadow_slots == round(256 * len(many.sampled) / 8)  # capacity scaled


class _Twins(EvictionPolicy):
    """Every event to an awake policy and to a twin that sleeps on a random half of the layer
    steps; at each eviction the twin is woken and must name the awake one's victim."""

    name = "twins"

    def __init__(self, awake: EvictionPolicy, twin: EvictionPolicy, seed: int):
        self.awake, self.twin, self.random = awake, twin, np.random.default_rng(seed)
        self.tracks_accesses = awake.tracks_accesses
        self.wakings = 0

    def on_layer_start(self, layer, keys):
        self.awake.on_layer_start(layer, keys)
        self.twin.on_layer_start(layer, keys)
        self.twin.set_dormant(bool(self.random.random() < 0.5))

    def on_insert(self, key):
        self.awake.on_insert(key)
        self.twin.on_insert(key)

    def on_access(self, key):
        self.awake.on_access(key)
        self.twin.on_access(key)

    def on_evict(self, key):
        self.awake.on_evict(key)
        self.twin.on_evict(key)

    def choose_victim(self, is_evictable):
        self.twin.set_dormant(False)
        self.wakings += 1
        victim = self.awake.choose_victim(is_evictable)
        assert self.twin.choose_victim(is_evictable) == victim
        return victim


@pytest.mark.parametrize("name, fitted", [("lfu", False), ("next-use", False), ("next-use", True)])  # fitted: transitions too
def test_a_dormant_policy_woken_names_the_victims_it_would_have_named_awake(name, fitted, trace_paths):
    """The adaptive default keeps its candidates that do not lead dormant (no heap, no expected
    next uses): woken at any step, one must choose exactly as if it had never slept."""
    from moe_runtime.policies.shadow_cache import ShadowCache

    trace = load_trace(trace_paths["law"]).select_sequences(range(6))
    options = {"num_layers": trace.num_layers, "num_experts": trace.num_experts, "capacity": 200, "top_k": trace.top_k}
    fit = load_trace(trace_paths["law"]).select_sequences(range(6, 17)) if fitted else None
    twins = _Twins(make_policy(name, **options, fit=fit), make_policy(name, **options, fit=fit), seed=3)
    cache = ShadowCache(twins, num_experts=trace.num_experts, capacity=200)
    for token in range(trace.num_tokens):
        for layer in range(trace.num_layers):
            cache.step(layer, [int(e) for e in trace.expert_ids[token, layer]])
    assert twins.wakings > 500


@pytest.mark.parametrize("name", ["lru", "lfu", "next-use"])
def test_a_shadow_cache_misses_exactly_where_the_cache_core_does(name, trace_paths):
    """The adaptive default's shadows are a set and a loop, not the full cache core; with nothing
    prefetched or pinned they must make the core's misses step by step (waves included)."""
    from moe_runtime.policies.shadow_cache import ShadowCache
    from moe_runtime.runtime.cache_core import CacheCore
    from moe_runtime.stats import RuntimeStats

    trace = load_trace(trace_paths["law"]).select_sequences(range(4))
    options = {"num_layers": trace.num_layers, "num_experts": trace.num_experts, "capacity": 5, "top_k": trace.top_k}
    shadow = ShadowCache(make_policy(name, **options), num_experts=trace.num_experts, capacity=5)
    core = CacheCore(num_experts=trace.num_experts, num_slots=5, policy=make_policy(name, **options), stats=RuntimeStats(trace.num_layers))
    for token in range(trace.num_tokens):
        for layer in range(trace.num_layers):
            experts = [int(e) for e in trace.expert_ids[token, layer]]
            before = core.stats.layers[layer].misses
            core.start_layer(layer, experts)
            for begin in range(0, len(experts), 5):  # top-6 in 5 slots: two waves
                core.acquire(layer, experts[begin : begin + 5])
                core.release(layer, experts[begin : begin + 5])
            assert shadow.step(layer, experts) == core.stats.layers[layer].misses - before


def test_the_routing_history_keeps_the_latest_decode_tokens_in_order():
    from moe_runtime.policies.routing_history import FIRST_REFIT_TOKENS, HISTORY_TOKENS, RoutingHistory

    history = RoutingHistory(num_layers=2, num_experts=4, top_k=2)
    history.record(0, [0, 1, 2])  # a prefill step: three experts at top-2, not one token's routing
    history.record(1, [4, 5])
    for token in range(FIRST_REFIT_TOKENS):
        assert not history.refit_due
        history.record(0, [token % 4, (token + 1) % 4])
        history.record(1, [4 + token % 4, 4 + (token + 2) % 4])
    history.record(0, [0, 1])  # a token opens: the first FIRST_REFIT_TOKENS are kept
    assert history.refit_due  # the first refit
    history.as_trace()
    assert not history.refit_due
    history.record(1, [4, 6])  # token 256's second layer
    overflow = 256
    for token in range(FIRST_REFIT_TOKENS + 1, HISTORY_TOKENS + overflow):
        history.record(0, [token % 4, (token + 1) % 4])
        history.record(1, [4 + token % 4, 4 + (token + 2) % 4])
    history.record(0, [0, 1])  # opens a token: the last full one is kept
    assert history.refit_due
    trace = history.as_trace()
    assert not history.refit_due and trace.num_tokens == HISTORY_TOKENS
    first = overflow  # the oldest kept token (the prefill one was never kept)
    assert trace.expert_ids[0].tolist() == [[first % 4, (first + 1) % 4], [first % 4, (first + 2) % 4]]
    last = HISTORY_TOKENS + overflow - 1
    assert trace.expert_ids[-1].tolist() == [[last % 4, (last + 1) % 4], [last % 4, (last + 2) % 4]]


def test_a_prompts_tokens_join_the_history_in_order_and_a_prefill_cut_short_is_dropped():
    from moe_runtime.policies.routing_history import FIRST_REFIT_TOKENS, RoutingHistory

    history = RoutingHistory(num_layers=2, num_experts=8, top_k=2)
    rng = np.random.default_rng(0)

    def prefill(routing: np.ndarray, layers: int = 2) -> None:  # [B, T, L, K] as the runtime tells it
        for layer in range(layers):
            history.record(layer, sorted({int(e) + 8 * layer for e in routing[..., layer, :].ravel()}))  # the step's union
            history.record_prompt(layer, routing[:, :, layer])

    decoded = rng.integers(0, 8, (3, 2, 2))
    for token in decoded:
        history.record(0, token[0].tolist())
        history.record(1, (token[1] + 8).tolist())
    cut = rng.integers(0, 8, (1, 50, 2, 2))
    prefill(cut, layers=1)  # a fault after its first layer: never kept
    prompt = rng.integers(0, 8, (2, FIRST_REFIT_TOKENS // 2, 2, 2))  # a batch of two prompts
    prefill(prompt)
    assert history.refit_due  # before the first decode token
    same = np.tile(np.array([3, 5]), (1, 2, 2, 1))  # two tokens that chose the same two experts: a union of K
    prefill(same)
    history.record(0, [1, 2])  # the first decode token opens: nothing of the prefill is taken for one
    trace = history.as_trace()
    expected = np.concatenate([decoded, prompt.reshape(-1, 2, 2), same.reshape(-1, 2, 2)])
    assert np.array_equal(trace.expert_ids, expected)

    long = rng.integers(0, 8, (1, history.capacity + 10, 2, 2))
    prefill(long)  # longer than the ring: its newest tokens
    assert np.array_equal(history.as_trace().expert_ids, long[0, 10:])


def test_prefills_of_two_threads_interleaved_layer_by_layer_are_kept_apart():
    from concurrent.futures import ThreadPoolExecutor

    from moe_runtime.policies.routing_history import RoutingHistory

    history = RoutingHistory(num_layers=2, num_experts=8, top_k=2)
    rng = np.random.default_rng(1)
    mine, theirs, odd = rng.integers(0, 8, (1, 5, 2, 2)), rng.integers(0, 8, (1, 3, 2, 2)), rng.integers(0, 8, (1, 4, 2, 2))
    with ThreadPoolExecutor(max_workers=1) as other:  # one thread of its own throughout
        other.submit(history.record_prompt, 0, theirs[:, :, 0]).result()
        history.record_prompt(0, mine[:, :, 0])
        history.record_prompt(1, mine[:, :, 1])  # mine completes first
        other.submit(history.record_prompt, 1, theirs[:, :, 1]).result()
        other.submit(history.record_prompt, 0, odd[:, :, 0]).result()
        other.submit(history.record_prompt, 1, odd[:, :3, 1]).result()  # a layer of another shape: dropped
    assert np.array_equal(history.as_trace().expert_ids, np.concatenate([mine[0], theirs[0]]))
    assert history.prompts == {}


@pytest.mark.parametrize("fitted", [False, True], ids=["generic", "fitted"])
def test_next_use_after_a_prefill_expects_what_decoding_the_prompt_would_have_led_it_to(fitted, trace_paths):
    """Two next-use policies: one decodes a prompt token by token, the other takes it as one
    prefill step (the union, then on_prompt at each layer). Every expert the prompt used is then
    expected as many layer steps ahead by both (the same ages, recent uses and transitions);
    one it did not use has idled through the prompt."""
    trace = load_trace(trace_paths["law"])
    prompt = trace.expert_ids[:40].astype(np.int64)  # [T, L, K]
    layers, experts = trace.num_layers, trace.num_experts
    model = ReuseModel.fit(trace.select_sequences(range(4, 8))) if fitted else ReuseModel.generic(layers, experts)
    decoded, prefilled = NextUsePolicy(layers, experts, model), NextUsePolicy(layers, experts, model)
    for token in prompt:
        for layer in range(layers):
            decoded.on_layer_start(layer, (token[layer] + layer * experts).tolist())
    for layer in range(layers):
        union = list(dict.fromkeys((prompt[:, layer] + layer * experts).ravel().tolist()))
        prefilled.on_layer_start(layer, union)
        prefilled.on_prompt(layer, prompt[None, :, layer])
    used = np.zeros((layers, experts), dtype=bool)
    used[np.arange(layers)[None, :, None], prompt] = True
    used = used.ravel()
    assert np.allclose(decoded.expected_steps()[used], prefilled.expected_steps()[used], rtol=0, atol=1e-9)  # steps apart: rounding
    assert np.array_equal(decoded.recent, prefilled.recent)
    assert (prefilled.token - prefilled.last_use[~used] >= max(AGE_CAP, len(prompt))).all()


def test_lru_after_a_prefill_orders_the_prompts_experts_as_decoding_it_would(trace_paths):
    """One LRU decodes a prompt token by token, others take it as one prefill step per layer (the
    union, then on_prompt; told before the union loads, as the cache does, or after, as a shadow
    is); both with a decode token before and after. Each resident key's last use (token, layer
    step) then runs in the same order in all of them; ordered as the union was loaded, the last
    layers' experts would all look newer than the first layers' last tokens'."""
    trace = load_trace(trace_paths["law"])
    experts, layers = trace.num_experts, trace.num_layers
    before, prompt, after = (trace.expert_ids[a:b].astype(np.int64) for a, b in ((0, 1), (1, 41), (41, 42)))  # [T, L, K]

    def decode(policy: LRUPolicy, tokens: np.ndarray) -> None:
        for token in tokens:
            for layer in range(layers):
                keys = list(dict.fromkeys((token[layer] + layer * experts).tolist()))
                policy.on_layer_start(layer, keys)
                for key in keys:
                    policy.on_access(key) if key in policy.order() else policy.on_insert(key)

    def prefill(policy: LRUPolicy, told_first: bool) -> None:
        for layer in range(layers):
            union = list(dict.fromkeys((prompt[:, layer] + layer * experts).ravel().tolist()))
            policy.on_layer_start(layer, union)
            if told_first:
                policy.on_prompt(layer, prompt[None, :, layer])
            for key in union:
                policy.on_access(key) if key in policy.order() else policy.on_insert(key)
            if not told_first:
                policy.on_prompt(layer, prompt[None, :, layer])

    decoded, loaded_after, shadowed, untold = LRUPolicy(experts), LRUPolicy(experts), LRUPolicy(experts), LRUPolicy(experts)
    decode(decoded, np.concatenate([before, prompt, after]))
    for policy, told_first in ((loaded_after, True), (shadowed, False)):
        decode(policy, before)
        prefill(policy, told_first)
        decode(policy, after)
    decode(untold, before)
    for layer in range(layers):  # the prefill as the cache sees it, the prompt not told
        union = list(dict.fromkeys((prompt[:, layer] + layer * experts).ravel().tolist()))
        untold.on_layer_start(layer, union)
        for key in union:
            untold.on_access(key) if key in untold.order() else untold.on_insert(key)
    decode(untold, after)

    tokens = np.concatenate([before, prompt, after])
    last_use = {}
    for number, token in enumerate(tokens):
        for layer in range(layers):
            for expert in token[layer].tolist():
                last_use[layer * experts + expert] = (number, layer)
    expected = [last_use[key] for key in decoded.order()]
    assert expected == sorted(expected)
    for policy in (loaded_after, shadowed):
        assert sorted(policy.order()) == sorted(decoded.order())
        assert [last_use[key] for key in policy.order()] == expected
    assert [last_use[key] for key in untold.order()] != expected


def test_an_lru_given_without_its_shape_takes_the_models():
    policy = make_policy(LRUPolicy(), num_layers=3, num_experts=8)
    assert policy.num_experts == 8
    assert make_policy("lru", num_layers=3, num_experts=8).num_experts == 8


def test_refits_come_every_few_tokens_unless_their_cost_spaces_them():
    """After the first refit, one every REFIT_EVERY_TOKENS tokens where a refit is cheap for the
    layer steps between; elsewhere no more often than REFIT_US_PER_STEP per layer step pays for,
    at the cost the fit engine was priced at (numpy's fits are spaced further than compiled ones)."""
    import math

    from moe_runtime.policies.routing_history import (
        COMPILED_FIT_NS_PER_CELL, FIT_FIXED_US, NUMPY_FIT_NS_PER_CELL, REFIT_EVERY_TOKENS, REFIT_US_PER_STEP, RoutingHistory,
    )

    def tokens_between_refits(history: RoutingHistory) -> int:
        """Tokens from a refit at a full history to the next one that is due."""
        def token(number: int) -> None:
            for layer in range(history.num_layers):
                history.record(layer, [layer * history.num_experts + (number + k) % history.num_experts for k in range(history.top_k)])

        for number in range(history.capacity + 1):
            token(number)
        history.as_trace()
        count = 0
        while not history.refit_due:
            token(count)
            count += 1
        return count

    for layers, experts, top_k, ns in ((80, 2, 1, COMPILED_FIT_NS_PER_CELL), (26, 64, 6, COMPILED_FIT_NS_PER_CELL), (26, 64, 6, NUMPY_FIT_NS_PER_CELL)):
        history = RoutingHistory(layers, experts, top_k, fit_ns_per_cell=ns)
        fit_us = FIT_FIXED_US + history.capacity * layers * experts * ns / 1e3
        assert tokens_between_refits(history) == max(REFIT_EVERY_TOKENS, math.ceil(fit_us / (REFIT_US_PER_STEP * layers)))
    assert RoutingHistory(80, 2, 1).capacity * 80 * 2 * COMPILED_FIT_NS_PER_CELL / 1e3 + FIT_FIXED_US < REFIT_EVERY_TOKENS * REFIT_US_PER_STEP * 80  # the first case is the cheap one


def test_the_routing_history_of_a_large_model_is_bounded_by_cells():
    """A refit's memory and time grow with tokens x experts: DeepSeek-V3's 58 x 256 experts keep
    fewer tokens than DeepSeek-V2-Lite's 26 x 64, and never fewer than a first refit needs."""
    from moe_runtime.policies.routing_history import FIRST_REFIT_TOKENS, HISTORY_KEYS, HISTORY_TOKENS, RoutingHistory

    assert RoutingHistory(26, 64, 6).capacity == HISTORY_TOKENS  # the shipped models are not cut
    assert RoutingHistory(24, 32, 4).capacity == HISTORY_TOKENS
    large = RoutingHistory(58, 256, 8)
    assert large.capacity == max(FIRST_REFIT_TOKENS, HISTORY_KEYS // (58 * 256)) < HISTORY_TOKENS


def test_the_default_learns_the_routing_it_serves(trace_paths):
    """With no fit traces, the default refits next-use's reuse model on the routing it has seen
    and makes fewer loads than the same default with the generic table only (ESFT intent, 25%)."""
    from moe_runtime.policies import AdaptivePolicy
    from moe_runtime.simulator import replay

    trace = load_trace(trace_paths["intent"]).split(0.5)[1]
    loads = {}
    for learn in (False, True):
        policy = make_policy("adaptive", num_layers=trace.num_layers, num_experts=trace.num_experts, capacity=416, top_k=trace.top_k)
        if not learn:
            policy.history = None
        loads[learn] = replay(trace, policy, 416).loads
    assert isinstance(policy, AdaptivePolicy) and policy.refits >= 2 and policy.refit_seconds > 0  # what they cost, for the overhead's account
    assert loads[True] < 0.97 * loads[False]
