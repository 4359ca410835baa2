"""`moe-runtime place TRACE ... (--gpus G | --gpu-budget X --host-budget Y | --disk-layout) --out PLAN.json`."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..placement import (
    TierCosts,
    compare_tiers,
    cut_fraction,
    expert_id_order,
    load_plan,
    place_disk_layout,
    place_multi_gpu,
    place_tiering,
    routing_statistics,
    runs_per_read,
    save_plan,
)
from ..simulator import TimingModel
from ..trace import load_traces
from .output import console, key_value_table, print_json


def add_parsers(subparsers) -> None:
    place = subparsers.add_parser("place", help="place experts across GPUs or tiers from routing traces (integer programs)")
    place.add_argument("traces", nargs="+", help="traces to measure routing on")
    place.add_argument("--gpus", type=int, help="multi-GPU plan over G devices")
    place.add_argument("--gpu-budget", help="tiering plan: GPU slots, as a share of all experts (0.25) or a count (416)")
    place.add_argument("--host-budget", help="tiering plan: experts host RAM holds, as a share or a count")
    place.add_argument("--disk-layout", action="store_true", help="disk layout plan: each layer's experts in store file order")
    place.add_argument("--method", default="auto", choices=("auto", "ilp", "exact", "search"), help="multi-GPU method")
    place.add_argument("--time-limit", type=float, default=10.0, help="seconds for the solver")
    place.add_argument(
        "--eval", nargs="+",
        help="held-out traces to score the plan on: cut fraction, runs per read, or modelled ms per token beside LRU and frequency pinning",
    )
    place.add_argument("--expert-mb", type=float, default=TimingModel.expert_mb, help="bytes per expert, MB, for --eval's timing model")
    place.add_argument("--h2d-gbps", type=float, default=TimingModel.h2d_gbps, help="host-to-device GB/s for the tiering costs")
    place.add_argument("--disk-gbps", type=float, default=3.0, help="disk read GB/s (default: an NVMe SSD)")
    place.add_argument("--layer-ms", type=float, default=TimingModel.layer_ms, help="compute ms per MoE layer for the tiering costs")
    place.add_argument("--out", required=True, help="plan file to write (.json)")
    place.add_argument("--json", action="store_true", help="print one JSON object")
    place.set_defaults(run=run_place)


def _experts(text: str, total: int, name: str) -> int:
    value = float(text)
    count = int(round(value * total)) if value <= 1 and "." in text else int(value)
    if count < 0:
        raise ValueError(f"--{name} must not be negative")
    return count


def run_place(args: argparse.Namespace) -> int:
    chosen = [args.gpus is not None, args.gpu_budget is not None, args.disk_layout]
    if sum(chosen) != 1:
        raise ValueError("choose one plan: --gpus G (multi-GPU), --gpu-budget X --host-budget Y (tiering) or --disk-layout")
    trace = load_traces(args.traces)
    sources = [Path(p).name for p in args.traces]
    held_out = load_traces(args.eval) if args.eval else None
    if args.gpus is not None:
        plan = place_multi_gpu(trace, args.gpus, args.method, args.time_limit, sources)
        if held_out is not None:
            load_plan(plan).check_shape(held_out.num_layers, held_out.num_experts)
            plan["held_out_cut_fraction"] = cut_fraction(np.asarray(plan["device_of"]), routing_statistics(held_out).transitions)
    elif args.disk_layout:
        plan = place_disk_layout(trace, sources)
        if held_out is not None:
            load_plan(plan).check_shape(held_out.num_layers, held_out.num_experts)
            plan["held_out_runs_per_read"] = runs_per_read(np.asarray(plan["disk_order"]), held_out)
            plan["held_out_id_order_runs_per_read"] = runs_per_read(expert_id_order(held_out.num_layers, held_out.num_experts), held_out)
    else:
        plan = _tiering_plan(args, trace, sources, held_out)
    path = save_plan(plan, args.out)
    summary = {k: v for k, v in plan.items() if k not in ("device_of", "tier_of", "disk_order")}
    summary["out"] = str(path)
    typed = load_plan(plan)
    if typed.kind == "tiering":
        summary["experts_per_tier"] = typed.tier_counts()
    if args.json:
        print_json(summary)
    else:
        console.print(key_value_table(f"{plan['kind']} plan -> {path}", summary))
    return 0


def _tiering_plan(args: argparse.Namespace, trace, sources: list[str], held_out) -> dict:
    if args.host_budget is None:
        raise ValueError("a tiering plan needs --host-budget as well as --gpu-budget")
    total = trace.num_layers * trace.num_experts
    timing = TimingModel(args.expert_mb, args.h2d_gbps, args.layer_ms)
    costs = TierCosts(timing.load_ms, args.expert_mb * 1e6 / (args.disk_gbps * 1e9) * 1e3)
    slots, host = _experts(args.gpu_budget, total, "gpu-budget"), _experts(args.host_budget, total, "host-budget")
    plan = place_tiering(
        trace, slots, host, costs, compute_ms_per_token=trace.num_layers * args.layer_ms, time_limit=args.time_limit,
        sources=sources, progress=not args.json,
    )
    if held_out is not None:
        load_plan(plan).check_shape(held_out.num_layers, held_out.num_experts)
        plan["held_out_ms_per_token"] = compare_tiers(trace, held_out, plan["tier_of"], slots, host, costs, timing)
    return plan
