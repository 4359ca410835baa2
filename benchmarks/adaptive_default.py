"""The runtime's default policy against LRU, on routing it was never fitted on.

For every shipped trace (ESFT: DeepSeek-V2-Lite architecture; GPT-OSS-20B) the held-out half
(second half of the sequences) and synthetic flat-popularity routing, at 10/25/50% of the
experts in one global pool (--budgets: other shares): loads per token of Belady's MIN, LRU,
next-use with the generic table, and the default (adaptive: follows the best of LRU, LFU and
next-use on the recent routing), none of them fitted, and next-use and the default fitted on the
fit half (the first half of the same file's sequences; for synthetic routing another seed; what
policy_fit gives them), as multiples of LRU; plus the default's cost per layer step over LRU's,
compiled (what wrap uses where a C++ compiler is found) and in Python (its reference, where none
is; the same loads, checked). The cost is one run's; on a shared machine it moves by half from
run to run: adaptive_overhead.py repeats paired runs.

    python benchmarks/adaptive_default.py --json out.json --plot adaptive.png
    python benchmarks/adaptive_default.py --budgets 0.05,0.75,0.9   # beyond the issue's budgets
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from moe_runtime.atomic import check_writable, write_atomically, write_text_atomically
from moe_runtime.belady import belady_misses, layer_keys
from moe_runtime.errors import run_script
from moe_runtime.policies import DEFAULT_POLICY, AdaptivePolicy, ReuseModel, make_policy
from moe_runtime.simulator import replay
from moe_runtime.synthetic import flat_routing
from moe_runtime.trace import Trace, load_trace, merge_traces

ROUTING = Path(__file__).parents[1] / "moe_runtime" / "data" / "routing"
BUDGETS = (0.1, 0.25, 0.5)
POLICIES = ("lru", "next-use", DEFAULT_POLICY)


def shipped_halves() -> dict[str, tuple[Trace, Trace]]:
    """(held-out, fit) halves of every shipped trace, split by sequence, named "esft-va/law" etc."""
    return {f"{path.parent.name[:7]}/{path.stem}": load_trace(path).split(0.5)[::-1] for path in sorted(ROUTING.glob("*/*.npz"))}


def workloads() -> dict[str, tuple[Trace, Trace]]:
    """(held-out, fit) halves of every shipped trace, a task switch, and flat routing."""
    out = shipped_halves()
    law, translation = out["esft-va/law"], out["esft-va/translation"]
    out["switch law->transl."] = (merge_traces([law[0], translation[0]]), merge_traces([law[1], translation[1]]))
    out["flat E8 K2 L32"] = (flat_routing(32, 8, 2, 1500, seed=0), flat_routing(32, 8, 2, 1500, seed=2))
    out["flat E128 K8 L8"] = (flat_routing(8, 128, 8, 1500, seed=1), flat_routing(8, 128, 8, 1500, seed=3))
    return out


def measure(trace: Trace, fit: Trace, budget: float) -> dict:
    capacity = max(trace.top_k, int(budget * trace.num_layers * trace.num_experts))
    row = {"budget": budget, "capacity": capacity}
    row["belady"] = belady_misses(layer_keys(trace.expert_ids, trace.num_experts), trace.top_k, capacity) / trace.num_tokens
    shape = {"num_layers": trace.num_layers, "num_experts": trace.num_experts, "capacity": capacity, "top_k": trace.top_k}
    in_python = AdaptivePolicy(ReuseModel.generic(trace.num_layers, trace.num_experts), **shape, native=False)
    for name, policy in [(name, make_policy(name, **shape)) for name in POLICIES] + [("python", in_python)]:
        start = time.perf_counter()
        row[name] = replay(trace, policy, capacity).loads / trace.num_tokens
        row[f"{name}_us_per_layer_step"] = (time.perf_counter() - start) / (trace.num_tokens * trace.num_layers) * 1e6
    if row["python"] != row[DEFAULT_POLICY]:
        raise AssertionError(f"the compiled default made {row[DEFAULT_POLICY]} loads per token, its Python reference {row['python']}")
    for name, policy in (("fitted", "next-use"), ("default_fitted", DEFAULT_POLICY)):  # what policy_fit gives either policy
        row[name] = replay(trace, make_policy(policy, **shape, fit=fit), capacity).loads / trace.num_tokens
    return row


def plot(rows: list[dict], path: str) -> None:
    bars = {"next-use": "next-use, generic table", DEFAULT_POLICY: DEFAULT_POLICY, "default_fitted": f"{DEFAULT_POLICY}, started from the fit half"}
    plot_ratio_bars(rows, path, bars, "loads per token / LRU's")


def plot_ratio_bars(rows: list[dict], path: str, bars: dict[str, str], xlabel: str) -> None:
    """One panel per budget, a group of bars per trace: each column of `bars` (column: label) as a
    multiple of the row's "lru"; a dashed line at LRU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({row["trace"] for row in rows})
    budgets = sorted({row["budget"] for row in rows})
    height = 0.8 / len(bars)
    figure, axes = plt.subplots(1, len(budgets), figsize=(4.2 * len(budgets), 0.32 * len(names) * len(bars) / 3 + 1.6), sharey=True, layout="constrained", squeeze=False)
    for axis, budget in zip(axes[0], budgets):
        chosen = {row["trace"]: row for row in rows if row["budget"] == budget}
        for position, (column, label) in enumerate(bars.items()):
            offset = (position - (len(bars) - 1) / 2) * height
            axis.barh([i + offset for i in range(len(names))], [chosen[n][column] / chosen[n]["lru"] for n in names], height=height, label=label)
        axis.axvline(1.0, color="k", linestyle="--", linewidth=1, label="LRU")
        axis.set_yticks(range(len(names)), names, fontsize=8)
        axis.set_title(f"{budget:.0%} of the experts")
        axis.set_xlabel(xlabel)
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=len(bars) + 1, fontsize=8)
    write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=120))
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_replay_arguments(parser, budgets=True)
    args = parser.parse_args()
    check_outputs(args.json, args.plot)
    rows = []
    jobs = [(name, trace, fit, budget) for name, (trace, fit) in workloads().items() for budget in args.budgets]
    for name, trace, fit, budget in tqdm(jobs, desc="replays", unit="run"):
        rows.append({"trace": name, **measure(trace, fit, budget)})
    print("loads per token: LRU's, the rest as multiples of it; fitted: next-use fitted on the fit")
    print("half, dflt+fit: the default started from it (policy_fit); us: the default's replay time")
    print("per layer step over LRU's, compiled and in Python (the same loads)")
    print(f"{'trace':<19} {'bud.':>4} {'LRU':>5} {'MIN':>5} {'generic':>7} {'default':>7} {'fitted':>6} {'dflt+fit':>8} {'us':>5} {'py us':>5}")
    for row in rows:
        lru = row["lru"]
        extra = [row[f"{name}_us_per_layer_step"] - row["lru_us_per_layer_step"] for name in (DEFAULT_POLICY, "python")]
        ratios = [row[name] / lru for name in ("belady", "next-use", DEFAULT_POLICY, "fitted", "default_fitted")]
        print(
            f"{row['trace']:<19} {row['budget']:>4.2f} {lru:>5.1f} {ratios[0]:>5.3f} {ratios[1]:>7.3f} {ratios[2]:>7.3f} {ratios[3]:>6.3f}"
            f" {ratios[4]:>8.3f} {extra[0]:>5.1f} {extra[1]:>5.1f}"
        )
    write_outputs(rows, args.json, args.plot, plot)


def add_replay_arguments(parser: argparse.ArgumentParser, *, budgets: bool) -> None:
    """--json and --plot (main checks them before the replays), and --budgets where asked for."""
    parser.add_argument("--json", help="also write every row to this JSON file")
    parser.add_argument("--plot", help="also write the ratios to LRU to this PNG")
    if budgets:
        parser.add_argument("--budgets", type=budget_list, default=BUDGETS, help="shares of the experts the pool holds, e.g. 0.75,0.9 (default: the issue's 0.1,0.25,0.5)")


def budget_list(text: str) -> tuple[float, ...]:
    """"0.75,0.9" -> (0.75, 0.9); each a share of the experts, above 0 and below 1 (at 1 every expert fits: nothing to compare)."""
    try:
        budgets = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"budgets are comma-separated numbers such as 0.1,0.25, not {text!r}") from None
    if not all(0 < budget < 1 for budget in budgets):
        raise argparse.ArgumentTypeError(f"each budget is a share of the experts above 0 and below 1, got {text}")
    return budgets


def check_outputs(*paths: str | None) -> None:
    """Refuse an output that cannot be written before minutes of replays, not after."""
    for path in paths:
        if path:
            check_writable(path)


def write_outputs(rows: list[dict], json_path: str | None, plot_path: str | None, plot: Callable[[list[dict], str], None]) -> None:
    """The rows as JSON and `plot(rows, plot_path)`, each where a path was given."""
    if json_path:
        write_text_atomically(json_path, json.dumps(rows, indent=1))
    if plot_path:
        plot(rows, plot_path)
        print(f"plot written to {plot_path}")


if __name__ == "__main__":
    run_script(main)
