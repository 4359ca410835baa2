"""Routing replay: every family's routers return the trace's experts and weights, token by token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_runtime
from moe_runtime import replay_routing
from moe_runtime.adapters import adapter_for
from moe_runtime.hf_cache import cache_keyword, returned_cache
from moe_runtime.runtime.executor import RUNTIME_ATTR
from moe_runtime.tiny_models import tiny_model
from moe_runtime.trace import Trace


def random_trace(layers: int, experts: int, top_k: int, tokens: int, seed: int = 0) -> Trace:
    """Distinct experts per (token, layer), weights that sum to 1 (a real router's shape)."""
    rng = np.random.default_rng(seed)
    ids = np.stack([[rng.choice(experts, top_k, replace=False) for _ in range(layers)] for _ in range(tokens)]).astype(np.int16)
    weights = rng.dirichlet(np.ones(top_k), size=(tokens, layers)).astype(np.float16)
    return Trace(ids, weights, np.array([0, tokens]), experts, top_k)


def trace_for(model, tokens: int) -> Trace:
    blocks = adapter_for(model.config).blocks(model)
    return random_trace(len(blocks), blocks[0].num_experts, blocks[0].top_k, tokens)


def test_each_layer_receives_the_traced_experts_token_by_token(family):
    model = tiny_model(family)
    trace = trace_for(model, tokens=9)
    blocks = adapter_for(model.config).blocks(model)
    received: dict[int, list] = {block.moe_index: [] for block in blocks}

    def capture(layer):
        def hook(module, args):
            received[layer].append((args[1].clone(), args[2].clone()))
        return hook

    handles = [block.experts.register_forward_pre_hook(capture(block.moe_index)) for block in blocks]
    ids = torch.randint(3, 200, (1, 9))
    with torch.no_grad(), replay_routing(model, trace) as replay:
        past = returned_cache(model(input_ids=ids[:, :5], use_cache=True))  # a prefill of 5 tokens
        for position in range(5, 9):  # then decode steps of one token
            past = returned_cache(model(input_ids=ids[:, position : position + 1], **{cache_keyword(model): past}, use_cache=True))
        assert replay.position == 9
    for handle in handles:
        handle.remove()
    for layer, calls in received.items():
        index = torch.cat([call[0] for call in calls]).numpy()
        weights = torch.cat([call[1] for call in calls]).float().numpy()
        assert np.array_equal(index, trace.expert_ids[:, layer])
        np.testing.assert_allclose(weights, trace.gate_weights[:, layer].astype(np.float32), rtol=1e-3)


def test_replay_drives_a_wrapped_model_and_its_loads(family):
    model = tiny_model(family)
    trace = trace_for(model, tokens=6)
    wrapped = moe_runtime.wrap(model, budget=0.5, device="cpu")
    runtime = getattr(wrapped, RUNTIME_ATTR)
    seen = []
    run_layer = runtime._run_layer
    runtime._run_layer = lambda layer, hidden, index, weights: (seen.append(index.clone()), run_layer(layer, hidden, index, weights))[1]
    with torch.no_grad(), replay_routing(wrapped, trace):
        wrapped(input_ids=torch.randint(3, 200, (1, 6)))
    runtime._run_layer = run_layer
    layers = trace.num_layers
    assert all(np.array_equal(seen[layer].numpy(), trace.expert_ids[:, layer]) for layer in range(layers))
    assert moe_runtime.stats(wrapped)["hits"] + moe_runtime.stats(wrapped)["misses"] == sum(
        len(np.unique(trace.expert_ids[:, layer])) for layer in range(layers)
    )
    moe_runtime.unwrap(wrapped)


def test_a_trace_of_another_shape_or_running_out_is_refused():
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match=r"the trace routes \(L, E, K\) = \(4, 8, 2\) but the model has \(3, 8, 2\)"):
        with replay_routing(model, random_trace(4, 8, 2, 3)):
            pass
    with pytest.raises(IndexError, match="ran past the trace's 3 tokens"), torch.no_grad():
        with replay_routing(model, random_trace(3, 8, 2, 3)):
            model(input_ids=torch.randint(3, 200, (1, 4)))
    with torch.no_grad():  # the hooks are gone: the model's own routing again
        model(input_ids=torch.randint(3, 200, (1, 4)))
