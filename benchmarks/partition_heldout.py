"""Multi-GPU partition on the shipped ESFT traces: held-out cut fraction, one plan for all tasks
or one plan per task.

Each task's sequences are split in half by sequence; plans are fitted on first halves and the
share of consecutive-layer transitions crossing devices is measured on the second halves. "all
tasks": one plan from the four first halves merged, scored on the four second halves merged.
"per task": each task's own plan scored on its own second half; pooled weighs the tasks by their
transitions, as the merged figure does.

    python benchmarks/partition_heldout.py [--gpus 2,4,8] [--plot cut.png]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from moe_runtime.errors import run_script
from moe_runtime.placement import cut_fraction, naive_placement, place_multi_gpu, routing_statistics
from moe_runtime.trace import load_trace, merge_traces

DATA = Path(__file__).resolve().parent.parent / "moe_runtime" / "data" / "routing" / "esft-vanilla-lite"
TASKS = ("intent", "law", "summary", "translation")


def held_out_cut(fit, held, gpus: int) -> tuple[float, float, float]:
    """(held-out cut, held-out transition weight, seconds to plan) of a plan fitted on `fit`."""
    started = time.perf_counter()
    plan = place_multi_gpu(fit, gpus)
    seconds = time.perf_counter() - started
    transitions = routing_statistics(held).transitions
    return cut_fraction(np.asarray(plan["device_of"]), transitions), float(transitions.sum()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="2,4,8")
    parser.add_argument("--plot", help="a PNG of the cut fractions per G")
    args = parser.parse_args()
    halves = {task: load_trace(DATA / f"{task}.npz").split(0.5) for task in TASKS}
    fit, held = merge_traces([h[0] for h in halves.values()]), merge_traces([h[1] for h in halves.values()])
    rows = []
    for gpus in (int(g) for g in args.gpus.split(",")):
        merged, _, seconds = held_out_cut(fit, held, gpus)
        own = {task: held_out_cut(*halves[task], gpus) for task in TASKS}
        pooled = sum(cut * weight for cut, weight, _ in own.values()) / sum(weight for _, weight, _ in own.values())
        naive = cut_fraction(naive_placement(held.num_layers, held.num_experts, gpus), routing_statistics(held).transitions)
        rows.append((gpus, merged, pooled, naive))
        cells = " ".join(f"{task} {cut:.3f}" for task, (cut, _, _) in own.items())
        slowest = max([seconds] + [s for _, _, s in own.values()])
        print(f"G={gpus}: all tasks {merged:.3f} | per task: {cells}, pooled {pooled:.3f} | naive {naive:.3f} random {1 - 1 / gpus:.3f} | slowest plan {slowest:.1f} s")
    if args.plot:
        _plot(rows, args.plot)


def _plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"G = {g}" for g, *_ in rows]
    x = np.arange(len(rows))
    figure, axis = plt.subplots(figsize=(6, 4))
    for offset, (name, column) in zip((-0.3, -0.1, 0.1), (("one plan, all tasks", 1), ("a plan per task (pooled)", 2), ("naive", 3))):
        axis.bar(x + offset, [row[column] for row in rows], width=0.2, label=name)
    axis.scatter(x + 0.3, [1 - 1 / g for g, *_ in rows], marker="_", s=200, color="black", label="random")
    axis.set_xticks(x, labels)
    axis.set_ylabel("held-out cut fraction (lower is better)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot -> {path}")


if __name__ == "__main__":
    run_script(main)
