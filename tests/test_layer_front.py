"""A decode layer's front half, and its experts where they lie, in one native call
(layer_front.py) against decode_layer.py's op-by-op path.

Two copies of one tiny model wrapped alike, the native front switched off in one: the same
logits bit for bit step by step and the same cache accounting (hits, misses, loads per layer)
for every llama-form family whose block is a router and routed experts, in int8, int4 (tiles,
and plain nibbles read by the portable loop) and full precision with exact=False, at a budget
that misses; where the cache decides what is computed (low-bit copies for misses) the front
runs without the experts; a replaced weight or rule builds a new front; a batch takes the
op-by-op path; a fault while the cache accounts for a step leaves the runtime usable.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DynamicCache

import moe_runtime
from moe_runtime.host_tier import RamSource
from moe_runtime.kernels import cpu_gemv
from decoding import greedy_logits  # tests/decoding.py
from test_decode_attention import PROMPT, _model

ROUTED = ["olmoe", "qwen3_moe", "mixtral"]  # a router and routed experts (Qwen2-MoE's shared expert: its block's forward)
FORMATS = {  # (options, the model's dtype)
    "int8": ({"quantize": "int8", "quantize_rest": "int8"}, torch.bfloat16),
    "int4 tiles": ({"quantize": "int4", "quantize_rest": "int4"}, torch.bfloat16),
    "int4-g32 plain": ({"quantize": "int4-g32", "quantize_rest": "int4-g32"}, torch.float32),
    "bf16": ({"exact": False}, torch.bfloat16),
}

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="the CPU decode extension is not built here")


def _pair(family: str, dtype: torch.dtype, **options) -> tuple[nn.Module, nn.Module]:
    """(op by op, native front): the same tiny model wrapped twice alike on the CPU."""
    models = []
    for native in (False, True):
        model = moe_runtime.wrap(_model(family, dtype), device="cpu", **options)
        for layer in moe_runtime.runtime_of(model).decode_layers:
            layer.native_front = native
        models.append(model)
    return models[0], models[1]


def _fronts(model) -> list:
    return [layer.front[1] if layer.front else None for layer in moe_runtime.runtime_of(model).decode_layers]


def _accounts(model) -> list[tuple[int, int, int]]:
    return [(layer["hits"], layer["misses"], layer["loads"]) for layer in moe_runtime.stats(model)["per_layer"]]


@pytest.mark.parametrize("family", ROUTED)
@pytest.mark.parametrize("fmt", FORMATS)
def test_native_layers_give_the_op_by_op_logits_and_cache_accounts(family, fmt):
    options, dtype = FORMATS[fmt]
    plain, native = _pair(family, dtype, budget=0.5, **options)
    steps = 70 if fmt == "int8" else 8  # past the KV cache room's first 64 positions: one regrowth
    assert torch.equal(greedy_logits(native, PROMPT, steps=steps), greedy_logits(plain, PROMPT, steps=steps))
    fronts = _fronts(native)
    assert all(front is not None and front.experts is not None for front in fronts), fronts
    assert _fronts(plain) == [None] * len(fronts)
    accounts = _accounts(native)
    assert accounts == _accounts(plain) and sum(misses for _, misses, _ in accounts) > 0
    layers = len(fronts)  # the prefill's layers through run_layer, then each step's in the native call
    assert moe_runtime.stats(native)["compute_calls"] == {"loop": layers, "native-layer": steps * layers}
    assert moe_runtime.stats(plain)["compute_calls"] == {"loop": (steps + 1) * layers}
    runtime = moe_runtime.runtime_of(native)
    assert [attention.steps for attention in runtime.decode_attention] == [steps] * len(fronts)
    assert [router.seen for router in runtime.kernel_routers] == [steps + 1] * len(fronts)  # the prefill's rows too
    runtime.cache.check_invariants()


def test_qwen2_moes_shared_expert_keeps_the_op_by_op_path():
    plain, native = _pair("qwen2_moe", torch.bfloat16, budget=1.0, exact=False)
    assert torch.equal(greedy_logits(native, PROMPT), greedy_logits(plain, PROMPT))
    assert _fronts(native) == [None] * 3


def test_where_the_cache_decides_what_is_computed_the_front_leaves_the_experts_to_the_runtime():
    """miss_precision: a miss is computed from its low-bit copy, so what is computed depends on
    the cache: the runtime's run_layer computes the experts after the native front."""
    plain, native = _pair("olmoe", torch.bfloat16, budget=0.5, exact=False, miss_precision="int4")
    assert torch.equal(greedy_logits(native, PROMPT, steps=8), greedy_logits(plain, PROMPT, steps=8))
    assert all(front is not None and front.experts is None for front in _fronts(native))
    assert _accounts(native) == _accounts(plain)
    assert moe_runtime.stats(native)["per_layer"][0]["host_computes"] > 0


def test_a_replaced_weight_or_rule_builds_a_new_front():
    plain, native = _pair("qwen3_moe", torch.bfloat16, budget=1.0, quantize="int8", quantize_rest="int8")
    greedy_logits(native, PROMPT, steps=2)
    first = _fronts(native)
    generator = torch.Generator().manual_seed(1)
    weight = torch.rand(64, generator=generator).to(torch.bfloat16) + 0.5
    for model in (plain, native):
        model.model.layers[1].post_attention_layernorm.weight = nn.Parameter(weight.clone(), requires_grad=False)
    assert torch.equal(greedy_logits(native, PROMPT), greedy_logits(plain, PROMPT))
    second = _fronts(native)
    assert second[0] is first[0] and second[2] is first[2] and second[1] is not first[1] and second[1] is not None
    moe_runtime.runtime_of(native).decode_layers[0].rule = None  # the family's own top k: the op-by-op path, exactly
    greedy_logits(native, PROMPT, steps=1)
    assert _fronts(native)[0] is None


def test_a_batch_takes_the_op_by_op_path():
    plain, native = _pair("mixtral", torch.bfloat16, budget=1.0, quantize="int4", quantize_rest="int4")
    ids = torch.cat([PROMPT, PROMPT.flip(1)])
    assert torch.equal(greedy_logits(native, ids), greedy_logits(plain, ids))
    assert _fronts(native) == [None] * 3


def test_a_fault_while_the_cache_accounts_for_a_step_leaves_the_runtime_usable(monkeypatch):
    """A miss's hold (the in-place "load") fails while a native step's experts are accounted
    for: the step raises, no slot stays protected, and later steps give the op-by-op copy's
    logits."""
    plain, native = _pair("olmoe", torch.bfloat16, budget=0.3, quantize="int4", quantize_rest="int4")
    runtime = moe_runtime.runtime_of(native)
    assert type(runtime.source) is RamSource
    real = RamSource.hold_run

    def failing(source, layer, experts):
        raise OSError("injected: a read failed")

    cache = DynamicCache(config=native.config)
    with torch.no_grad():
        ids = native(input_ids=PROMPT, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        monkeypatch.setattr(RamSource, "hold_run", failing)
        with pytest.raises(OSError, match="injected") as raised:
            for _ in range(20):  # at a budget of 0.3 a step misses soon
                ids = native(input_ids=ids, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    assert any(entry.name == "account_in_place" for entry in raised.traceback)
    monkeypatch.setattr(RamSource, "hold_run", real)
    runtime.drain()
    runtime.cache.check_invariants()
    assert runtime.cache.in_use == set()
    assert torch.equal(greedy_logits(native, PROMPT), greedy_logits(plain, PROMPT))
    moe_runtime.unwrap(native)
