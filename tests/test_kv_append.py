"""A decode step's key and value written into room behind a DynamicCache layer (kv_append.py).

Every step's keys and values equal those of transformers' own update (a cat), across the
growth of the room, after an update elsewhere (a chunk through transformers' forward, crop,
beam reorder) and for a batch; caches and layers it does not know keep their own update;
the native attention reads the views in place and gives what it gives on contiguous copies;
a whole greedy decode through a wrapped model matches the unwrapped model's bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import moe_runtime
from moe_runtime.kernels import cpu_decode_ops
from moe_runtime.kv_append import MIN_ROOM, _rooms, append_kv
from moe_runtime.tiny_models import tiny_model

from decoding import greedy_logits  # tests/decoding.py

GENERATOR = torch.Generator().manual_seed(11)


def _states(length: int, batch: int = 1, heads: int = 2, dim: int = 8, dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.randn(batch, heads, length, dim, generator=GENERATOR).to(dtype) for _ in range(2))


def _pair(prompt: int = 5, batch: int = 1) -> tuple[DynamicCache, DynamicCache]:
    """Two caches holding the same prompt's keys and values in layer 0."""
    ours, theirs = DynamicCache(), DynamicCache()
    key, value = _states(prompt, batch)
    for cache in (ours, theirs):
        cache.update(key.clone(), value.clone(), 0)
    return ours, theirs


def _step_both(ours: DynamicCache, theirs: DynamicCache, batch: int = 1) -> None:
    key, value = _states(1, batch)
    got = append_kv(ours, 0, key, value, {})
    want = theirs.update(key, value, 0)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert ours.get_seq_length() == theirs.get_seq_length()
    assert torch.equal(ours.layers[0].keys, theirs.layers[0].keys) and torch.equal(ours.layers[0].values, theirs.layers[0].values)


@pytest.mark.parametrize("batch", [1, 3])
def test_steps_equal_transformers_update_across_the_room_growing(batch):
    ours, theirs = _pair(prompt=5, batch=batch)
    capacities = set()  # not the buffers' addresses: a freed room's memory may hold the next one
    for _ in range(2 * MIN_ROOM + 10):
        _step_both(ours, theirs, batch)
        capacities.add(_rooms[ours.layers[0]].keys.shape[-2])
    assert len(capacities) >= 3  # the first room, and grown twice
    assert not ours.layers[0].keys.is_contiguous() or batch * 2 == 1  # a view of the room, not a copy


def test_an_update_elsewhere_is_taken_over():
    ours, theirs = _pair()
    for _ in range(3):
        _step_both(ours, theirs)
    chunk = _states(4)  # a chunk through transformers' forward: its own cat onto the view
    for cache in (ours, theirs):
        cache.update(chunk[0].clone(), chunk[1].clone(), 0)
    _step_both(ours, theirs)
    for cache in (ours, theirs):
        cache.crop(-2)  # the last two positions dropped
    _step_both(ours, theirs)
    for cache in (ours, theirs):
        cache.layers[0].reorder_cache(torch.tensor([0]))
    _step_both(ours, theirs)


def test_other_caches_and_layers_keep_their_own_update():
    calls = []

    class Counting(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            calls.append(layer_idx)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    cache = Counting()
    cache.update(*_states(3), 0)
    append_kv(cache, 0, *_states(1), {})
    assert calls == [0, 0] and cache.layers[0] not in _rooms

    empty = DynamicCache()  # nothing cached yet: the cache's own update starts the layer
    key, value = _states(1)
    keys, _ = append_kv(empty, 0, key, value, {})
    assert torch.equal(keys, key) and empty.layers[0] not in _rooms

    sliding = DynamicCache(config=tiny_model("mixtral", sliding_window=4).config)
    reference = DynamicCache(config=tiny_model("mixtral", sliding_window=4).config)
    prompt = _states(3)
    for cache in (sliding, reference):
        cache.update(prompt[0].clone(), prompt[1].clone(), 0)
    for _ in range(3):
        key, value = _states(1)
        for a, b in zip(append_kv(sliding, 0, key, value, {}), reference.update(key, value, 0)):
            assert torch.equal(a, b)
    assert sliding.layers[0] not in _rooms

    mismatched = DynamicCache()  # another head dim than the cache's: the cache's own error
    mismatched.update(*_states(3), 0)
    with pytest.raises(RuntimeError):
        append_kv(mismatched, 0, *_states(1, dim=4), {})


@pytest.mark.skipif(not cpu_decode_ops.available(), reason="the native decode ops cannot be built here (no C++ compiler)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_native_attention_reads_the_views_in_place(dtype):
    cache = DynamicCache()
    cache.update(*_states(7, batch=2, heads=2, dtype=dtype), 0)
    for _ in range(3):
        keys, values = append_kv(cache, 0, *_states(1, batch=2, heads=2, dtype=dtype), {})
    assert not keys.is_contiguous()
    query = torch.randn(2, 4, 1, 8, generator=GENERATOR).to(dtype)  # GQA: two query heads per key head
    in_place = cpu_decode_ops.attend(query, keys, values, 0.3)
    assert torch.equal(in_place, cpu_decode_ops.attend(query, keys.contiguous(), values.contiguous(), 0.3))


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_a_wrapped_decode_through_the_room_equals_the_unwrapped_model(family):
    model = tiny_model(family)
    prompt = torch.randint(3, 300, (1, 6), generator=GENERATOR)  # one row: the unwrapped model's experts compute it alike
    expected = greedy_logits(model, prompt, steps=MIN_ROOM + 8)  # past the first room's end
    moe_runtime.wrap(model, budget=1.0, device="cpu")
    assert torch.equal(greedy_logits(model, prompt, steps=MIN_ROOM + 8), expected)
