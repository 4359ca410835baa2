"""The offloading runtime and its one-call entry points: wrap, unwrap, stats, reset_stats.

Per MoE layer: the model's router runs -> run_layer(layer, x, top_k_index, top_k_weights) ->
distinct experts -> waves of at most S -> slot cache acquire (hits in place, misses loaded) ->
grouped GEMM from the slots -> release -> [prefetches for the next layers] -> out.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import weakref

import numpy as np
import torch
from torch import nn

from .adapters import ExpertLayout, MoEAdapter, MoEBlock, adapter_for
from .budget import Budget, format_bytes, parse_budget
from .cache import SlotCache
from .compute import TRITON, choose_kernel_path, choose_path, experts_from_slots
from .config import OffloadConfig, config_from
from .loader import Loader
from .offloaded import OffloadedExperts
from .policies import DEFAULT_POLICY, EvictionPolicy, make_policy
from .pool import SlotPool
from . import wrapped_model
from .stats import RuntimeStats
from .store import ConvertedStore, ExpertSource, HostTier, RamSource, expert_nbytes

RUNTIME_ATTR = "_moe_runtime"
CLOSE_TIMEOUT_SECONDS = 30.0  # unwrap waits this long for loads in flight, then names the stuck one


class Runtime:
    """Everything one wrapped model needs: slot pool, cache, loader, source of cold experts."""

    __deepcopy__ = wrapped_model.refuse_copy("copying")
    __reduce_ex__ = wrapped_model.refuse_copy("pickling")

    def __init__(
        self,
        model: nn.Module,
        adapter: MoEAdapter,
        blocks: list[MoEBlock],
        source: ExpertSource,
        config: OffloadConfig,
        *,
        home_device: torch.device = torch.device("cpu"),
        forecaster=None,
        mask=None,
        pinned: list[int] = (),
        transient: list[int] = (),
    ):
        """config: the options, with the device resolved; forecaster, mask, pinned and transient
        come from its predictor, profile and placement plan (see build_runtime)."""
        device = config.device
        self.adapter = adapter
        self.blocks = blocks
        self.source = source
        self.device = device
        self.home_device = home_device  # where the model's weights were before wrap
        self.num_experts = blocks[0].num_experts
        self.top_k = blocks[0].top_k
        self.layout = ExpertLayout.of(blocks[0].experts)
        self.gates = [block.experts._apply_gate for block in blocks]
        self.mask = mask  # a pruning profile's router mask, or None
        routed = (mask.kept_experts() if mask else None) or len(blocks) * self.num_experts
        # Every check before anything starts (loader threads, slot memory).
        self.num_slots = slots_for_budget(config.budget, source, routed, self.top_k)
        policy = make_policy(config.policy, num_layers=len(blocks), num_experts=self.num_experts, capacity=self.num_slots, top_k=self.top_k)
        pinned = sorted(set(pinned) | set(getattr(policy, "pinned", ())))  # a plan's, and a pinned policy's own
        if len(pinned) + self.top_k > self.num_slots:
            raise ValueError(
                f"the placement pins {len(pinned)} experts but the budget holds {self.num_slots}: "
                f"short by {len(pinned) + self.top_k - self.num_slots} slots (pinned + top-k must fit)"
            )
        self.compute_path = choose_kernel_path(config.kernel, device, source.dtype, self.layout, getattr(blocks[0].experts, "act_fn", None))
        self.fallback_path = choose_path(device, source.dtype)  # for multi-wave layers on the Triton path
        self.pool = SlotPool(source.shapes, source.dtype, self.num_slots, device)
        self.stats = RuntimeStats(len(blocks))
        self.loader = Loader(source, self.pool)
        self.cache = SlotCache(
            num_experts=self.num_experts, num_slots=self.num_slots, policy=policy, loader=self.loader, stats=self.stats, pinned=pinned,
            transient=transient,
        )
        self.forecaster = forecaster
        self.prefetch_width = config.prefetch_width or self.top_k
        self.prefetch_lookahead = config.prefetch_lookahead
        self.stats.info = {
            "compute_path": self.compute_path,
            "device": str(device),
            "num_slots": self.num_slots,
            "slot_pool_bytes": self.pool.nbytes,
            "bytes_per_expert": self.pool.bytes_per_slot,
            "policy": self.cache.policy.name,
            "host_tier": type(source).__name__,
            "predictor": forecaster.predictor.name if forecaster else None,
            "prefetch": f"top {self.prefetch_width} x {self.prefetch_lookahead} layer(s) ahead" if forecaster else None,
        }
        self.lock = threading.RLock()  # one MoE layer (or stats read) at a time; see run_layer
        self._closer = weakref.finalize(self, Loader.close, self.loader)

    # ------------------------------------------------------------------ forward
    def run_layer(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """The experts' output [T, H] for one MoE layer, computed through the slot pool.

        One layer at a time per runtime (`lock`): forwards from several threads interleave
        layer by layer, each getting exactly its own output; the cache, forecaster and stats
        are only ever changed under the lock.
        """
        with self.lock:
            return self._run_layer(layer, hidden, top_k_index, top_k_weights)

    def _run_layer(self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # The layer's distinct experts in the router's order (a decode step: highest weight first),
        # the order the simulator replays a trace in. tolist() is this layer's one host sync.
        needed = list(dict.fromkeys(top_k_index.flatten().tolist()))
        self.cache.start_layer(layer, needed)
        if self.forecaster is not None:
            self.forecaster.observe(layer, top_k_index, top_k_weights, hidden)
        waves = self._waves(layer, needed)
        self.stats.layers[layer].waves += len(waves) - 1
        out = None
        for number, wave in enumerate(waves):
            slots = self.cache.acquire(layer, wave)
            try:  # whatever happens in compute (OOM, an interrupt), the wave's experts are released
                if number == 0 and self.forecaster is not None:
                    self._prefetch_after(layer)  # copies overlap this layer's compute
                part = self._compute_wave(layer, wave, slots, hidden, top_k_index, top_k_weights, single=len(waves) == 1)
            finally:
                self.cache.release(layer, wave, self._compute_done())
            out = part if out is None else out + part
        return out

    def _compute_wave(self, layer, wave, slots, hidden, top_k_index, top_k_weights, *, single: bool) -> torch.Tensor:
        """[T, H]: the contribution of the experts `wave` (sitting in `slots`) to the layer's output."""
        table = torch.full((self.num_experts,), -1, dtype=torch.long)
        table[wave] = torch.tensor(slots, dtype=torch.long)
        path = self.compute_path if single or self.compute_path != TRITON else self.fallback_path
        self.stats.paths[path] = self.stats.paths.get(path, 0) + 1
        device_table = table.to(self.device, non_blocking=True)
        return experts_from_slots(hidden, top_k_index, top_k_weights, device_table, self.pool, self.layout, self.gates[layer], path)

    def _prefetch_after(self, layer: int) -> None:
        """Prefetch the top experts forecast for the next `prefetch_lookahead` layers."""
        for lookahead in range(1, self.prefetch_lookahead + 1):
            target = layer + lookahead
            if target >= len(self.blocks):
                break
            scores = self.forecaster.forecast(layer, lookahead)
            self.cache.forecast(target, np.clip(scores, 0.0, 1.0))
            ranked = np.argsort(-scores, kind="stable")[: self.prefetch_width]
            self.cache.prefetch(target, [int(e) for e in ranked if scores[e] > 0])

    def _waves(self, layer: int, needed: list[int]) -> list[list[int]]:
        """Split a layer's experts into passes that fit the pool, resident experts first (one
        pass keeps the router's order, as the simulator does)."""
        capacity = self.num_slots - len(self.cache.pinned)
        if len(needed) <= capacity:
            return [needed]
        resident = set(self.cache.resident(layer))
        ordered = [e for e in needed if e in resident] + [e for e in needed if e not in resident]
        return [ordered[i : i + capacity] for i in range(0, len(ordered), capacity)]

    def _compute_done(self) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def profile_info(self) -> dict:
        if self.mask is None:
            return {}
        total = len(self.blocks) * self.num_experts
        kept = self.mask.kept_experts()
        return {
            "profile": self.mask.profile.task if self.mask.profile else "auto (not chosen yet)",
            "pruned_experts": None if kept is None else total - kept,
            "kept_experts": kept,
            "profile_match_scores": self.mask.match_scores,
        }

    def prefetch(self, layer: int, experts) -> int:
        """Start background loads of `experts` of MoE layer `layer` (for predictors)."""
        with self.lock:
            return self.cache.prefetch(layer, [int(e) for e in experts])

    # ------------------------------------------------------------------ install / remove
    def install(self, model: nn.Module) -> None:
        for block in self.blocks:
            setattr(block.block, self.adapter.experts_attr, OffloadedExperts(self, block.moe_index, block.experts))
        model.to(self.device)
        wrapped_model.install(model, self)
        if self.mask is not None:
            self.mask.attach()
        setattr(model, RUNTIME_ATTR, self)
        self._load_pinned()

    def _load_pinned(self) -> None:
        """Pinned experts (a placement plan's) are loaded once, up front, and never evicted."""
        for layer in range(len(self.blocks)):
            experts = [key - layer * self.num_experts for key in sorted(self.cache.pinned) if key // self.num_experts == layer]
            if experts:
                self.cache.acquire(layer, experts)
                self.cache.release(layer, experts)
        self.stats.reset()

    def remove(self, model: nn.Module) -> None:
        self.drain()  # before anything changes: a stuck load leaves the model wrapped, not half unwrapped
        for block in self.blocks:
            original = block.experts
            if any(p.is_meta for p in original.parameters()):
                self._materialise(block)
            setattr(block.block, self.adapter.experts_attr, original)
        wrapped_model.remove(model)
        self.close()
        model.to(self.home_device)
        delattr(model, RUNTIME_ATTR)

    def _materialise(self, block: MoEBlock) -> None:
        """Give an original experts module real weights again, read from the cold tier."""
        for name, fused in wrapped_model.experts_state(self, block.moe_index).items():
            block.experts._parameters[name] = nn.Parameter(fused, requires_grad=False)

    def close(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
        """Stop the loader once every load in flight has finished (see `drain`)."""
        self.drain(timeout)
        if self.mask is not None:
            self.mask.close()
        self._closer()
        self.source.close()

    def drain(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
        """Wait for every load in flight; raises naming a load stuck longer than `timeout`."""
        deadline = time.monotonic() + timeout
        for ticket in list(self.cache.tickets.values()):
            if ticket.submitted and not ticket.join(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(
                    f"the load of expert {ticket.expert} of MoE layer {ticket.layer} into slot {ticket.slot} has not finished "
                    f"after {timeout:.0f} s (a stalled disk read?); the runtime stays installed"
                )


def slots_for_budget(budget: Budget, source: ExpertSource, total_experts: int, top_k: int) -> int:
    """How many slots `budget` buys; refuses a budget below one layer's top-k experts."""
    per_expert = expert_nbytes(source.shapes, source.dtype)
    total_bytes = per_expert * total_experts
    slots = min(parse_budget(budget, total_bytes) // per_expert, total_experts)
    if slots < top_k:
        minimum = per_expert * top_k
        raise ValueError(
            f"budget {budget!r} holds {slots} experts, fewer than one token's top-k = {top_k}: the minimum is "
            f"{minimum} bytes ({format_bytes(minimum)}), a fraction of {minimum_fraction(minimum, total_bytes)} of all experts"
            + (f"; did you mean 1.0 (all experts) or a size such as {budget}GiB?" if is_bare_number(budget) else "")
        )
    return slots


def minimum_fraction(minimum: int, total_bytes: int) -> str:
    """The smallest fraction, in 4 decimals, that parse_budget turns into at least `minimum` bytes."""
    fraction = math.ceil(minimum / total_bytes * 1e4) / 1e4
    while fraction < 1 and parse_budget(fraction, total_bytes) < minimum:
        fraction = round(fraction + 1e-4, 4)
    return f"{min(fraction, 1.0):.4f}"


def is_bare_number(budget: Budget) -> bool:
    """A small number with no unit (1, '1.5'): bytes by the rules, but likely meant as 1.0 or '1GiB'."""
    if isinstance(budget, str) and budget.strip().replace(".", "", 1).isdigit():
        budget = float(budget)
    return isinstance(budget, (int, float)) and not isinstance(budget, bool) and 1 <= budget < 1024


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available; use device='cpu'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def checked_placement(placement, blocks: list[MoEBlock]) -> dict | None:
    """The placement plan (path or dict) to follow, checked against the model's shape."""
    if placement is None:
        return None
    from .placement import check_plan_shape, load_plan

    plan = load_plan(placement)
    check_plan_shape(plan, len(blocks), blocks[0].num_experts)
    return plan


def plan_devices(plan: dict, devices) -> list[torch.device]:
    """The devices a multi-GPU plan runs on: `devices` if given (one per plan device), else
    cuda:0 .. cuda:G-1, refused on a machine with fewer GPUs."""
    if devices is None:
        available = torch.cuda.device_count()
        if available < plan["gpus"]:
            raise ValueError(
                f"this placement plan puts experts on {plan['gpus']} GPUs; this machine has {available} "
                "(pass devices=[...] to choose others, or plan with fewer --gpus)"
            )
        return [torch.device("cuda", index) for index in range(plan["gpus"])]
    devices = [resolve_device(device) for device in devices]
    if len(devices) != plan["gpus"]:
        raise ValueError(f"this placement plan puts experts on {plan['gpus']} devices; devices= names {len(devices)}")
    return devices


def tier_keys(plan: dict | None, num_experts: int, tier: str) -> list[int]:
    """Cache keys (layer * E + expert) of the experts a tiering plan puts in `tier`."""
    if plan is None or plan["kind"] != "tiering":
        return []
    return [layer * num_experts + expert for layer, row in enumerate(plan["tier_of"]) for expert, name in enumerate(row) if name == tier]


def ram_experts(plan: dict | None) -> frozenset[tuple[int, int]] | None:
    """(layer, expert) pairs a tiering plan holds in host RAM (dynamic and host tiers), when it
    puts others on disk; None when it leaves RAM to the budget (no disk tier, or no plan)."""
    if plan is None or plan["kind"] != "tiering" or not any("disk" in row for row in plan["tier_of"]):
        return None
    return frozenset((layer, e) for layer, row in enumerate(plan["tier_of"]) for e, tier in enumerate(row) if tier in ("dynamic", "host"))


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


def disk_order(plan: dict | None) -> list[list[int]] | None:
    """The store file order a plan asks for (a disk layout, or a tiering plan's), if any."""
    return None if plan is None else plan.get("disk_order")


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
    predictor=None,
    placement=None,
    profile=None,
    prefetch_width: int | None = None,
    prefetch_lookahead: int = 1,
    profiles_dir: str | None = None,
    kernel: str = "auto",
    devices: list | None = None,
    config: OffloadConfig | None = None,
) -> nn.Module:
    """Offload the routed experts of `model` (in place) and return it.

    The keywords build an OffloadConfig (validated before anything changes); `config=` passes
    one instead (then no other keyword).

    budget: memory of the device slot pool (bytes, "2GiB", or a fraction of all routed experts).
    host_budget: RAM for cold experts (default: all of them, as they are already in RAM); less
    needs `store_dir`, where the rest is written once and read back on demand.
    policy: "next-use" (default), "lru", "lfu", "arc", or a policy instance for this model, such
    as NextUsePolicy.fitted(trace) on a trace of the user's task (one instance per wrap: it
    keeps state).
    predictor: a kind ("cross-layer-gate" needs no fitting), a fitted predictor file or instance;
    after each MoE layer the top `prefetch_width` (default top-k) experts it forecasts for each of
    the next `prefetch_lookahead` layers are prefetched.
    kernel: "auto" (the Triton grouped-GEMM kernel on CUDA where the family's experts are plain
    SwiGLU, else PyTorch), "triton" (required) or "torch"; stats()["compute_calls"] says what ran.
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
    """
    config = config_from(config, dict(
        budget=budget, device=device, host_budget=host_budget, store_dir=store_dir, policy=policy, predictor=predictor,
        placement=placement, profile=profile, prefetch_width=prefetch_width, prefetch_lookahead=prefetch_lookahead,
        profiles_dir=profiles_dir, kernel=kernel, devices=devices,
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
    if plan is not None and plan["kind"] == "multi_gpu":
        unused = {"host_budget": config.host_budget, "store_dir": config.store_dir, "predictor": config.predictor, "profile": config.profile}
        if any(value is not None for value in unused.values()):
            raise ValueError(
                f"a multi-GPU plan keeps every expert resident on its device: {', '.join(k for k, v in unused.items() if v is not None)} "
                "do not apply to it; drop them, or use a tiering plan"
            )
        from .multi_device import MultiDeviceRuntime

        MultiDeviceRuntime(adapter, blocks, plan, plan_devices(plan, config.devices), config.budget).install(model, RUNTIME_ATTR)
        return model
    source, spilled = _host_source(
        blocks, fused, config.host_budget, config.store_dir, pin=device.type == "cuda", order=disk_order(plan), ram=ram_experts(plan),
    )
    runtime = build_runtime(model, adapter, blocks, source, plan, config, home_device=home)
    runtime.install(model)
    if spilled:  # only now, with the runtime running from the store: free the RAM copies
        for block in blocks:
            for name in block.expert_shapes():
                block.experts._parameters[name] = nn.Parameter(getattr(block.experts, name).to("meta"), requires_grad=False)
    return model


def build_runtime(model, adapter, blocks, source, plan, config: OffloadConfig, *, home_device: torch.device) -> Runtime:
    """The Runtime `wrap` and `from_pretrained` install: its forecaster, router mask, pinned and
    transient experts resolved from the config's predictor, profile and placement `plan`."""
    forecaster = live_forecaster(config.predictor, model, blocks)
    mask = router_mask(config.profile, config.profiles_dir, model, adapter, blocks)
    experts = blocks[0].num_experts
    runtime = Runtime(
        model, adapter, blocks, source, config, home_device=home_device, forecaster=forecaster, mask=mask,
        pinned=tier_keys(plan, experts, "pinned"), transient=tier_keys(plan, experts, "host"),
    )
    if plan is not None and plan["kind"] == "tiering":
        from .placement import tier_counts

        runtime.stats.info["placement_tiers"] = tier_counts(plan)
    return runtime


def router_mask(profile, profiles_dir, model: nn.Module, adapter: MoEAdapter, blocks: list[MoEBlock]):
    """A RouterMask for `profile` (a path, a PruningProfile, or "auto" with `profiles_dir`)."""
    if profile is None:
        return None
    from .pruning import PruningProfile, RouterMask, load_profile, load_profiles

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
    from .predictor import CrossLayerGatePredictor, LiveForecaster, predictor_from

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


def _host_source(blocks, fused, host_budget, store_dir, *, pin: bool, order=None, ram=None) -> tuple[ExpertSource, bool]:
    """RAM for all experts when host_budget allows it, else a disk store behind a RAM tier
    (holding exactly a placement plan's RAM set `ram`, when the plan has a disk tier).

    Returns (source, spilled): when spilled, the experts are on disk and the caller frees the
    RAM copies once the runtime is installed (a refused wrap must leave the model whole).
    """
    shapes = blocks[0].expert_shapes()
    for block in blocks[1:]:
        if block.expert_shapes() != shapes:
            raise ValueError(f"MoE layer {block.moe_index} has expert shapes {block.expert_shapes()} != {shapes}: one slot pool cannot hold both")
    dtype = next(iter(fused[0].values())).dtype
    per_expert = expert_nbytes(shapes, dtype)
    total = per_expert * sum(block.num_experts for block in blocks)
    host_bytes = total if host_budget is None else parse_budget(host_budget, total, name="host_budget", allow_zero=True)
    host_bytes = planned_host_bytes(ram, host_budget, host_bytes, per_expert)
    if host_bytes >= total:
        for block, layer in zip(blocks, fused):
            for name, tensor in layer.items():
                if tensor.device.type != "cpu" or (pin and not tensor.is_pinned()):
                    layer[name] = tensor.to("cpu").pin_memory() if pin else tensor.to("cpu")
                    getattr(block.experts, name).data = layer[name]
        return RamSource(fused), False
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
        store_dir, shapes, dtype, len(blocks), blocks[0].num_experts,
        lambda layer, expert: {n: t[expert].cpu() for n, t in fused[layer].items()}, order=order,
    )
    return HostTier(store, shapes, dtype, host_bytes, pin=pin, keep=ram), True


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
