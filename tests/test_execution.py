"""Where experts are computed: in place on the CPU, in a slot pool, or split per expert (hybrid).

Outputs equal the unwrapped model whichever side computes each expert, for every family; the
hybrid cost model's decision rule is checked with given constants; on a CPU device in-place
execution allocates no pool and computes from the model's own tensors.
"""

from __future__ import annotations

import pytest
import torch

import moe_runtime
from moe_runtime.execution import HybridCostModel, resolve_execution
from moe_runtime.runtime.host_slots import HostSlots
from moe_runtime.tiny_models import tiny_model

ALTERNATING = HybridCostModel(load_ms=1.0, host_ms=1.0)  # equal costs: the two engines take turns


def test_each_miss_goes_to_the_engine_that_finishes_it_first():
    decode = HybridCostModel(load_ms=0.69, host_ms=0.43, device_ms=0.01)
    # CPU 0.43 < load 0.70; load 0.70 < CPU 0.86; CPU 0.86 < load 1.39; CPU 1.29 < load 1.39
    assert decode.split([5, 6, 7, 8], {}) == ([6], [5, 7, 8])
    assert ALTERNATING.split([1, 2, 3, 4], {}) == ([2, 4], [1, 3])  # ties go to the CPU: no bytes move
    # A busy copy engine (2 ms of queued loads) sends everything to the CPU.
    assert decode.split([1, 2, 3], {}, copy_backlog_ms=2.0) == ([], [1, 2, 3])
    # A prefill: an expert with many rows costs the CPU per row, a load once.
    assert decode.split([1, 2], {1: 64, 2: 1}) == ([1], [2])
    assert HybridCostModel(load_ms=10.0, host_ms=0.5).split([1, 2, 3], {}) == ([], [1, 2, 3])
    assert HybridCostModel(load_ms=0.1, host_ms=5.0).split([1, 2, 3], {}) == ([1, 2, 3], [])


def test_auto_is_in_place_on_a_cpu_and_refuses_nonsense():
    cpu = torch.device("cpu")
    assert resolve_execution("auto", cpu, "auto") == "host"
    assert resolve_execution("auto", cpu, "triton") == "device"  # the Triton kernel reads a pool
    with pytest.raises(ValueError, match="execution must be one of auto, device, host, hybrid"):
        moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, device="cpu", execution="gpu")
    with pytest.raises(ValueError, match="execution='host' on a CPU has none: pass execution='device'"):
        resolve_execution("host", cpu, "triton")


@pytest.mark.parametrize("execution", ["device", "host", "hybrid", "hybrid-alternating"])
def test_outputs_equal_whichever_side_computes_each_expert(family, execution):
    reference = tiny_model(family)
    model = moe_runtime.wrap(tiny_model(family), budget=0.25, device="cpu", execution=execution.split("-")[0])
    runtime = moe_runtime.runtime_of(model)
    if execution == "hybrid-alternating":
        runtime.costs = ALTERNATING
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    want = reference.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12), want)
    counters = moe_runtime.stats(model)
    assert counters["execution"] == execution.split("-")[0]
    assert counters["hits"] + counters["misses"] > 0 and counters["misses"] >= counters["host_computes"]
    if execution == "hybrid-alternating":
        assert 0 < counters["host_computes"] < counters["misses"]  # both sides computed misses
        assert counters["loads"] == counters["misses"] - counters["host_computes"] + counters["admissions"]
    if execution == "hybrid":
        assert counters["hybrid_costs_ms"]["load_ms"] > 0 and counters["hybrid_costs_ms"]["host_ms"] > 0
    runtime.cache.check_invariants()
    moe_runtime.unwrap(model)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12), want)


def test_in_place_on_a_cpu_allocates_no_pool_and_reads_the_models_own_tensors():
    model = moe_runtime.wrap(tiny_model("qwen3_moe"), budget=0.25, device="cpu")
    runtime = moe_runtime.runtime_of(model)
    assert isinstance(runtime.pool, HostSlots) and not runtime.loader._threads  # nothing to copy, nothing to wait for
    with torch.no_grad():
        model(torch.tensor([[5, 9, 11, 40, 7]]))
    counters = moe_runtime.stats(model)
    assert counters["slot_pool_bytes"] == 0 and counters["bytes_loaded"] == 0 and counters["loads"] > 0
    storages = {t.untyped_storage().data_ptr() for fused in runtime.source.fused for t in fused.values()}
    held = [runtime.pool.view(slot) for slot, key in enumerate(runtime.cache.key_of) if key is not None]
    assert held and all(t.untyped_storage().data_ptr() in storages for tensors in held for t in tensors.values())
    moe_runtime.unwrap(model)


def test_in_place_from_disk_reads_each_miss_into_the_buffer_it_is_computed_from(tmp_path):
    path = tmp_path / "olmoe"
    tiny_model("olmoe").save_pretrained(path)
    ids = torch.tensor([[3, 17, 42, 8, 99, 23, 5, 61]])
    with torch.no_grad():
        want = tiny_model("olmoe")(ids).logits
        model = moe_runtime.from_pretrained(path, budget=0.25, device="cpu", host_budget=0, dtype=torch.float32)
        torch.testing.assert_close(model(ids).logits, want)
    runtime = moe_runtime.runtime_of(model)
    assert runtime.source.disk_reads == moe_runtime.stats(model)["loads"] > 0  # one read per load, no copy after it
    assert len(runtime.source) == 0  # host_budget=0: the slots own the only copies in RAM
    moe_runtime.unwrap(model)


@pytest.mark.parametrize("options", [{"execution": "device"}, {"execution": "host"}, {"execution": "hybrid"}, {"quantize": "int8", "quantize_rest": "int8"}])
def test_a_wrapped_model_runs_in_inference_mode_and_out_of_it_alike(options):
    """Tensors a runtime makes while under torch.inference_mode (time_generation's) may not be
    updated in place outside it: each engine generates in, out of, and again in that mode."""
    model = moe_runtime.wrap(tiny_model("qwen3_moe"), budget=0.25, device="cpu", **options)
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        first = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8), first)
    model(ids)  # and with autograd recording
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8), first)
    moe_runtime.runtime_of(model).cache.check_invariants()
    moe_runtime.unwrap(model)


def test_the_default_policy_is_lru_where_a_miss_moves_a_pointer(tiny_checkpoints):
    """In place with every expert in RAM nothing is saved by choosing victims well: the default
    keeps LRU's bookkeeping there, and stays adaptive where misses are read from disk, copied,
    or computed from low-bit copies."""
    in_place = moe_runtime.wrap(tiny_model("olmoe"), budget=0.25, device="cpu")
    assert moe_runtime.stats(in_place)["policy"] == "lru"
    named = moe_runtime.wrap(tiny_model("olmoe"), budget=0.25, device="cpu", policy="adaptive")
    assert moe_runtime.stats(named)["policy"] == "lru"  # the default by name is the default
    chosen = moe_runtime.wrap(tiny_model("olmoe"), budget=0.25, device="cpu", policy="next-use")
    assert moe_runtime.stats(chosen)["policy"] == "next-use"
    copied = moe_runtime.wrap(tiny_model("olmoe"), budget=0.25, device="cpu", execution="device")
    assert moe_runtime.stats(copied)["policy"] == "adaptive"
    from_disk = moe_runtime.from_pretrained(tiny_checkpoints["olmoe"], budget=0.25, device="cpu", host_budget=0)
    assert moe_runtime.stats(from_disk)["policy"] == "adaptive"
    low_bit = moe_runtime.wrap(tiny_model("olmoe"), budget=0.25, device="cpu", miss_precision="int8")  # a miss costs precision
    assert moe_runtime.stats(low_bit)["policy"] == "adaptive"
