"""Does the next-use reuse model transfer to a task it was never fitted on?

For each shipped ESFT task: the age x recent-uses table (what `ReuseModel.generic` ships) and
the full model (with popularity and expert transitions) fitted on the other three tasks, the
full model fitted on the task's own first half, and LRU; all replay the task's second half in
one global pool.

    python benchmarks/reuse_transfer.py [--budget 0.25]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moe_runtime.belady import belady_misses, layer_keys
from moe_runtime.errors import run_script
from moe_runtime.policies import NextUsePolicy, ReuseModel, make_policy
from moe_runtime.simulator import replay
from moe_runtime.trace import load_trace, merge_traces

DATA = Path(__file__).resolve().parent.parent / "moe_runtime" / "data" / "routing" / "esft-vanilla-lite"
TASKS = ("intent", "law", "summary", "translation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.25)
    args = parser.parse_args()
    traces = {task: load_trace(DATA / f"{task}.npz") for task in TASKS}
    for task, trace in traces.items():
        fit, held = trace.split(0.5)
        capacity = int(args.budget * held.num_layers * held.num_experts)
        others = merge_traces([traces[other] for other in TASKS if other != task])
        models = {
            "other tasks (generic)": ReuseModel.fit(others, popularity_buckets=1, forecast_buckets=1),
            "other tasks, full model": ReuseModel.fit(others),
            "own first half, full model": ReuseModel.fit(fit),
        }
        loads = {name: replay(held, NextUsePolicy(held.num_layers, held.num_experts, model), capacity).loads for name, model in models.items()}
        loads["LRU"] = replay(held, make_policy("lru"), capacity).loads
        optimum = belady_misses(layer_keys(held.expert_ids, held.num_experts), held.top_k, capacity)
        cells = " | ".join(f"{name} {count / held.num_tokens:.1f} ({count / optimum:.2f}x)" for name, count in loads.items())
        print(f"{task:12s} Belady {optimum / held.num_tokens:.1f} loads/tok | next-use fitted on {cells}", flush=True)


if __name__ == "__main__":
    run_script(main)
