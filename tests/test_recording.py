"""record_trace captures exactly what each router returned, checked against an independent capture."""

from __future__ import annotations

import numpy as np
import torch

from moe_runtime.adapters import adapter_for
from moe_runtime.recording import record_trace
from moe_runtime.tiny_models import tiny_model


def _capture_expert_inputs(model, sequences):
    """What each experts module received (its top_k_index / top_k_weights arguments)."""
    blocks = adapter_for(model).blocks(model)
    seen = {block.moe_index: [] for block in blocks}
    hooks = [
        block.experts.register_forward_pre_hook(
            lambda module, args, i=block.moe_index: seen[i].append((args[1].clone(), args[2].float().clone()))
        )
        for block in blocks
    ]
    with torch.no_grad():
        for sequence in sequences:
            model(input_ids=torch.tensor([sequence]), use_cache=False)
    for hook in hooks:
        hook.remove()
    ids = np.stack([torch.cat([c[0] for c in seen[i]]).numpy() for i in sorted(seen)], axis=1)
    weights = np.stack([torch.cat([c[1] for c in seen[i]]).numpy() for i in sorted(seen)], axis=1)
    return ids, weights


def test_recorded_trace_equals_router_outputs(family):
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(3, 300, (n,), generator=generator).tolist() for n in (5, 11, 1)]
    trace = record_trace(model, sequences, router_inputs=True, task="unit")
    ids, weights = _capture_expert_inputs(model, sequences)
    assert np.array_equal(trace.expert_ids, ids.astype(np.int16))
    assert np.array_equal(trace.gate_weights, weights.astype(np.float16))
    assert list(trace.seq_offsets) == [0, 5, 16, 17]
    assert trace.model_type == family and trace.task == "unit"
    assert trace.router_inputs.shape == (17, trace.num_layers, model.config.hidden_size)
    assert trace.moe_layers == tuple(b.layer_index for b in adapter_for(model).blocks(model))


def test_recording_leaves_no_hooks():
    model = tiny_model("mixtral")
    record_trace(model, [[5, 6, 7]])
    routers = [block.router for block in adapter_for(model).blocks(model)]
    assert all(not router._forward_hooks for router in routers)
