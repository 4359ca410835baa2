"""Adapters on a tiny random model of each family: blocks, shapes, byte sizes, checkpoint names."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.adapters import SUPPORTED_MODEL_TYPES, ExpertLayout, adapter_for
from moe_runtime.checkpoint import CheckpointDir
from moe_runtime.inspection import model_shape
from moe_runtime.tiny_models import tiny_config, tiny_model

# What each family's config calls E, K and the expert width, read independently of the adapters.
E_FIELD = {"mixtral": "num_local_experts", "gpt_oss": "num_local_experts", "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts"}
I_FIELD = {"mixtral": "intermediate_size", "olmoe": "intermediate_size", "gpt_oss": "intermediate_size"}
SHARED = {"qwen2_moe": 2, "deepseek_v2": 1, "deepseek_v3": 1}


def test_seven_families_are_supported():
    assert set(SUPPORTED_MODEL_TYPES) == {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss"}


def test_blocks_shapes_and_bytes(family):
    config = tiny_config(family)
    model = tiny_model(family)
    blocks = adapter_for(model).blocks(model)
    dense = getattr(config, "first_k_dense_replace", 0)  # DeepSeek's first layers are dense
    assert [b.layer_index for b in blocks] == list(range(dense, config.num_hidden_layers))
    assert [b.moe_index for b in blocks] == list(range(len(blocks)))
    num_experts = getattr(config, E_FIELD.get(family, "num_experts"))
    width = getattr(config, I_FIELD.get(family, "moe_intermediate_size"))
    hidden = config.hidden_size
    per_expert = 3 * hidden * width + (2 * width + hidden if family == "gpt_oss" else 0)
    for block in blocks:
        assert block.num_experts == num_experts
        assert block.top_k == config.num_experts_per_tok
        assert block.expert_numel() == per_expert
        assert len(block.shared) == SHARED.get(family, 0)
        assert model.get_submodule(block.path) is block.block
    shape = model_shape(model)
    assert shape.bytes_per_expert == per_expert * 4
    assert shape.total_expert_bytes == per_expert * 4 * num_experts * len(blocks)
    all_bytes = sum(p.numel() for p in model.parameters()) * 4
    assert shape.non_expert_bytes == all_bytes - shape.total_expert_bytes


def test_layout_flags_follow_the_decorator(family):
    model = tiny_model(family)
    layout = ExpertLayout.of(adapter_for(model).blocks(model)[0].experts)
    if family == "gpt_oss":
        assert layout == ExpertLayout(is_transposed=True, is_concatenated=False, has_bias=True, has_gate=True)
    else:
        assert layout == ExpertLayout(is_transposed=False, is_concatenated=True, has_bias=False, has_gate=True)


def test_checkpoint_names_hold_each_experts_weights(family, tiny_checkpoints):
    """Reading one expert by its checkpoint names gives exactly the fused module's slice."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    checkpoint = CheckpointDir(tiny_checkpoints[family])
    for block in adapter.blocks(model):
        for expert in (0, block.num_experts - 1):
            for name, parts in adapter.checkpoint_parts(block, expert).items():
                read = torch.cat([checkpoint.read(part.name, part.index) for part in parts])
                assert torch.equal(read, getattr(block.experts, name)[expert].detach()), (family, name, expert)


def test_unknown_family_lists_the_supported_ones():
    config = tiny_config("mixtral")
    config.model_type = "llama"
    with pytest.raises(ValueError, match="unsupported model_type 'llama'.*deepseek_v3.*gpt_oss.*mixtral"):
        adapter_for(config)
