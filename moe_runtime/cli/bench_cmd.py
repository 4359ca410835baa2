"""`moe-runtime bench TRACE [TRACE ...] --budget 0.1,0.25,0.5 [--policy ...] [--predictor ...]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..atomic import write_atomically
from ..bench import NO_PREDICTOR, BenchSettings, plan, run_bench
from ..execution import DEVICE, HOST, HYBRID
from ..expert_format import QUANTIZED, format_size_ratio
from ..policies import POLICIES
from ..predictor import PREDICTORS
from ..simulator import TimingModel
from ..trace import load_trace, load_traces
from .output import console, print_json, rows_table


def add_parsers(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="replay traces through cache policies and prefetching, against Belady's optimum")
    bench.add_argument("traces", nargs="+", help="trace files to replay (each separately)")
    bench.add_argument("--budget", default="0.1,0.25,0.5", help="fractions of all experts in one global slot pool")
    bench.add_argument("--policy", default="lru", help=f"comma list of {', '.join(sorted(POLICIES))}, default (what wrap uses given nothing; adaptive is it started from the fit traces, as policy_fit does), or all")
    bench.add_argument("--predictor", default=NO_PREDICTOR, help=f"comma list of {', '.join(sorted(PREDICTORS))}, or all (with and without prefetching)")
    bench.add_argument("--fit", nargs="+", help="traces to fit learned parts on (default: first half of each replayed trace)")
    bench.add_argument("--prefetch-width", type=int, help="experts prefetched per layer (default: top-k)")
    bench.add_argument("--lookahead", type=int, default=1, help="prefetch for layer l + D")
    bench.add_argument("--min-score", type=float, default=0.0, help="only prefetch experts the predictor scores at least this high")
    bench.add_argument("--per-layer-slots", type=int, help="per-layer pools of N slots instead of one global pool")
    bench.add_argument("--expert-mb", type=float, default=TimingModel.expert_mb, help="bytes per expert, MB (default: DeepSeek-V2-Lite bf16)")
    bench.add_argument("--h2d-gbps", type=float, default=TimingModel.h2d_gbps, help="host-to-device GB/s (default: PCIe 4.0 x16)")
    bench.add_argument("--layer-ms", type=float, default=TimingModel.layer_ms, help="compute ms per MoE layer")
    bench.add_argument("--host-gbps", type=float, default=TimingModel.host_gbps, help="GB/s a CPU reads an expert at when computing it in place")
    bench.add_argument(
        "--execution", default="device",
        help="comma list of device (load every miss), host (every expert on the CPU), hybrid (each miss loaded or run on the CPU), or all",
    )
    bench.add_argument("--live", action="store_true", help="run the real engine on the traces' routing at a real model's shape (see --arch)")
    bench.add_argument("--arch", help="--live: a preset shape (default: the trace's model_type, or its (L, E, K))")
    bench.add_argument("--scale", type=int, default=1, help="--live: divide hidden and intermediate sizes by this")
    bench.add_argument("--tokens", type=int, default=64, help="--live: decode the first N tokens of the trace's sequences")
    bench.add_argument("--host-budget", default="0", help="--live: RAM for cold experts (default 0: misses read from disk)")
    bench.add_argument("--store-dir", help="--live: convert the experts into a store here first")
    bench.add_argument("--uncached", action="store_true",
                       help="--live: emulate a store much larger than RAM (every read's pages leave the page cache: misses read the disk)")
    bench.add_argument("--miss-precision", choices=QUANTIZED,
                       help="--live: compute each miss on the CPU from a low-bit copy in RAM (the simulated columns still load every miss)")
    bench.add_argument("--quantize", choices=QUANTIZED,
                       help="experts held as int8 / int4: --live quantizes the store; the simulator scales --expert-mb by the format's size")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--plot", help="write hit rate against budget per policy, with Belady, to this PNG")
    bench.add_argument("--wide", action="store_true", help="all columns (prefetch hits and waste too); wider than 80 characters")
    bench.set_defaults(run=run_bench_command)


def _choices(text: str, known, extra=()) -> tuple[str, ...]:
    if text == "all":
        return tuple(sorted(known)) + tuple(extra)
    return tuple(part.strip() for part in text.split(",") if part.strip())


def settings_from(args: argparse.Namespace) -> BenchSettings:
    predictors = _choices(args.predictor, PREDICTORS)
    if args.predictor == "all":
        predictors = (NO_PREDICTOR, *predictors)
    return BenchSettings(
        budgets=tuple(float(b) for b in args.budget.split(",")),
        policies=_choices(args.policy, POLICIES),  # "all" leaves out "default", the same policy as "adaptive"
        predictors=predictors,
        prefetch_width=args.prefetch_width,
        lookahead=args.lookahead,
        min_score=args.min_score,
        per_layer_slots=args.per_layer_slots,
        timing=TimingModel(args.expert_mb * format_size_ratio(args.quantize), args.h2d_gbps, args.layer_ms, args.host_gbps),
        executions=_choices(args.execution, (DEVICE, HOST, HYBRID)),
    )


def run_bench_command(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.live:
        return run_live_command(args, settings)
    traces = {Path(path).stem: load_trace(path) for path in args.traces}
    fit = load_traces(args.fit) if args.fit else None
    total = len(plan(settings, list(traces)))
    with tqdm(total=total, desc="bench", unit="run", disable=args.json) as bar:
        report = run_bench(traces, settings, fit, progress=bar.update)
    if args.plot:
        written = plot_hit_rates(report, args.plot)
        print(f"plot written to {written}", file=sys.stderr)
    if args.json:
        print_json(report)
        return 130 if report["interrupted"] else 0
    timing = report["timing"]
    console.print(
        f"fitted on: {report['fit']}; load {timing['load_ms']:.3f} ms/expert, CPU {timing['host_ms']:.3f} ms/expert/token, "
        f"{timing['layer_ms']} ms/layer"
    )
    console.print(replay_table(report, wide=args.wide))
    bounds = [(r["trace"], r["budget"], r["hit_rate"], r["loads_per_token"], r["compute_bound_ms_per_token"], r["bound_ms_per_token"]) for r in report["belady"]]
    console.print(rows_table("Belady's MIN; bound = max(compute, MIN's loads)", ("trace", "budget", "hit rate", "loads/tok", "compute ms/tok", "bound ms/tok"), bounds))
    if report["interrupted"]:
        console.print(f"[yellow]interrupted: {len(report['results'])} of {total} runs finished[/yellow]")
        return 130
    return 0


def run_live_command(args: argparse.Namespace, settings: BenchSettings) -> int:
    """`bench --live`: measured rows beside the simulator's, per trace and budget."""
    from ..live_bench import run_live  # it refuses an unknown --arch before any work

    if args.scale < 1 or args.tokens < 1:
        raise ValueError("--scale and --tokens must be at least 1")
    policy = settings.policies[0]
    report = {"live": [], "constants": {}}
    for path in args.traces:
        name = Path(path).stem
        part = run_live(name, load_trace(path), arch=args.arch, scale=args.scale, tokens=args.tokens, budgets=settings.budgets,
                        policy=policy, host_budget=args.host_budget, store_dir=args.store_dir, quantize=args.quantize,
                        uncached=args.uncached, miss_precision=args.miss_precision)
        report["live"] += part["live"]
        report["constants"][name] = part["constants"]
    if args.json:
        print_json(report)
        return 0
    columns = ("trace", "budget", "ms", "sim ms", "loads", "sim loads", "hit rate", "stall ms")
    fields = ("trace", "budget", "measured_ms_per_token", "simulated_ms_per_token", "measured_loads_per_token",
              "simulated_loads_per_token", "hit_rate", "stall_ms_per_token")
    console.print(rows_table(f"live, {policy}, per token (measured beside simulated)", columns, [[row[f] for f in fields] for row in report["live"]]))
    return 0


REPLAY_COLUMNS = {  # header -> row field (None: loads against Belady's MIN at the same budget)
    "trace": "trace", "policy": "policy", "predictor": "predictor", "budget": "budget", "hit rate": "hit_rate",
    "loads": "loads_per_token", "x MIN": None, "ms": "ms_per_token",
}
WIDE_COLUMNS = {**REPLAY_COLUMNS, "misses": "misses_per_token", "pf hits": "prefetch_hits_per_token", "pf wasted": "wasted_prefetches_per_token"}
REPLAY_TITLE = "replay, per token (x MIN: loads / Belady's loads)"


def replay_table(report: dict, *, wide: bool):
    """The replay rows; the default columns fit 80 characters, `wide` adds the prefetch counts."""
    columns = WIDE_COLUMNS if wide else REPLAY_COLUMNS
    if any(row.get("execution", DEVICE) != DEVICE for row in report["results"]):  # the predictor's column makes room
        columns = {("exec" if key == "predictor" else key): ("execution" if key == "predictor" else field) for key, field in columns.items()}
        if wide:
            columns = {**columns, "predictor": "predictor", "CPU": "host_computes_per_token"}
    belady = {(row["trace"], row["budget"]): row["loads_per_token"] for row in report["belady"]}
    rows = []
    for row in report["results"]:
        bound = belady.get((row["trace"], row["budget"]))
        ratio = row["loads_per_token"] / bound if bound else float("nan")
        rows.append([ratio if field is None else row[field] for field in columns.values()])
    return rows_table(REPLAY_TITLE, tuple(columns), rows)


def plot_hit_rates(report: dict, path: str) -> Path:
    """Write `hit_rate_figure(report)` to the PNG `path` (atomically); returns the path."""
    import matplotlib.pyplot as plt

    figure = hit_rate_figure(report)
    try:
        return write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=120))
    finally:
        plt.close(figure)


def hit_rate_figure(report: dict):
    """One panel per trace: hit rate against budget, a line per policy/predictor, Belady dashed;
    one legend below all panels names every line of every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({row["trace"] for row in report["belady"]})
    figure, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4.4), squeeze=False, sharey=True, layout="constrained")
    for axis, name in zip(axes[0], names):
        lines: dict[str, list] = {}
        for row in report["results"]:
            if row["trace"] == name:
                label = row["policy"] if row["predictor"] == NO_PREDICTOR else f"{row['policy']} + {row['predictor']}"
                label += "" if row.get("execution", DEVICE) == DEVICE else f" ({row['execution']})"
                lines.setdefault(label, []).append((row["budget"], row["hit_rate"]))
        for label, points in sorted(lines.items()):
            points.sort()
            axis.plot(*zip(*points), marker="o", label=label)
        optimum = sorted((r["budget"], r["hit_rate"]) for r in report["belady"] if r["trace"] == name)
        axis.plot(*zip(*optimum), "k--", marker="s", label="Belady (MIN)")
        axis.set_title(name)
        axis.set_xlabel("budget (share of all experts)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("hit rate")
    labelled = {}
    for axis in axes[0]:  # every line of every panel, once (an interrupted run's last panel may hold only Belady)
        for handle, label in zip(*axis.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    figure.legend(labelled.values(), labelled.keys(), loc="outside lower center", ncols=min(4, len(labelled)), fontsize=8)
    return figure
