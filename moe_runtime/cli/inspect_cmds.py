"""`moe-runtime info MODEL_DIR` and `moe-runtime trace-info TRACE`."""

from __future__ import annotations

import argparse

from ..budget import format_bytes
from ..inspection import describe_model_dir
from ..trace import load_traces
from ..trace_stats import trace_summary
from .output import console, key_value_table, print_json, rows_table


def add_parsers(subparsers) -> None:
    info = subparsers.add_parser("info", help="family, L, E, K and byte counts of a model directory")
    info.add_argument("model_dir", help="local checkpoint directory (config.json + safetensors)")
    info.add_argument("--budget", help="also report how many experts this budget holds (bytes, '2GiB' or a fraction)")
    info.add_argument("--profile", help="also report what this pruning profile keeps (experts, bytes)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=run_info)

    trace_info = subparsers.add_parser("trace-info", help="tokens, sequences, reuse rate and popularity skew of traces")
    trace_info.add_argument("traces", nargs="+", help="trace .npz file(s); several are merged")
    trace_info.add_argument("--json", action="store_true", help="print one JSON object")
    trace_info.set_defaults(run=run_trace_info)


def run_info(args: argparse.Namespace) -> int:
    info = describe_model_dir(args.model_dir, args.budget)
    if args.profile:
        info.update(profile_summary(args.profile, info))
    if args.json:
        print_json(info)
        return 0
    shown = dict(info)
    for key in ("bytes_per_expert", "total_expert_bytes", "non_expert_bytes", "budget_bytes", "kept_expert_bytes"):
        if key in shown:
            shown[key] = f"{format_bytes(shown[key])} ({shown[key]} B)"
    console.print(key_value_table(f"model {args.model_dir}", shown))
    return 0


def profile_summary(path: str, info: dict) -> dict:
    """What a pruning profile keeps of this model; pruned experts are never allocated."""
    from ..pruning import load_profile

    profile = load_profile(path)
    profile.check_shape(info["num_moe_layers"], info["num_experts"], info["top_k"], info["model_type"])
    kept = int(profile.keep_mask().sum())
    return {
        "profile": profile.task,
        "kept_experts": kept,
        "pruned_experts": info["num_moe_layers"] * info["num_experts"] - kept,
        "kept_expert_bytes": kept * info["bytes_per_expert"],
    }


def run_trace_info(args: argparse.Namespace) -> int:
    summary = trace_summary(load_traces(args.traces))
    if args.json:
        print_json(summary)
        return 0
    head = {key: value for key, value in summary.items() if key != "per_layer" and value is not None}
    console.print(key_value_table("trace", head))
    fields = {"MoE layer": "layer", "decoder layer": "decoder_layer", "gini": "gini", "top 25% share": "top_quarter_share"}
    if summary["moe_layers"] is None:  # the trace does not say which decoder layers are MoE
        del fields["decoder layer"]
    rows = [[row[field] for field in fields.values()] for row in summary["per_layer"]]
    console.print(rows_table("popularity skew per MoE layer", tuple(fields), rows))
    return 0
