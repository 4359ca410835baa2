"""Load-only, host-only and hybrid execution replayed on the held-out halves of real routing.

For every shipped trace of both models (ESFT / DeepSeek-V2-Lite and GPT-OSS-20B), the second
half of its sequences is replayed with the runtime's default policy at 10/25/50% budgets under
the three executions, with DeepSeek-V2-Lite-sized experts (17.3 MB), PCIe 4.0 (25 GB/s) and a
CPU computing experts from RAM at 40 GB/s (`--h2d-gbps`, `--host-gbps` change them). Beside
them: Belady's bound for load-only execution (max(compute, MIN's loads x load time)). The
targets: hybrid at most 0.5x load-only at 25%, never slower than load-only or host-only.

    python benchmarks/hybrid_execution.py --json hybrid.json --plot hybrid.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

from moe_runtime.atomic import check_writable, write_atomically, write_text_atomically
from moe_runtime.bench import DEFAULT, BenchRun, BenchSettings, Workload, belady_row, run_one
from moe_runtime.errors import run_script
from moe_runtime.simulator import TimingModel
from moe_runtime.trace import load_trace

DATA = Path(__file__).resolve().parents[1] / "moe_runtime" / "data" / "routing"
EXECUTIONS = ("device", "host", "hybrid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="0.1,0.25,0.5")
    parser.add_argument("--policy", default=DEFAULT)
    parser.add_argument("--h2d-gbps", type=float, default=TimingModel.h2d_gbps)
    parser.add_argument("--host-gbps", type=float, default=TimingModel.host_gbps)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--plot", help="write ms/token against budget per trace to this PNG")
    args = parser.parse_args()
    for path in (args.json, args.plot):
        if path:
            check_writable(path, "output")
    budgets = tuple(float(b) for b in args.budgets.split(","))
    settings = BenchSettings(budgets=budgets, executions=EXECUTIONS, timing=TimingModel(h2d_gbps=args.h2d_gbps, host_gbps=args.host_gbps))
    traces = sorted(DATA.glob("*/*.npz"))
    rows, bounds = [], []
    with tqdm(total=len(traces) * len(budgets) * len(EXECUTIONS), unit="replay") as bar:
        for path in traces:
            name = f"{path.parent.name[:8]}/{path.stem}"
            fit, held_out = load_trace(path).split(0.5)
            work = Workload(name, fit, held_out, split=True)
            for budget in budgets:
                bounds.append(belady_row(name, work, budget, settings))
                for execution in EXECUTIONS:
                    rows.append(run_one(BenchRun(name, args.policy, "none", budget, execution), work, settings, {}))
                    bar.update()
    table = summarise(rows, bounds, budgets)
    if args.json:
        write_text_atomically(args.json, json.dumps({"timing": settings.timing.__dict__, "rows": rows, "belady": bounds}, indent=1))
    if args.plot:
        plot(rows, bounds, args.plot)
    print(table)


def summarise(rows: list[dict], bounds: list[dict], budgets) -> str:
    """The 80-column table: ms/token per execution, hybrid's ratios, Belady's load-only bound."""
    ms = {(r["trace"], r["budget"], r["execution"]): r["ms_per_token"] for r in rows}
    bound = {(b["trace"], b["budget"]): b["bound_ms_per_token"] for b in bounds}
    lines = [f"{'trace':<22}{'budget':>7}{'device':>8}{'host':>8}{'hybrid':>8}{'hyb/dev':>8}{'hyb/min':>8}{'MIN dev':>9}"]
    worst = {budget: 0.0 for budget in budgets}
    never_slower = True
    for trace, budget in sorted(bound):
        device, host, hybrid = (ms[trace, budget, e] for e in EXECUTIONS)
        worst[budget] = max(worst[budget], hybrid / device)
        never_slower &= hybrid <= min(device, host) * 1.0001
        lines.append(f"{trace:<22}{budget:>7}{device:>8.1f}{host:>8.1f}{hybrid:>8.1f}{hybrid / device:>8.2f}{hybrid / min(device, host):>8.2f}{bound[trace, budget]:>9.1f}")
    lines.append("worst hybrid / device: " + ", ".join(f"{b}: {w:.2f}" for b, w in worst.items()))
    lines.append(f"hybrid never slower than device or host: {never_slower}")
    return "\n".join(lines)


def plot(rows: list[dict], bounds: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["trace"] for r in rows})
    figure, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(3.2 * ((len(names) + 1) // 2), 6.4), squeeze=False, layout="constrained")
    for axis, name in zip(axes.flat, names):
        for execution in EXECUTIONS:
            points = sorted((r["budget"], r["ms_per_token"]) for r in rows if r["trace"] == name and r["execution"] == execution)
            axis.plot(*zip(*points), marker="o", label=execution)
        optimum = sorted((b["budget"], b["bound_ms_per_token"]) for b in bounds if b["trace"] == name)
        axis.plot(*zip(*optimum), "k--", label="Belady bound (device)")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("budget")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("modelled ms / token")
    axes[0][0].legend(fontsize=7)
    try:
        write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
    finally:
        plt.close(figure)
    print(f"plot written to {path}")


if __name__ == "__main__":
    run_script(main)
