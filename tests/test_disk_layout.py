"""Disk layout: the expert order, its read count, the store written in it, and reads by runs."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import moe_runtime
from moe_runtime.placement import load_plan, order_experts, place_disk_layout, place_tiering, routing_statistics, runs_per_read, TierCosts
from moe_runtime.placement.layout import path_weight
from moe_runtime.disk_store import ConvertedStore
from moe_runtime.host_tier import HostTier
from moe_runtime.tiny_models import tiny_model
from moe_runtime.trace import Trace, load_trace
from moe_runtime.expert_format import ExpertSpec


def _symmetric(rng, experts: int) -> np.ndarray:
    weights = rng.integers(0, 20, (experts, experts)).astype(float)
    weights = weights + weights.T
    np.fill_diagonal(weights, 0)
    return weights


def test_a_planted_chain_is_found_exactly():
    """Weight only between consecutive members of a hidden order: that order (or its reverse) is the unique best path."""
    hidden = np.random.default_rng(0).permutation(12)
    weights = np.zeros((12, 12))
    for a, b in zip(hidden[:-1], hidden[1:]):
        weights[a, b] = weights[b, a] = 5.0
    order = order_experts(weights)
    assert order.tolist() in (hidden.tolist(), hidden[::-1].tolist())


@pytest.mark.parametrize("seed", range(6))
def test_order_is_a_permutation_between_identity_and_the_enumerated_optimum(seed):
    rng = np.random.default_rng(seed)
    weights = _symmetric(rng, 7)
    best = max(path_weight(np.array(p), weights) for p in itertools.permutations(range(7)))
    order = order_experts(weights)
    assert sorted(order.tolist()) == list(range(7))
    assert path_weight(np.arange(7), weights) <= path_weight(order, weights) <= best
    assert path_weight(order, weights) >= 0.9 * best  # greedy + 2-opt lands near the optimum on small graphs


def test_runs_per_read_is_k_minus_adjacent_coactivation_share(trace_paths):
    """E[runs] = K - sum over adjacent pairs of P(both chosen): the quantity the layout maximises."""
    trace = load_trace(trace_paths["intent"]).select_sequences(range(20))
    stats = routing_statistics(trace)
    order = np.stack([np.random.default_rng(layer).permutation(trace.num_experts) for layer in range(trace.num_layers)])
    adjacent = np.mean([path_weight(order[layer], stats.coactivation[layer]) for layer in range(trace.num_layers)])
    assert runs_per_read(order, trace) == pytest.approx(trace.top_k - adjacent / trace.num_tokens)


def test_layout_fitted_on_some_sequences_cuts_reads_on_the_others(trace_paths):
    fit, held_out = load_trace(trace_paths["law"]).split(0.5)
    plan = place_disk_layout(fit, sources=["fit"])
    planned = runs_per_read(np.asarray(plan["disk_order"]), held_out)
    identity = runs_per_read(np.tile(np.arange(64), (fit.num_layers, 1)), held_out)
    assert planned < 0.8 * identity
    assert plan["runs_per_read"] < plan["id_order_runs_per_read"]
    typed = load_plan(plan)
    assert typed.kind == "disk_layout" and typed.disk_order == plan["disk_order"] and typed.to_dict() == plan


def test_tiering_plans_carry_a_disk_order(trace_paths):
    trace = load_trace(trace_paths["intent"]).select_sequences(range(10))
    plan = place_tiering(trace, gpu_slots=26 * 16, host_experts=26 * 16, costs=TierCosts(0.69, 5.8))
    order = np.asarray(plan["disk_order"])
    assert order.shape == (26, 64) and (np.sort(order, axis=1) == np.arange(64)).all()


def test_bad_disk_orders_are_refused():
    shape = {"num_layers": 2, "num_experts": 4, "top_k": 2}
    with pytest.raises(ValueError, match="'disk_order' must order all 4 experts of each of the 2 layers"):
        load_plan({"kind": "disk_layout", "disk_order": [[0, 1, 2, 2], [0, 1, 2, 3]], "shape": shape})
    with pytest.raises(ValueError, match="must list a permutation of the 4 experts"):
        ConvertedStore.write("unused", ExpertSpec({"w": (2,)}, torch.float32), 2, 4, None, order=[[0, 1, 2, 3], [3, 2, 1, 1]])


def _expert(layer: int, expert: int) -> dict[str, torch.Tensor]:
    return {"down": torch.full((3, 5), 100.0 * layer + expert), "gate_up": torch.full((4, 5), -100.0 * layer - expert)}


@pytest.fixture
def ordered_store(tmp_path):
    order = [[3, 0, 2, 1, 4], [4, 3, 2, 1, 0]]
    store = ConvertedStore.write(tmp_path / "store", ExpertSpec({"down": (3, 5), "gate_up": (4, 5)}, torch.float32), 2, 5, _expert, order=order)
    yield store, order
    store.close()


def test_store_puts_experts_in_file_order_and_reads_them_back(ordered_store):
    store, order = ordered_store
    for layer, layer_order in enumerate(order):
        entries = store.files[layer].entries
        starts = [entries[store.tensor_name(place, "down")].begin for place in range(5)]
        assert starts == sorted(starts)
        for expert in range(5):
            out = {"down": torch.empty(3, 5), "gate_up": torch.empty(4, 5)}
            store.read_into(layer, expert, out)
            assert all(torch.equal(out[name], _expert(layer, expert)[name]) for name in out)
    assert store.runs(0, [1, 2, 3, 4]) == [[3], [2, 1, 4]]  # file order 3 0 2 1 4
    assert store.runs(1, [0, 1, 3]) == [[3], [1, 0]]


def test_a_run_is_one_read_that_fills_every_expert(ordered_store):
    store, _ = ordered_store
    outs = [{"down": torch.full((3, 5), float("nan")), "gate_up": torch.full((4, 5), float("nan"))} for _ in range(3)]
    store.read_run(0, [2, 1, 4], outs)
    for expert, out in zip([2, 1, 4], outs):
        assert all(torch.equal(out[name], _expert(0, expert)[name]) for name in out)
    with pytest.raises(AssertionError, match="not back to back"):
        store.read_run(0, [3, 2], outs[:2])


def test_host_tier_reads_a_cold_run_once_and_serves_warm_experts_from_ram(ordered_store):
    store, _ = ordered_store
    tier = HostTier(store, ExpertSpec({"down": (3, 5), "gate_up": (4, 5)}, torch.float32), capacity_bytes=10**6, pin=False)
    assert tier.runs(0, [1, 2, 4]) == [[2, 1, 4]]
    with tier.borrow_run(0, [2, 1, 4]) as hosts:
        assert [h["down"][0, 0].item() for h in hosts] == [2.0, 1.0, 4.0]
    assert tier.disk_reads == 3 and len(tier) == 3
    assert tier.runs(0, [1, 3]) == [[1], [3]]  # 1 is in RAM now
    with tier.borrow_run(0, [1, 3]) as hosts:
        assert [h["gate_up"][0, 0].item() for h in hosts] == [-1.0, -3.0]
    assert tier.disk_reads == 4


def test_runtime_writes_its_store_in_the_plans_order_and_computes_the_same(tmp_path):
    reference, model = tiny_model("qwen3_moe"), tiny_model("qwen3_moe")
    from moe_runtime.adapters import adapter_for

    blocks = adapter_for(model).blocks(model)
    layers, experts = len(blocks), blocks[0].num_experts
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference(ids).logits
    trace = Trace(
        expert_ids=np.random.default_rng(0).integers(0, experts, (50, layers, blocks[0].top_k)).astype(np.int16),
        gate_weights=np.full((50, layers, blocks[0].top_k), 0.5, dtype=np.float16),
        seq_offsets=np.array([0, 50]), num_experts=experts, top_k=blocks[0].top_k,
    )
    plan = place_disk_layout(trace)
    moe_runtime.wrap(model, budget=0.5, device="cpu", host_budget=0, store_dir=tmp_path / "store", placement=plan)
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["description"]["order"] == plan["disk_order"]
    with torch.no_grad():
        got = model(ids).logits
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_place_cli_writes_a_disk_layout_plan(trace_paths, tmp_path):
    out = tmp_path / "layout.json"
    result = subprocess.run(
        [sys.executable, "-m", "moe_runtime.cli.main", "place", str(trace_paths["summary"]), "--disk-layout", "--eval", str(trace_paths["translation"]), "--out", str(out), "--json"],
        capture_output=True, text=True, check=True,
    )
    summary = json.loads(result.stdout)
    assert summary["kind"] == "disk_layout" and summary["held_out_runs_per_read"] < summary["held_out_id_order_runs_per_read"]
    assert load_plan(out).kind == "disk_layout"
