"""A wrapped model stays an honest nn.Module: whole-model operations work or refuse by name.

install(model, runtime) -> save_pretrained writes every expert (streamed, one MoE layer in RAM
at a time, under the checkpoint's own tensor names, loadable by plain transformers);
state_dict() holds every expert again (read back from slot, host tier or store); deepcopy,
pickling, casts and moves (`.to(dtype)`, `.half()`, `.cuda()`) and training mode raise an error
that names offloading and the fix, before anything changes. remove(model) undoes it all.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import staging_directory

REFUSED = "moe-runtime: {what} a model with offloaded experts is not supported (its experts live in the runtime's slot pool, host RAM tier and store); {fix}"
UNWRAP_FIRST = "call moe_runtime.unwrap(model) first, then {action}, then wrap again"
_PATCHED = ("save_pretrained", "_apply", "train")


def install(model: nn.Module, runtime) -> None:
    """Route the whole-model operations of `model` through the runtime (instance attributes)."""
    model.__dict__["save_pretrained"] = lambda directory, **options: save_offloaded(model, runtime, directory, **options)
    model.__dict__["_apply"] = _checked_apply(model, runtime)
    model.__dict__["train"] = _checked_train(model)


def remove(model: nn.Module) -> None:
    for name in _PATCHED:
        model.__dict__.pop(name, None)


def refuse_copy(what: str):
    """A __deepcopy__ / __reduce_ex__ that names offloading (a copy would share or lose the experts)."""
    def refuse(self, *args):
        raise TypeError(REFUSED.format(what=what, fix=UNWRAP_FIRST.format(action="copy it")))

    return refuse


def experts_state(runtime, layer: int) -> dict[str, torch.Tensor]:
    """{fused parameter name: [E, ...] CPU tensor} of one MoE layer, read from the runtime's source
    (quantized experts dequantized to the model's dtype)."""
    block, spec = runtime.blocks[layer], runtime.source.spec
    fused = {name: torch.empty((block.num_experts, *shape), dtype=spec.dtype) for name, shape in spec.shapes.items()}
    for expert in range(block.num_experts):
        with runtime.source.borrow(layer, expert) as host:
            for name, tensor in spec.decode(host).items():
                fused[name][expert].copy_(tensor)
    return fused


def save_offloaded(model: nn.Module, runtime, directory: str | os.PathLike, **options) -> Path:
    """Write a transformers checkpoint of the whole model to `directory`, one MoE layer of experts
    in RAM at a time: a shard of the non-expert weights, then a shard per MoE layer."""
    if runtime.mask is not None:
        raise ValueError(
            "moe-runtime: this model runs a pruning profile, which a saved checkpoint cannot hold (its router would choose "
            "pruned experts again); call moe_runtime.unwrap(model) and save the unpruned model, or save the profile beside it"
        )
    unknown = set(options) - {"safe_serialization", "max_shard_size", "is_main_process"}
    if unknown:
        raise ValueError(f"save_pretrained of an offloaded model takes no {', '.join(sorted(unknown))}; unwrap first for those options")
    with staging_directory(directory, "save_pretrained folder") as staging:
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        layers = (checkpoint_tensors(runtime.adapter, block, experts_state(runtime, layer)) for layer, block in enumerate(runtime.blocks))
        write_checkpoint(staging, model, runtime.adapter, runtime.blocks, layers)
    return Path(directory)


def write_checkpoint(folder: Path, model: nn.Module, adapter, blocks, expert_shards) -> None:
    """config.json, a shard of every non-expert tensor of `model`, then one shard per MoE layer
    from the iterable `expert_shards` (consumed one at a time: one layer of experts in RAM), and
    the index that names each tensor's shard."""
    shards = 1 + len(blocks)
    name_of = lambda index: f"model-{index + 1:05d}-of-{shards:05d}.safetensors"  # noqa: E731
    weight_map: dict[str, str] = {}
    total_bytes = 0
    model.config.save_pretrained(folder)
    for index, shard in enumerate(itertools.chain([_non_expert_tensors(model, adapter, blocks)], expert_shards)):
        save_file(shard, folder / name_of(index), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name_of(index)))
        total_bytes += sum(tensor.numel() * tensor.element_size() for tensor in shard.values())
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _non_expert_tensors(model: nn.Module, adapter, blocks=()) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer under its checkpoint name; a tied tensor once; a
    quantized linear layer (quantize_rest) as its dequantized weight."""
    from .kernel_linears import KernelLinear

    out, seen = {}, set()
    experts = {id(block.experts) for block in blocks}  # written by the per-layer shards
    for module_name, module in model.named_modules():
        if id(module) in experts:
            continue
        tensors = {**module._parameters, **{k: v for k, v in module._buffers.items() if k not in module._non_persistent_buffers_set}}
        if isinstance(module, KernelLinear):
            tensors = {"weight": module.dequantized_weight(), "bias": module.bias}
        for leaf, tensor in tensors.items():
            if tensor is None or tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            name = f"{module_name}.{leaf}" if module_name else leaf
            out[adapter.to_checkpoint_name(name)] = tensor.detach().to("cpu").contiguous()
    return out


def checkpoint_tensors(adapter, block, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One MoE layer's experts under the checkpoint's names (the inverse of CheckpointStore)."""
    out = {}
    for expert in range(block.num_experts):
        for name, parts in adapter.checkpoint_parts(block, expert).items():
            if parts[0].index is not None:  # fused [E, ...] tensors (GPT-OSS): written once, whole
                out[parts[0].name] = fused[name]
                continue
            for part, piece in zip(parts, fused[name][expert].chunk(len(parts), dim=0)):
                out[part.name] = piece.contiguous()
    return out


def _checked_apply(model: nn.Module, runtime):
    """model._apply that refuses a cast or move of the offloaded experts before anything changes."""
    apply = type(model)._apply

    def checked(fn, recurse=True):
        probe = fn(torch.empty(0, dtype=runtime.source.spec.dtype, device=runtime.device))
        if probe.dtype != runtime.source.spec.dtype or probe.device != runtime.device:
            fix = UNWRAP_FIRST.format(action=f"cast or move it (to {probe.dtype} on {probe.device})") + f" with device={probe.device.type!r}"
            raise TypeError(REFUSED.format(what="casting or moving", fix=fix))
        return apply(model, fn, recurse)

    return checked


def _checked_train(model: nn.Module):
    train = type(model).train

    def checked(mode: bool = True):
        if mode:
            raise TypeError(REFUSED.format(what="training", fix="the experts are frozen copies without gradients; fine-tune the unwrapped model"))
        return train(model, False)

    return checked
