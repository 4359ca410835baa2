"""A random-weight checkpoint written one MoE layer at a time, for real model shapes larger
than RAM (the live bench's full-width presets: DeepSeek-V2-Lite's 31 GB of bf16 weights).

config -> the model on the meta device (names and shapes, no memory) -> every non-expert
parameter drawn in RAM (normal(0, initializer_range); norm weights 1, biases and persistent
buffers 0) -> one shard of
them, then per MoE layer its experts drawn ([E, ...] fused), written under the checkpoint's own
tensor names (wrapped_model.write_checkpoint, as save_pretrained of a wrapped model writes them)
and let go: never more than one layer of experts in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from .adapters import adapter_for
from .wrapped_model import checkpoint_tensors, write_checkpoint


def write_random_checkpoint(config: PretrainedConfig, folder: Path, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> None:
    """A checkpoint of `config`'s architecture with random weights into `folder` (existing, empty)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it (converters read it)
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    generator = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    experts = {id(block.experts) for block in blocks}
    for module_name, module in model.named_modules():
        if id(module) in experts:
            continue
        for leaf, parameter in list(module._parameters.items()):
            if parameter is not None:
                name = f"{module_name}.{leaf}"
                module._parameters[leaf] = nn.Parameter(_draw(name, parameter.shape, dtype, std, generator), requires_grad=False)
        for leaf, buffer in list(module._buffers.items()):
            if buffer is not None and leaf not in module._non_persistent_buffers_set:  # checkpoint data, e.g. a router's bias
                module._buffers[leaf] = torch.zeros(buffer.shape, dtype=buffer.dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()

    def expert_shards():
        for block in blocks:
            fused = {
                name: _draw(name, (block.num_experts, *shape), dtype, std, generator) for name, shape in block.expert_shapes().items()
            }
            yield checkpoint_tensors(adapter, block, fused)

    write_checkpoint(folder, model, adapter, blocks, expert_shards())


def _draw(name: str, shape, dtype: torch.dtype, std: float, generator: torch.Generator) -> torch.Tensor:
    """Norm weights 1, biases 0, everything else normal(0, std)."""
    if "norm" in name.lower() and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=generator) * std).to(dtype)
