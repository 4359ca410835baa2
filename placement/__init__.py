"""Expert placement from routing traces: affinity statistics, integer programs, plans.

Imported as `moe_runtime.placement`. `place_multi_gpu(trace, gpus)` partitions experts across
devices to keep consecutive-layer transitions local (ExFlow's problem); `place_tiering(trace, ...)`
chooses pinned / dynamic / host / disk per expert; `place_disk_layout(trace)` orders each layer's
experts in the store file so that experts read together are adjacent; plans are JSON (plan.py).
"""

from __future__ import annotations

import numpy as np

from moe_runtime.trace import Trace

from .affinity import RoutingStatistics, cut_fraction, routing_statistics
from .layout import disk_layout, expert_id_order, order_experts, runs_per_read
from .partition import Partition, partition
from .plan import DiskLayoutPlan, MultiGpuPlan, PlacementPlan, TieringPlan, load_plan, save_plan, validate_plan
from .tier_choice import ALL_DYNAMIC, cross_validated_choice
from .tier_replay import BASELINES, baseline_tiers, compare_tiers, replay_tiers
from .tiering import TIERS, TierCosts, Tiering, plan_tiering, tiering_inputs


def naive_placement(num_layers: int, num_experts: int, gpus: int) -> np.ndarray:
    """Expert i of every layer on device i // (E / G)."""
    return np.repeat((np.arange(num_experts) // (num_experts // gpus))[None], num_layers, axis=0)


def _shape(trace: Trace) -> dict:
    return {"num_layers": trace.num_layers, "num_experts": trace.num_experts, "top_k": trace.top_k, "model_type": trace.model_type}


def place_multi_gpu(trace: Trace, gpus: int, method: str = "auto", time_limit: float = 10.0, sources=()) -> dict:
    """A multi-GPU plan for the model that produced `trace`."""
    stats = routing_statistics(trace)
    result = partition(stats.transitions, gpus, method, time_limit=time_limit)
    return {
        "kind": "multi_gpu",
        "gpus": gpus,
        "device_of": result.device_of.tolist(),
        "method": result.method,
        "cut_fraction": result.cut_fraction,
        "random_cut_fraction": 1 - 1 / gpus,
        "naive_cut_fraction": cut_fraction(naive_placement(trace.num_layers, trace.num_experts, gpus), stats.transitions),
        "solver_status": result.solver_status,
        "gap": result.gap,
        "seconds": result.seconds,
        "shape": _shape(trace),
        "traces": list(sources),
    }


def place_tiering(
    trace: Trace, gpu_slots: int, host_experts: int, costs: TierCosts, *,
    compute_ms_per_token: float = 0.0, time_limit: float = 5.0, sources=(), progress: bool = False,
) -> dict:
    """A single-GPU tiering plan: pinned / dynamic / host / disk per expert.

    The integer program's plan ships only if it beats plain caching (all experts dynamic) by
    cross-validation inside `trace` (tier_choice.py); otherwise the all-dynamic tiers do.
    """
    shape = (trace.num_layers, trace.num_experts, trace.top_k)

    def solve(part: Trace) -> Tiering:
        return plan_tiering(
            tiering_inputs(part), shape, gpu_slots, host_experts, costs,
            time_limit=time_limit, compute_ms_per_token=compute_ms_per_token, progress=progress,
        )

    layer_ms = compute_ms_per_token / trace.num_layers
    winner, cross_validated = cross_validated_choice(
        trace, lambda part: np.asarray(solve(part).tier_of, dtype=object).ravel(), gpu_slots, host_experts, costs, layer_ms,
    )
    result = solve(trace)
    tier_of, dynamic_slots = result.tier_of, result.dynamic_slots
    if winner == ALL_DYNAMIC:
        tier_of = baseline_tiers(trace, gpu_slots, host_experts, "lru").reshape(trace.num_layers, trace.num_experts).tolist()
        dynamic_slots = gpu_slots
    stats = routing_statistics(trace)
    return {
        "kind": "tiering",
        "tier_of": tier_of,
        "dynamic_slots": dynamic_slots,
        "gpu_slots": gpu_slots,
        "host_experts": host_experts,
        "chosen": winner,
        "cross_validated_ms_per_token": cross_validated,
        "modelled_stall_ms_per_token": result.objective_ms,
        "method": result.method,
        "solver": result.solver,
        "solver_status": result.status,
        "gap": result.gap,
        "seconds": result.seconds,
        "solver_seconds": result.solver_seconds,
        "disk_order": disk_layout(stats.coactivation).tolist(),
        "shape": _shape(trace),
        "traces": list(sources),
    }


def place_disk_layout(trace: Trace, sources=()) -> dict:
    """A disk layout plan: each layer's experts in the store file, co-activated ones adjacent.

    runs_per_read (contiguous reads per token and layer) is measured on `trace` itself, beside
    the expert-id order's; score a held-out trace with `runs_per_read(plan["disk_order"], trace)`.
    """
    order = disk_layout(routing_statistics(trace).coactivation)
    return {
        "kind": "disk_layout",
        "disk_order": order.tolist(),
        "runs_per_read": runs_per_read(order, trace),
        "id_order_runs_per_read": runs_per_read(expert_id_order(trace.num_layers, trace.num_experts), trace),
        "shape": _shape(trace),
        "traces": list(sources),
    }


__all__ = [
    "BASELINES",
    "TIERS",
    "DiskLayoutPlan",
    "MultiGpuPlan",
    "Partition",
    "PlacementPlan",
    "RoutingStatistics",
    "TierCosts",
    "Tiering",
    "TieringPlan",
    "baseline_tiers",
    "compare_tiers",
    "cut_fraction",
    "disk_layout",
    "expert_id_order",
    "load_plan",
    "naive_placement",
    "order_experts",
    "partition",
    "place_disk_layout",
    "place_multi_gpu",
    "place_tiering",
    "plan_tiering",
    "replay_tiers",
    "routing_statistics",
    "runs_per_read",
    "save_plan",
    "tiering_inputs",
    "validate_plan",
]
