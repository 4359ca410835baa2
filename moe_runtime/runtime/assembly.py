"""Assembling a runtime: the one-call entry points wrap, unwrap, stats and reset_stats.

options (OffloadConfig) + model + placement plan -> host source (RAM, or a store on disk behind a
RAM tier) -> forecaster, router mask, pinned and transient experts -> Runtime (executor.py) ->
installed in the model in place of each MoE block's experts.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import huge_pages
from ..adapters import ExpertLayout, MoEAdapter, MoEBlock, adapter_for
from ..budget import Budget, format_bytes, parse_budget
from ..config import OffloadConfig, config_from
from ..disk_store import ConvertedStore
from ..execution import HOST, resolve_execution
from ..expert_format import ExpertFormat, ExpertSpec, expert_format
from ..host_tier import ExpertSource, HostTier, RamSource
from ..kernels import cpu_gemv
from ..policies import DEFAULT_POLICY, EvictionPolicy
from .executor import RUNTIME_ATTR, Runtime

if TYPE_CHECKING:  # the placement package imports scipy: loaded only when a plan is given
    from ..placement import MultiGpuPlan, PlacementPlan


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use device='cpu'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def checked_placement(placement, blocks: list[MoEBlock]) -> PlacementPlan | None:
    """The placement plan (path, JSON dict or typed plan) to follow, checked against the model's shape."""
    if placement is None:
        return None
    from ..placement import load_plan

    plan = load_plan(placement)
    plan.check_shape(len(blocks), blocks[0].num_experts)
    return plan


def plan_devices(plan: MultiGpuPlan, devices) -> list[torch.device]:
    """The devices a multi-GPU plan runs on: `devices` if given (one per plan device), else
    cuda:0 .. cuda:G-1, refused on a machine with fewer GPUs."""
    if devices is None:
        available = torch.cuda.device_count()
        if available < plan.gpus:
            raise ValueError(
                f"this placement plan puts experts on {plan.gpus} GPUs; this machine has {available} "
                "(pass devices=[...] to choose others, or plan with fewer --gpus)"
            )
        return [torch.device("cuda", index) for index in range(plan.gpus)]
    devices = [resolve_device(device) for device in devices]
    if len(devices) != plan.gpus:
        raise ValueError(f"this placement plan puts experts on {plan.gpus} devices; devices= names {len(devices)}")
    return devices


def tier_keys(plan: PlacementPlan | None, tier: str) -> list[int]:
    """Cache keys (layer * E + expert) of the experts a tiering plan puts in `tier`."""
    return plan.keys_in(tier) if plan is not None and plan.kind == "tiering" else []


def ram_experts(plan: PlacementPlan | None) -> frozenset[tuple[int, int]] | None:
    """(layer, expert) pairs a tiering plan holds in host RAM, when it puts others on disk;
    None when it leaves RAM to the budget (no disk tier, or no tiering plan)."""
    return plan.ram_experts() if plan is not None and plan.kind == "tiering" else None


def planned_host_bytes(ram: frozenset | None, host_budget: Budget | None, host_bytes: int, per_expert: int) -> int:
    """Host RAM to give the host tier: the plan's RAM set when no host_budget is given (so its
    disk tier stays on disk), else `host_bytes`, refused when it cannot hold the plan's set."""
    if ram is None:
        return host_bytes
    needed = len(ram) * per_expert
    if host_budget is None:
        return needed
    if host_bytes < needed:
        raise ValueError(
            f"the placement plan keeps {len(ram)} experts in host RAM ({format_bytes(needed)}) but host_budget "
            f"{host_budget!r} holds {host_bytes // per_expert}: short by {format_bytes(needed - host_bytes)}; raise host_budget "
            "or plan with a smaller --host-budget"
        )
    return host_bytes


def disk_order(plan: PlacementPlan | None) -> list[list[int]] | None:
    """The store file order a plan asks for (a disk layout, or a tiering plan's), if any."""
    return None if plan is None else plan.disk_order


def runtime_of(model: nn.Module) -> Runtime:
    runtime = getattr(model, RUNTIME_ATTR, None)
    if runtime is None:
        raise ValueError("this model is not wrapped by moe_runtime: call moe_runtime.wrap(model, budget=...) first")
    return runtime


def wrap(
    model: nn.Module,
    *,
    budget: Budget | None = None,
    device: str | torch.device | None = None,
    host_budget: Budget | None = None,
    store_dir: str | None = None,
    policy: str | EvictionPolicy = DEFAULT_POLICY,
    policy_fit=None,
    predictor=None,
    placement=None,
    profile=None,
    prefetch_width: int | None = None,
    prefetch_lookahead: int = 1,
    profiles_dir: str | None = None,
    kernel: str = "auto",
    execution: str = "auto",
    devices: list | None = None,
    quantize: str | None = None,
    quantize_rest: str | None = None,
    miss_precision: str | None = None,
    exact: bool | None = None,
    config: OffloadConfig | None = None,
) -> nn.Module:
    """Offload the routed experts of `model` (in place) and return it.

    The keywords build an OffloadConfig (validated before anything changes); `config=` passes
    one instead (then no other keyword).

    budget: memory of the device slot pool (bytes, "2GiB", or a fraction of all routed experts).
    host_budget: RAM for cold experts (default: all of them, as they are already in RAM); less
    needs `store_dir`, where the rest is written once and read back on demand.
    policy: "adaptive" (default: follows the best of LRU, LFU and next-use on the routing it
    sees; LRU where a miss only moves a pointer, in place with every expert in RAM), "next-use",
    "lru", "lfu", "arc", or a policy instance for this model (one instance per wrap: it keeps state).
    policy_fit: a trace of the user's task (`moe-runtime trace`; a file or Trace): the default (or
    "next-use") starts from a reuse model fitted on it; "pinned" keeps its most used experts. The
    default still follows whichever of its candidates misses least, so a fit that misleads costs
    little (GPT-OSS misc at 50%: 0.76x LRU's loads where next-use fitted alone makes 1.09x;
    BENCHMARKS.md).
    predictor: a kind ("cross-layer-gate" needs no fitting), a fitted predictor file or instance;
    after each MoE layer the top `prefetch_width` (default top-k) experts it forecasts for each of
    the next `prefetch_lookahead` layers are prefetched.
    kernel: "auto" (the Triton grouped-GEMM kernel on CUDA where the family's experts are plain
    SwiGLU, else PyTorch), "triton" (required) or "torch"; stats()["compute_calls"] says what ran.
    execution: where experts are computed: "device" (loaded into the slot pool), "host" (on the
    CPU where their weights lie: on a CPU device nothing is copied and no pool is allocated),
    "hybrid" (resident experts on the device, each miss loaded or computed on the CPU by a
    measured cost model) or "auto" ("host" on a CPU, "device" on CUDA); see execution.py.
    placement: a plan from `moe-runtime place` (path or dict). A multi-GPU plan keeps every
    expert resident on its device (cuda:0 .. cuda:G-1, or `devices`), `budget` being each
    device's expert memory, and runs each (token, expert) pair there. A tiering plan: pinned
    experts are loaded up front and never evicted; host-tier experts leave the slot pool after
    their layer; when the plan has a disk tier, host RAM holds exactly its dynamic and host
    experts (host_budget defaults to that; store_dir is needed) and the rest is read from disk
    on a miss; a store written to `store_dir` puts each layer's experts in the plan's disk order.
    profile: a pruning profile (path or PruningProfile): routers choose only kept experts, pruned
    ones are never loaded, and a fractional budget is a share of the kept experts; "auto" picks
    one of `profiles_dir`'s profiles from the first request's routing.
    quantize: "int8" (per output channel) or "int4" (group 64; "int4-g32" / "int4-g128"): the
    routed experts are quantized once (in RAM, or into the store in `store_dir`) and held,
    moved and computed in that format; the model's own expert weights are freed, and unwrap
    gives back their dequantized values. Shared experts and the rest keep the model's dtype
    unless `quantize_rest` names a format for them too (on a CPU: every other linear layer but
    the routers, computed by the same kernels; see kernel_linears.py).
    miss_precision: "int8" or "int4" (HOBBIT's mixed precision): a low-bit copy of every routed
    expert is kept in RAM; resident experts compute in the model's precision (or `quantize`'s),
    and a missed expert is computed on the CPU from its low-bit copy instead of waiting for its
    load, while its full copy is admitted in the background when recent admissions were reused
    (stats()["host_computes"] counts the low-bit computations).
    exact: on a CPU, whether a decode step gives bit for bit what torch's ops give (True: at full
    precision the unwrapped model's outputs) or may take faster ops that sum in another order:
    the decode kernel for every product (full-precision experts and dense layers too) and the
    routers' logits, one native call for a query's attention (False: 2.0-2.9x the tokens/s
    of a bf16 model on the CPU of BENCHMARKS.md, 1.05x of an fp16 one). Default None: exact
    unless quantize_rest, whose outputs differ from the unwrapped model's anyway.
    """
    config = config_from(config, dict(
        budget=budget, device=device, host_budget=host_budget, store_dir=store_dir, policy=policy, policy_fit=policy_fit, predictor=predictor,
        placement=placement, profile=profile, prefetch_width=prefetch_width, prefetch_lookahead=prefetch_lookahead,
        profiles_dir=profiles_dir, kernel=kernel, execution=execution, devices=devices, quantize=quantize,
        quantize_rest=quantize_rest, miss_precision=miss_precision, exact=exact,
    ))
    if hasattr(model, RUNTIME_ATTR):
        raise ValueError("this model is already wrapped; call moe_runtime.unwrap(model) first")
    if config.dtype is not None:
        raise ValueError("wrap keeps the model's dtype; cast the model before wrapping (dtype is a from_pretrained option)")
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    config = config.with_device(resolve_device(config.device))
    device = config.device
    home = next(model.parameters()).device
    fused = [_fused_params(block) for block in blocks]
    if any(t.is_meta for layer in fused for t in layer.values()):
        raise ValueError("the model's experts are on the meta device; build it with moe_runtime.from_pretrained(path, budget=...)")
    plan = checked_placement(config.placement, blocks)
    if plan is not None and plan.kind == "multi_gpu":
        unused = {
            "host_budget": config.host_budget, "store_dir": config.store_dir, "predictor": config.predictor, "profile": config.profile,
            "quantize": config.quantize, "quantize_rest": config.quantize_rest, "miss_precision": config.miss_precision,
        }
        if any(value is not None for value in unused.values()):
            raise ValueError(
                f"a multi-GPU plan keeps every expert resident on its device: {', '.join(k for k, v in unused.items() if v is not None)} "
                "do not apply to it; drop them, or use a tiering plan"
            )
        from ..multi_device import MultiDeviceRuntime

        MultiDeviceRuntime(adapter, blocks, plan, plan_devices(plan, config.devices), config.budget).install(model, RUNTIME_ATTR)
        return model
    spec = expert_spec(blocks, next(iter(fused[0].values())).dtype, config)
    low_bit = low_bit_copies(spec, config, len(blocks), blocks[0].num_experts, _reader(fused))
    source, spilled = _host_source(
        blocks, fused, spec, config.host_budget, config.store_dir, pin=device.type == "cuda", order=disk_order(plan), ram=ram_experts(plan),
    )
    runtime = build_runtime(model, adapter, blocks, source, plan, config, home_device=home, low_bit=low_bit)
    runtime.install(model)
    if spilled:  # only now, with the runtime running from the store (or quantized copies): free the RAM copies
        for block in blocks:
            for name in block.expert_shapes():
                block.experts._parameters[name] = nn.Parameter(getattr(block.experts, name).to("meta"), requires_grad=False)
    return model


def build_runtime(model, adapter, blocks, source, plan, config: OffloadConfig, *, home_device: torch.device, low_bit=None) -> Runtime:
    """The Runtime `wrap` and `from_pretrained` install: its forecaster, router mask, pinned and
    transient experts resolved from the config's predictor, profile and placement `plan`;
    low_bit: the low-bit copies of miss_precision (see low_bit_copies)."""
    forecaster = live_forecaster(config.predictor, model, blocks)
    mask = router_mask(config.profile, config.profiles_dir, model, adapter, blocks)
    runtime = Runtime(
        model, adapter, blocks, source, config, home_device=home_device, forecaster=forecaster, mask=mask,
        pinned=tier_keys(plan, "pinned"), transient=tier_keys(plan, "host"), dense=kernel_linears(model, blocks, config),
        low_bit=low_bit,
    )
    if plan is not None and plan.kind == "tiering":
        runtime.stats.info["placement_tiers"] = plan.tier_counts()
    return runtime


def low_bit_copies(spec: ExpertSpec, config: OffloadConfig, layers: int, experts: int, read) -> RamSource | None:
    """For miss_precision: every expert in that format in RAM (computed on the CPU), encoded from
    `read(layer, expert)` (the model's dtype and layout) once, at start-up; None without it."""
    if config.miss_precision is None:
        return None
    low = spec.in_format(expert_format(config.miss_precision, on_cpu=True))
    return encoded_copies(low, layers, experts, read, pin=False)


def encoded_copies(spec: ExpertSpec, layers: int, experts: int, read, *, pin: bool) -> RamSource:
    """Every expert in RAM in `spec`'s format (per layer {stored name: [E, ...] CPU tensor}),
    encoded one at a time from `read(layer, expert)` (the model's dtype and layout); in pinned
    memory for copies to a GPU, else in huge pages for the CPU's kernels (huge_pages.py)."""
    allocate = (lambda shape, dtype: torch.empty(shape, dtype=dtype, pin_memory=True)) if pin else huge_pages.empty
    fused = [{name: allocate((experts, *shape), dtype) for name, (shape, dtype) in spec.specs.items()} for _ in range(layers)]
    for layer in tqdm(range(layers), desc=f"{spec.format.name} copies of the experts", unit="layer", disable=layers < 4):
        for expert in range(experts):
            for name, tensor in spec.encode(read(layer, expert)).items():
                fused[layer][name][expert].copy_(tensor)
    return RamSource(fused, spec)


def kernel_linears(model: nn.Module, blocks: list[MoEBlock], config: OffloadConfig):
    """The KernelLinears that `config.quantize_rest` asks for (refused off the CPU), or on a CPU
    where a decode step need not be exact, at full precision; else None."""
    if config.quantize_rest is not None and config.device.type != "cpu":
        raise ValueError(
            f"quantize_rest={config.quantize_rest!r} computes the dense layers with torch's CPU kernels; on {config.device} they stay "
            "resident in the model's dtype: drop quantize_rest (quantize= still applies to the experts)"
        )
    if config.quantize_rest is None and (config.device.type != "cpu" or config.exact_decode() or not cpu_gemv.available()):
        return None
    from ..kernel_linears import KernelLinears

    fmt = ExpertFormat() if config.quantize_rest is None else expert_format(config.quantize_rest, on_cpu=True)
    skipped = [module for block in blocks for module in (block.experts, block.router)]
    return KernelLinears(model, fmt, skipped, config.exact_decode())


def router_mask(profile, profiles_dir, model: nn.Module, adapter: MoEAdapter, blocks: list[MoEBlock]):
    """A RouterMask for `profile` (a path, a PruningProfile, or "auto" with `profiles_dir`)."""
    if profile is None:
        return None
    from ..pruning import PruningProfile, RouterMask, load_profile, load_profiles

    shape = (len(blocks), blocks[0].num_experts, blocks[0].top_k, model.config.model_type)
    if profile == "auto":
        if profiles_dir is None:
            raise ValueError("profile='auto' needs profiles_dir=... holding the candidate profiles")
        candidates = load_profiles(profiles_dir)
        for candidate in candidates:
            candidate.check_shape(*shape)
        return RouterMask(adapter, blocks, None, candidates)
    profile = profile if isinstance(profile, PruningProfile) else load_profile(profile)
    profile.check_shape(*shape)
    return RouterMask(adapter, blocks, profile)


def live_forecaster(predictor, model: nn.Module, blocks: list[MoEBlock]):
    """A LiveForecaster for `predictor`: a kind name, a fitted predictor file, or an instance."""
    if predictor is None:
        return None
    from ..predictor import CrossLayerGatePredictor, LiveForecaster, predictor_from

    if predictor == CrossLayerGatePredictor.name:
        instance = CrossLayerGatePredictor(model)
    else:
        instance, fitted = predictor_from(predictor)
        if not fitted:
            raise ValueError(
                f"the {instance.name} predictor must be fitted on traces of this model first: "
                f"moe-runtime predictor fit TRACE --kind {instance.name} --out P.npz, then predictor='P.npz' "
                "(or predictor='cross-layer-gate', which needs no fitting)"
            )
    return LiveForecaster(instance, len(blocks), blocks[0].num_experts)


def _fused_params(block: MoEBlock) -> dict[str, torch.Tensor]:
    return {name: getattr(block.experts, name).data for name in block.expert_shapes()}


def expert_spec(blocks: list[MoEBlock], dtype: torch.dtype, config: OffloadConfig) -> ExpertSpec:
    """How the runtime holds each expert: the model's shapes and `dtype` in `config.quantize`'s
    format (int4 in torch's CPU tile order where the CPU computes the experts)."""
    shapes = blocks[0].expert_shapes()
    for block in blocks[1:]:
        if block.expert_shapes() != shapes:
            raise ValueError(f"MoE layer {block.moe_index} has expert shapes {block.expert_shapes()} != {shapes}: one slot pool cannot hold both")
    execution = resolve_execution(config.execution, config.device, config.kernel)
    on_cpu = execution == HOST or (config.device.type == "cpu" and config.kernel != "triton")
    spec = ExpertSpec(shapes, dtype, ExpertLayout.of(blocks[0].experts).is_transposed, expert_format(config.quantize, on_cpu=on_cpu))
    spec.specs  # refuses shapes the format cannot hold, before anything changes
    return spec


def _host_source(blocks, fused, spec: ExpertSpec, host_budget, store_dir, *, pin: bool, order=None, ram=None) -> tuple[ExpertSource, bool]:
    """RAM for all experts when host_budget allows it, else a disk store behind a RAM tier
    (holding exactly a placement plan's RAM set `ram`, when the plan has a disk tier).

    Returns (source, spilled): when spilled, the experts are on disk (or quantized in RAM) and
    the caller frees the model's copies once the runtime is installed (a refused wrap must
    leave the model whole).
    """
    per_expert = spec.nbytes
    total = per_expert * sum(block.num_experts for block in blocks)
    host_bytes = total if host_budget is None else parse_budget(host_budget, total, name="host_budget", allow_zero=True)
    host_bytes = planned_host_bytes(ram, host_budget, host_bytes, per_expert)
    if host_bytes >= total and spec.format.quantized:
        return encoded_copies(spec, len(blocks), blocks[0].num_experts, _reader(fused), pin=pin), True
    if host_bytes >= total:
        for block, layer in zip(blocks, fused):
            for name, tensor in layer.items():
                layer[name] = tensor.to("cpu").pin_memory() if pin else huge_pages.copied(tensor.to("cpu"))
                getattr(block.experts, name).data = layer[name]
        return RamSource(fused, spec), False
    if store_dir is None and host_budget is None:
        raise ValueError(
            f"the placement plan keeps {total // per_expert - len(ram)} experts off host RAM (its disk and pinned tiers): "
            "pass store_dir=... for the store they are read from, or host_budget=1.0 to hold every expert in RAM"
        )
    if store_dir is None:
        raise ValueError(
            f"host_budget {host_budget!r} ({format_bytes(host_bytes)}) is less than the experts' {format_bytes(total)}: "
            "pass store_dir=... so the experts that do not fit in RAM can be kept on disk"
        )
    store = ConvertedStore.write(
        store_dir, spec, len(blocks), blocks[0].num_experts, _reader(fused), order=order,
    )
    return HostTier(store, spec, host_bytes, pin=pin, keep=ram), True


def _reader(fused: list[dict[str, torch.Tensor]]):
    """read(layer, expert) -> the expert's tensors (CPU) from the model's fused parameters."""
    return lambda layer, expert: {name: tensor[expert].cpu() for name, tensor in fused[layer].items()}


def unwrap(model: nn.Module) -> nn.Module:
    """Put the original expert modules (with their weights) back and stop the runtime."""
    runtime_of(model).remove(model)
    return model


def stats(model: nn.Module) -> dict:
    """Hit/miss/load/prefetch/stall counters in total and per layer, plus what ran (a consistent
    snapshot: taken between MoE layers, never in the middle of one)."""
    runtime = runtime_of(model)
    with _lock_of(runtime):
        out = {**runtime.stats.as_dict(), **runtime.profile_info()}
        policy = getattr(getattr(runtime, "cache", None), "policy", None)
        if hasattr(policy, "leader_name"):  # the adaptive default: which candidate evicts now
            out["policy_leader"], out["policy_switches"] = policy.leader_name, policy.switches
        return out


def reset_stats(model: nn.Module) -> None:
    runtime = runtime_of(model)
    with _lock_of(runtime):
        runtime.stats.reset()


def _lock_of(runtime) -> contextlib.AbstractContextManager:
    """The runtime's layer lock (the multi-GPU executor keeps every expert resident and has none)."""
    return getattr(runtime, "lock", None) or contextlib.nullcontext()
