"""Slot cache invariants with the real loader threads and real host/disk tiers."""

from __future__ import annotations

import os

import pytest
import torch

import moe_runtime
from moe_runtime.runtime.slot_cache import SlotCache
from moe_runtime.runtime.expert_loader import Loader
from moe_runtime.policies import LRUPolicy
from moe_runtime.runtime.slot_pool import SlotPool
from moe_runtime.stats import RuntimeStats
from moe_runtime.host_tier import RamSource
from moe_runtime.tiny_models import tiny_model
from moe_runtime.expert_format import ExpertSpec

E = 6


def _cache(num_slots: int, layers: int = 2):
    """A cache over real RAM experts: expert (l, e) is filled with the value 10 * l + e."""
    fused = [{"w": torch.stack([torch.full((4,), 10.0 * layer + e) for e in range(E)])} for layer in range(layers)]
    pool = SlotPool(ExpertSpec({"w": (4,)}, torch.float32), num_slots, torch.device("cpu"), fill=float("nan"))
    stats = RuntimeStats(layers)
    cache = SlotCache(num_experts=E, num_slots=num_slots, policy=LRUPolicy(), loader=Loader(RamSource(fused), pool), stats=stats)
    return cache, pool, stats


def _use(cache, layer, experts):
    slots = cache.acquire(layer, experts)
    values = [cache.loader.pool.tensors["w"][slot][0].item() for slot in slots]
    cache.release(layer, experts)
    return values


def test_hits_misses_and_lru_eviction_order():
    cache, _, stats = _cache(num_slots=3)
    assert _use(cache, 0, [0, 1]) == [0.0, 1.0]  # 2 misses
    assert _use(cache, 0, [1, 2]) == [1.0, 2.0]  # hit 1, miss 2; LRU order now 0, 1, 2
    assert _use(cache, 1, [3]) == [13.0]  # evicts (0, 0), the least recently used
    assert cache.resident(0) == [1, 2] and cache.resident(1) == [3]
    assert _use(cache, 0, [0]) == [0.0]  # evicts (0, 1)
    assert cache.resident(0) == [0, 2]
    counters = stats.total()
    assert (counters.hits, counters.misses, counters.loads) == (1, 5, 5)
    assert counters.hits + counters.misses == 6  # every use counted once
    cache.check_invariants()


def test_experts_in_use_are_never_evicted():
    cache, _, _ = _cache(num_slots=2)
    slots = cache.acquire(0, [0, 1])  # held, not released
    with pytest.raises(AssertionError, match="exceeds|no evictable"):
        cache.acquire(1, [0])
    assert cache.resident(0) == [0, 1] and cache.slot_of[0] in slots


def test_prefetch_is_counted_when_used():
    cache, _, stats = _cache(num_slots=4)
    assert cache.prefetch(1, [2, 3]) == 2
    assert cache.prefetch(1, [2]) == 0  # already resident or loading
    assert _use(cache, 1, [2, 4]) == [12.0, 14.0]
    layer = stats.layers[1]
    assert (layer.prefetches_issued, layer.prefetches_used, layer.hits, layer.misses) == (2, 1, 1, 1)
    cache.check_invariants()


def test_prefetch_never_evicts_protected_experts():
    cache, _, _ = _cache(num_slots=2)
    cache.acquire(0, [0, 1])
    assert cache.prefetch(1, [5]) == 0  # both slots in use: nothing to evict, no blocking
    cache.release(0, [0, 1])
    assert cache.prefetch(1, [5]) == 1


@pytest.mark.parametrize("execution", ["device", "host"])
def test_runtime_counts_add_up_per_layer(execution):
    model = moe_runtime.wrap(tiny_model("mixtral"), budget=0.25, device="cpu", execution=execution)
    model.generate(torch.tensor([[5, 9, 11, 40]]), max_new_tokens=10, do_sample=False)
    counters = moe_runtime.stats(model)
    assert counters["hits"] == sum(layer["hits"] for layer in counters["per_layer"])
    assert counters["loads"] == counters["misses"] + counters["prefetches_issued"]
    moved = counters["bytes_per_expert"] if execution == "device" else 0  # in place, from RAM: nothing moves
    assert counters["loads"] > 0 and counters["bytes_loaded"] == counters["loads"] * moved
    moe_runtime.reset_stats(model)
    assert moe_runtime.stats(model)["hits"] == 0
    moe_runtime.runtime_of(model).cache.check_invariants()


def test_failed_load_raises_and_leaves_the_cache_consistent(tiny_checkpoints, tmp_path):
    """Truncate the checkpoint after opening it: the next miss fails, the cache stays sound."""
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoints["olmoe"], path)
    model = moe_runtime.from_pretrained(path, budget=0.25, device="cpu", host_budget=0)
    runtime = moe_runtime.runtime_of(model)
    shard = path / "model.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)  # the expert tensors near the end are gone
    with pytest.raises(Exception, match="unexpected end of file|truncated"):
        with torch.no_grad():
            model(torch.randint(3, 300, (1, 16)))
    runtime.cache.check_invariants()
    assert not runtime.cache.in_use and not runtime.cache.tickets
