"""Placement: every method against enumerated optima, capacities always hold, plans round-trip,
the runtime follows a plan, infeasible inputs are refused."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import moe_runtime
from moe_runtime.placement import TierCosts, TieringPlan, cut_fraction, load_plan, partition, place_multi_gpu, plan_tiering, save_plan, tiering_inputs
from moe_runtime.placement.partition import _balanced_labelings
from moe_runtime.tiny_models import tiny_model


def _enumerated_optimum(transitions: np.ndarray, gpus: int) -> float:
    layers, experts = transitions.shape[0] + 1, transitions.shape[1]
    states = _balanced_labelings(experts, gpus)
    return min(cut_fraction(np.stack(choice), transitions) for choice in itertools.product(states, repeat=layers))


@pytest.mark.parametrize("experts, gpus", [(4, 2), (6, 2), (6, 3), (3, 3)])
def test_every_method_reaches_the_enumerated_optimum(experts, gpus):
    rng = np.random.default_rng(experts * 10 + gpus)
    transitions = rng.random((2, experts, experts)) ** 3  # skewed, like real routing
    optimum = _enumerated_optimum(transitions, gpus)
    for method in ("exact", "ilp", "search"):
        result = partition(transitions, gpus, method, time_limit=20)
        assert result.cut_fraction == pytest.approx(optimum, abs=1e-9) if method != "search" else result.cut_fraction >= optimum - 1e-9
        counts = np.stack([np.bincount(row, minlength=gpus) for row in result.device_of])
        assert (counts == experts // gpus).all()  # balance always holds
    assert partition(transitions, gpus, "ilp", time_limit=20).solver_status == "optimal"


def test_g_equals_e_is_solved_exactly_by_chained_assignments():
    rng = np.random.default_rng(5)
    transitions = rng.random((2, 4, 4)) ** 3
    result = partition(transitions, 4, "auto")
    assert result.method == "exact"
    assert result.cut_fraction == pytest.approx(_enumerated_optimum(transitions, 4), abs=1e-9)


def test_unbalanced_gpu_counts_are_refused():
    with pytest.raises(ValueError, match="G must divide E"):
        partition(np.ones((1, 6, 6)), 4)


def test_real_traces_beat_naive_and_random_placement(trace_paths):
    from moe_runtime.trace import load_trace

    fit, held_out = load_trace(trace_paths["translation"]).split(0.5)
    plan = place_multi_gpu(fit, 4)
    from moe_runtime.placement import routing_statistics

    held = cut_fraction(np.asarray(plan["device_of"]), routing_statistics(held_out).transitions)
    assert held < plan["naive_cut_fraction"] - 0.1 and held < plan["random_cut_fraction"] - 0.1
    assert plan["seconds"] < 10


def test_tiering_respects_capacities_and_refuses_infeasible(trace_paths):
    from moe_runtime.trace import load_trace

    trace = load_trace(trace_paths["summary"]).select_sequences([0, 1])
    inputs = tiering_inputs(trace)
    shape = (trace.num_layers, trace.num_experts, trace.top_k)
    result = plan_tiering(inputs, shape, gpu_slots=200, host_experts=800, costs=TierCosts(0.69, 5.8), time_limit=10)
    tiers = np.array(result.tier_of).ravel()
    assert (tiers == "pinned").sum() <= 200 - result.dynamic_slots
    assert ((tiers == "dynamic") | (tiers == "host")).sum() <= 800
    assert (tiers == "disk").sum() >= 26 * 64 - 200 - 800
    assert result.method == "ilp" and result.status == "optimal" and result.gap is not None and result.gap <= 1e-3
    with pytest.raises(ValueError, match="fewer than top-k = 6: short by 2"):
        plan_tiering(inputs, shape, gpu_slots=4, host_experts=800, costs=TierCosts(0.69, 5.8))


def _plan_shape(model) -> dict:
    """The "shape" field of a plan for `model`."""
    from moe_runtime.adapters import adapter_for

    blocks = adapter_for(model).blocks(model)
    return {"num_layers": len(blocks), "num_experts": blocks[0].num_experts, "top_k": blocks[0].top_k}


def _tiering_plan(model, pinned: dict[int, list[int]], host=None, disk=None) -> dict:
    """A tiering plan for `model`: the experts named per layer in each tier, the rest dynamic."""
    shape = _plan_shape(model)
    named = {"pinned": pinned, "host": host or {}, "disk": disk or {}}

    def tier(layer: int, expert: int) -> str:
        return next((name for name, chosen in named.items() if expert in chosen.get(layer, [])), "dynamic")

    tier_of = [[tier(layer, e) for e in range(shape["num_experts"])] for layer in range(shape["num_layers"])]
    return {"kind": "tiering", "tier_of": tier_of, "dynamic_slots": 4, "shape": shape}


def test_plan_round_trip_and_validation(tmp_path):
    plan = _tiering_plan(tiny_model("olmoe"), {0: [1, 2]})
    path = save_plan(plan, tmp_path / "plan.json")
    loaded = load_plan(path)
    assert isinstance(loaded, TieringPlan) and loaded.to_dict() == plan
    assert loaded.keys_in("pinned") == [1, 2] and loaded.tier_counts()["pinned"] == 2 and loaded.ram_experts() is None
    with pytest.raises(ValueError, match="made for \\(L, E\\) = \\(3, 8\\)"):
        loaded.check_shape(4, 8)
    broken = dict(plan, tier_of=[["gpu"] * 8] * 3)
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="unknown tiers \\['gpu'\\]"):
        load_plan(path)
    unbalanced = {"kind": "multi_gpu", "gpus": 2, "device_of": [[0] * 8] * 3, "shape": plan["shape"]}
    with pytest.raises(ValueError, match="exactly 4 experts of every layer"):
        load_plan(unbalanced)


def test_runtime_never_evicts_pinned_experts():
    reference, model = tiny_model("mixtral"), tiny_model("mixtral")
    plan = _tiering_plan(model, {0: [0, 1], 2: [5]})
    moe_runtime.wrap(model, budget=0.25, device="cpu", placement=plan)  # 6 slots: 3 pinned + 3 dynamic
    runtime = moe_runtime.runtime_of(model)
    pinned = {0, 1, 2 * 8 + 5}
    assert runtime.cache.pinned == pinned and pinned <= set(runtime.cache.slot_of)
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(11))
    want = reference.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    slots = {key: runtime.cache.slot_of[key] for key in pinned}
    assert torch.equal(model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False), want)
    assert {key: runtime.cache.slot_of[key] for key in pinned} == slots  # never moved, never evicted
    assert moe_runtime.stats(model)["misses"] > 0


@pytest.mark.parametrize("routing, share", [("esft-vanilla-lite/law", 0.2), ("gpt-oss-20b/gpqa", 0.05)])
def test_the_plans_lru_miss_counts_are_the_simulators(routing, share):
    """The tiering program's miss rates come from a shadow cache under LRU: it must count each
    expert's misses exactly as the simulator does, pinned and transient experts included, across
    sequence boundaries and at a pool of one layer step's experts."""
    from moe_runtime.belady import layer_keys
    from moe_runtime.placement.tiering import lru_misses
    from moe_runtime.policies import make_policy
    from moe_runtime.simulator import replay
    from moe_runtime.trace import load_trace

    trace = load_trace(Path(moe_runtime.__file__).parent / "data" / "routing" / f"{routing}.npz").split(share)[0]  # a few sequences, ~800 tokens
    experts = trace.num_layers * trace.num_experts
    uses = np.bincount(layer_keys(trace.expert_ids, trace.num_experts), minlength=experts)
    by_use = np.argsort(-uses, kind="stable")
    rng = np.random.default_rng(0)
    for slots, pinned_count, transient_count in ((experts // 4, 0, 0), (experts // 4, experts // 10, experts // 20), (experts // 10, 0, experts // 4), (trace.top_k, 0, 0)):
        pinned = frozenset(by_use[:pinned_count].tolist())
        transient = frozenset(rng.choice(by_use[pinned_count:], transient_count, replace=False).tolist())
        want = np.zeros(experts)
        replay(trace, make_policy("lru"), slots, pinned=pinned, transient=transient, miss_counts=want)
        assert np.array_equal(lru_misses(trace, slots, pinned, transient), want), (slots, pinned_count, transient_count)
    with pytest.raises(ValueError, match="cannot hold one layer step's"):
        lru_misses(trace, trace.top_k - 1)


def test_tiering_plan_beats_frequency_pinning_and_lru_on_held_out_sequences(trace_paths):
    """The issue's target in small: plan on law's first half, replay its second half in the
    simulator with the same GPU slots and host RAM for all three; disk tiers cost their reads."""
    from moe_runtime.placement import baseline_tiers, compare_tiers
    from moe_runtime.simulator import TimingModel
    from moe_runtime.trace import load_trace

    fit, held = load_trace(trace_paths["law"]).split(0.5)
    timing = TimingModel()
    costs = TierCosts(timing.load_ms, 17.3e6 / 3e9 * 1e3)
    experts = fit.num_layers * fit.num_experts
    slots, ram = experts // 4, experts // 2
    plan = plan_tiering(tiering_inputs(fit), (fit.num_layers, fit.num_experts, fit.top_k), slots, ram, costs, compute_ms_per_token=26 * timing.layer_ms)
    assert (np.array(plan.tier_of) == "host").any(), "the experts LRU caches in vain are made transient"
    ms = compare_tiers(fit, held, plan.tier_of, slots, ram, costs, timing)
    assert ms["plan"] < 0.97 * min(ms["lru"], ms["pinning"]), ms
    for name in ("lru", "pinning"):
        tiers = baseline_tiers(fit, slots, ram, name)
        assert ((tiers == "dynamic") | (tiers == "host")).sum() == ram and (tiers == "pinned").sum() <= slots - fit.top_k


def test_runtime_drops_host_tier_experts_after_their_layer():
    reference = tiny_model("mixtral")
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(5))
    want = reference.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    misses = {}
    for host in ({}, {0: [1, 2], 1: [3]}):
        model = tiny_model("mixtral")
        moe_runtime.wrap(model, budget=0.5, device="cpu", placement=_tiering_plan(model, {0: [0]}, host=host))
        runtime = moe_runtime.runtime_of(model)
        assert torch.equal(model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False), want)
        runtime.cache.check_invariants()
        misses[len(runtime.cache.transient)] = moe_runtime.stats(model)["misses"]
    transient = {1, 2, 8 + 3}
    assert runtime.cache.transient == transient and not transient & set(runtime.cache.slot_of)  # never left in the pool
    assert misses[3] > misses[0]  # a host-tier expert misses on every use
    assert moe_runtime.stats(model)["placement_tiers"] == {"pinned": 1, "dynamic": 20, "host": 3, "disk": 0}


def test_runtime_holds_the_plan_ram_set_and_reads_the_disk_tier_from_disk(tmp_path):
    reference, model = tiny_model("olmoe"), tiny_model("olmoe")
    disk = {layer: [0, 1, 2] for layer in range(3)}
    plan = _tiering_plan(model, {}, disk=disk)
    moe_runtime.wrap(model, budget=0.5, device="cpu", placement=plan, store_dir=tmp_path / "store")
    source = moe_runtime.runtime_of(model).source
    ram = {(layer, e) for layer in range(3) for e in range(3, 8)}
    assert source.keep == ram and source.capacity == len(ram)  # host_budget follows the plan
    ids = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(3))
    want = reference.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False), want)
    assert set(source._entries) <= ram and len(source._entries) > 0
    disk_loads = moe_runtime.stats(model)["loads"]  # every read is one of the slot pool's loads
    assert source.disk_reads <= disk_loads and source.disk_reads > len(source._entries)  # disk tier re-read on misses


def test_a_plan_disk_tier_needs_a_store_and_its_ram_set_needs_room(tmp_path):
    plan = _tiering_plan(tiny_model("olmoe"), {}, disk={0: [0, 1], 1: [0]})
    with pytest.raises(ValueError, match="keeps 3 experts off host RAM .* pass store_dir"):
        moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, device="cpu", placement=plan)
    with pytest.raises(ValueError, match="keeps 21 experts in host RAM .* holds 12: short by"):
        moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, device="cpu", placement=plan, host_budget=0.5, store_dir=tmp_path / "s")
    model = tiny_model("olmoe")
    moe_runtime.wrap(model, budget=0.5, device="cpu", placement=plan, host_budget=1.0)  # RAM for all: nothing on disk
    assert moe_runtime.stats(model)["host_tier"] == "RamSource"


def _alternating_plan(model, gpus: int = 2) -> dict:
    """A multi-GPU plan putting expert e of layer l on device (e + l) % gpus."""
    shape = _plan_shape(model)
    device_of = [[(e + layer) % gpus for e in range(shape["num_experts"])] for layer in range(shape["num_layers"])]
    return {"kind": "multi_gpu", "gpus": gpus, "device_of": device_of, "shape": shape}


def _run_multi_device(family: str, devices: list[str]) -> None:
    reference, model = tiny_model(family), tiny_model(family)
    plan = _alternating_plan(model, len(devices))
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids).logits
        moe_runtime.wrap(model, budget=0.5, placement=plan, devices=devices)
        got = model(ids).logits.cpu()
    runtime = moe_runtime.runtime_of(model)
    for layer, part in enumerate(runtime.parts):
        original = runtime.blocks[layer].experts
        for index, expert_part in enumerate(part.parts):
            mine = [e for e, d in enumerate(plan["device_of"][layer]) if d == index]
            for name, param in expert_part.named_parameters(recurse=False):
                assert param.device == torch.device(devices[index])
                assert torch.equal(param.cpu(), getattr(original, name).data[mine])  # exactly the planned experts
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    counts = moe_runtime.stats(model)
    top_k, moe_layers = runtime.blocks[0].top_k, len(runtime.blocks)
    assert sum(counts["pairs_per_device"]) == ids.numel() * top_k * moe_layers
    assert counts["remote_pairs"] == sum(counts["pairs_per_device"][1:]) > 0
    moe_runtime.unwrap(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_a_multi_gpu_plan_runs_every_expert_where_the_plan_puts_it(family):
    """Two devices (both the CPU here): the dispatch, the split weights and the counters are
    real; only the copies between GPUs need the GPU test below."""
    _run_multi_device(family, ["cpu", "cpu"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_multi_gpu_plan_on_two_gpus():
    _run_multi_device("mixtral", ["cuda:0", "cuda:1"])


def test_multi_gpu_plans_refuse_what_they_cannot_honour(tmp_path):
    model = tiny_model("olmoe")
    plan = _alternating_plan(model)
    with pytest.raises(ValueError, match="puts experts on 2 devices; devices= names 3"):
        moe_runtime.wrap(model, budget=0.5, placement=plan, devices=["cpu"] * 3)
    with pytest.raises(ValueError, match="keeps .* of experts resident on each device but budget 0.25 .* raise budget to 0.500"):
        moe_runtime.wrap(model, budget=0.25, placement=plan, devices=["cpu", "cpu"])
    with pytest.raises(ValueError, match="predictor do not apply to it"):
        moe_runtime.wrap(model, budget=0.5, placement=plan, devices=["cpu", "cpu"], predictor="cross-layer-gate")
    assert not hasattr(model, "_moe_runtime")  # a refused wrap leaves the model as it was
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="from_pretrained offloads experts from disk; a multi-GPU plan"):
        moe_runtime.from_pretrained(tmp_path / "ckpt", budget=0.5, device="cpu", placement=plan)


def test_plans_the_machine_or_model_cannot_follow_are_refused():
    model = tiny_model("olmoe")
    multi = {"kind": "multi_gpu", "gpus": 2, "device_of": [[0, 0, 0, 0, 1, 1, 1, 1]] * 3, "shape": {"num_layers": 3, "num_experts": 8}}
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="puts experts on 2 GPUs; this machine has"):
            moe_runtime.wrap(model, budget=0.5, device="cpu", placement=multi)
    other = {"kind": "tiering", "tier_of": [["dynamic"] * 64] * 26, "dynamic_slots": 4, "shape": {"num_layers": 26, "num_experts": 64}}
    with pytest.raises(ValueError, match="made for \\(L, E\\) = \\(26, 64\\)"):
        moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, device="cpu", placement=other)
    crowded = _tiering_plan(model, {0: list(range(8)), 1: list(range(8))})
    with pytest.raises(ValueError, match="pins 16 experts but the budget holds 12: short by 6"):
        moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, device="cpu", placement=crowded)


def test_the_installed_solver_is_highs():
    """HiGHS (highspy, a dependency) is the solver the README's timings name; CBC is only a fallback."""
    from moe_runtime.placement.solver import available_solver

    assert available_solver() == "HiGHS"


def test_the_solver_prints_nothing_to_stdout(capfd):
    """HiGHS writes a banner from native code; on stdout it would corrupt `place --json`."""
    import pulp

    from moe_runtime.placement.solver import solve

    problem = pulp.LpProblem("tiny", pulp.LpMaximize)
    x = [pulp.LpVariable(f"x{i}", cat="Binary") for i in range(3)]
    problem += pulp.lpSum(x)
    problem += x[0] + x[1] <= 1
    assert solve(problem, time_limit=5).proven_optimal
    assert capfd.readouterr().out == ""


def test_an_integer_program_stopped_without_a_solution_is_refused_not_returned():
    transitions = np.random.default_rng(0).random((6, 32, 32))
    with pytest.raises(ValueError, match="no placement within the 0.001 s time limit .*time limit \\(no solution\\).*--method search"):
        partition(transitions, 4, "ilp", time_limit=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("ram_share", [1.0, 0.5])
def test_a_shipped_tiering_plan_never_loses_to_plain_caching_on_held_out_sequences(trace_paths, ram_share):
    """Chosen by cross-validation inside the fit half against all-dynamic tiers (issue 20)."""
    from moe_runtime.placement import ALL_DYNAMIC, compare_tiers, place_tiering
    from moe_runtime.simulator import TimingModel
    from moe_runtime.trace import load_trace

    fit, held = load_trace(trace_paths["law"]).split(0.5)
    timing = TimingModel()
    costs = TierCosts(timing.load_ms, 17.3e6 / 3e9 * 1e3)
    experts = fit.num_layers * fit.num_experts
    slots, ram = experts // 4, int(experts * ram_share)
    plan = place_tiering(fit, slots, ram, costs, compute_ms_per_token=26 * timing.layer_ms)
    assert set(plan["cross_validated_ms_per_token"]) == {"plan", ALL_DYNAMIC}
    assert plan["chosen"] == min(plan["cross_validated_ms_per_token"], key=plan["cross_validated_ms_per_token"].get)
    tiers = np.array(plan["tier_of"])
    if plan["chosen"] == ALL_DYNAMIC:
        assert plan["dynamic_slots"] == slots and set(np.unique(tiers)) <= {"dynamic", "disk"}
    ms = compare_tiers(fit, held, plan["tier_of"], slots, ram, costs, timing)
    assert ms["plan"] <= 1.005 * ms["lru"], ms
