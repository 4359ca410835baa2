"""from_pretrained: build an offloaded model from a local checkpoint without loading its experts.

config -> skeleton (parameters on meta) -> non-expert tensors read from the shards -> tied
weights -> disk store (the checkpoint itself, or a store converted once into store_dir) ->
host tier (RAM, host_budget) -> runtime (device slot pool, budget).
"""

from __future__ import annotations

import functools
import os

import psutil
import torch
from torch import nn
from transformers import GenerationConfig

from .adapters import MoEAdapter, MoEBlock, adapter_for
from .atomic import check_replaceable
from .budget import Budget, parse_budget
from .checkpoint import CheckpointDir, build_skeleton
from .config import OffloadConfig, config_from
from .policies import DEFAULT_POLICY, EvictionPolicy, check_fit_shape
from .runtime.assembly import (
    build_runtime, checked_placement, disk_order, expert_spec, low_bit_copies, planned_host_bytes, ram_experts, resolve_device,
)
from .disk_store import CheckpointStore, ConvertedStore, DiskStore
from .expert_format import ExpertFormat, ExpertSpec
from .host_tier import HostTier

RAM_RESERVE_BYTES = 2 * 2**30  # left free for the OS, activations and the Python heap


def from_pretrained(
    path: str | os.PathLike,
    *,
    budget: Budget | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    host_budget: Budget | None = None,
    store_dir: str | os.PathLike | None = None,
    policy: str | EvictionPolicy = DEFAULT_POLICY,
    policy_fit=None,
    predictor=None,
    placement=None,
    profile=None,
    prefetch_width: int | None = None,
    prefetch_lookahead: int = 1,
    profiles_dir: str | os.PathLike | None = None,
    kernel: str = "auto",
    execution: str = "auto",
    quantize: str | None = None,
    quantize_rest: str | None = None,
    miss_precision: str | None = None,
    exact: bool | None = None,
    config: OffloadConfig | None = None,
) -> nn.Module:
    """An offloaded model from the checkpoint directory `path`; experts are never all in RAM.

    dtype: defaults to the config's dtype, else the checkpoint's. host_budget: RAM for cold
    experts (default: all that fit in available RAM). store_dir: convert the experts once into
    a contiguous per-layer store there and serve them from it. policy, policy_fit, predictor,
    prefetch_width and prefetch_lookahead, placement, profile, profiles_dir, kernel, execution:
    as for `wrap`.
    quantize: "int8" or "int4" (group 64; "int4-g32" / "int4-g128" choose the group): the routed
    experts are quantized once into the store in `store_dir` (needed), and RAM, loads and compute
    use the quantized bytes. quantize_rest, miss_precision: as for `wrap` (the low-bit copies
    are read from the checkpoint or the store once, at start-up). The keywords build an OffloadConfig;
    `config=` passes one instead.
    """
    offload = config_from(config, dict(
        budget=budget, device=device, dtype=dtype, host_budget=host_budget, store_dir=store_dir, policy=policy, policy_fit=policy_fit,
        predictor=predictor, placement=placement, profile=profile, prefetch_width=prefetch_width,
        prefetch_lookahead=prefetch_lookahead, profiles_dir=profiles_dir, kernel=kernel, execution=execution, quantize=quantize,
        quantize_rest=quantize_rest, miss_precision=miss_precision, exact=exact,
    ))
    if offload.quantize is not None and offload.store_dir is None:
        raise ValueError(f"quantize={offload.quantize!r} needs store_dir=...: the quantized experts are written there once and read from it")
    checkpoint = CheckpointDir(path)
    if offload.store_dir is not None:
        check_replaceable(offload.store_dir, "store_dir", protected=[path], legacy=ConvertedStore.is_store)  # before any work
    model_config = checkpoint.config()
    adapter = adapter_for(model_config)
    dtype = offload.dtype or _config_dtype(model_config) or checkpoint.storage_dtype()
    offload = offload.with_device(resolve_device(offload.device))
    device = offload.device
    model = build_skeleton(model_config, dtype)
    blocks = adapter.blocks(model)
    load_non_expert_weights(model, checkpoint, adapter, blocks)
    _load_generation_config(model, path)
    plan = checked_placement(offload.placement, blocks)
    if offload.policy_fit is not None:
        check_fit_shape(offload.policy_fit, len(blocks), blocks[0].num_experts)  # before the store is written
    if plan is not None and plan.kind == "multi_gpu":
        raise ValueError(
            "from_pretrained offloads experts from disk; a multi-GPU plan keeps them all resident: load the model "
            "(transformers' from_pretrained) and call moe_runtime.wrap(model, budget=..., placement=PLAN)"
        )
    disk: DiskStore = CheckpointStore(checkpoint, adapter, blocks)
    spec = expert_spec(blocks, dtype, offload)
    low_bit = low_bit_copies(spec, offload, len(blocks), blocks[0].num_experts, functools.partial(_read_full, disk, spec))
    if offload.store_dir is not None:
        disk = _convert(disk, offload.store_dir, spec, blocks, disk_order(plan), protected=[path])
    per_expert = spec.nbytes
    total = per_expert * sum(block.num_experts for block in blocks)
    host_budget = offload.host_budget
    host_bytes = _default_host_bytes(total) if host_budget is None else parse_budget(host_budget, total, name="host_budget", allow_zero=True)
    ram = ram_experts(plan)
    host_bytes = planned_host_bytes(ram, host_budget, host_bytes, per_expert)
    source = HostTier(disk, spec, host_bytes, pin=device.type == "cuda", keep=ram)
    runtime = build_runtime(model, adapter, blocks, source, plan, offload, home_device=torch.device("cpu"), low_bit=low_bit)
    runtime.stats.info["host_tier_experts"] = source.capacity
    runtime.install(model)
    return model


def load_non_expert_weights(model: nn.Module, checkpoint: CheckpointDir, adapter: MoEAdapter, blocks: list[MoEBlock]) -> None:
    """Read every parameter except the routed experts (and checkpointed buffers) into the skeleton."""
    expert_modules = {id(block.experts) for block in blocks}
    missing = []
    for module_name, module in model.named_modules():
        if id(module) in expert_modules:
            continue
        for leaf, param in list(module._parameters.items()):
            if param is None:
                continue
            name = f"{module_name}.{leaf}" if module_name else leaf
            stored = adapter.to_checkpoint_name(name)
            if stored in checkpoint:
                tensor = checkpoint.read(stored).to(param.dtype)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(f"{checkpoint.path}: {stored} has shape {tuple(tensor.shape)}, the model expects {tuple(param.shape)}")
                module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
            else:
                missing.append(name)
        for leaf, buffer in module._buffers.items():
            stored = adapter.to_checkpoint_name(f"{module_name}.{leaf}")
            if buffer is not None and stored in checkpoint:
                buffer.copy_(checkpoint.read(stored).to(buffer.dtype))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [name for name in missing if _get(model, name).is_meta]
    if still_meta:
        raise ValueError(f"{checkpoint.path}: the checkpoint lacks tensors the model needs: {', '.join(still_meta[:5])}")


def _get(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module_name) if module_name else model, leaf)


def _read_full(disk: DiskStore, spec: ExpertSpec, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One expert as the checkpoint holds it (the model's dtype and layout), read from `disk`."""
    out = spec.in_format(ExpertFormat()).allocate(pin=False)
    disk.read_into(layer, expert, out)
    return out


def _convert(disk: DiskStore, store_dir, spec: ExpertSpec, blocks, order, protected) -> ConvertedStore:
    read = functools.partial(_read_full, disk, spec)
    store = ConvertedStore.write(store_dir, spec, len(blocks), blocks[0].num_experts, read, order=order, protected=protected)
    disk.close()
    return store


def _config_dtype(config) -> torch.dtype | None:
    value = getattr(config, "dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _default_host_bytes(total: int) -> int:
    """All experts that fit in available RAM (keeping a reserve)."""
    return max(0, min(total, psutil.virtual_memory().available - RAM_RESERVE_BYTES))


def _load_generation_config(model: nn.Module, path) -> None:
    try:
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:
        pass  # no generation_config.json: keep the one derived from the config
