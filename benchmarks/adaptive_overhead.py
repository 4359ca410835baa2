"""What the runtime's default policy costs per MoE layer step, over LRU, in repeated paired runs.

adaptive_default.py times each replay once, and on a shared VM one replay's time moves by half
from run to run. Here LRU and the default replay the same held-out routing alternately, `--runs`
times each, on the cases where the default costs most (E = 128, K = 8: the most expert uses per
step for the shadows and rankers; ESFT at 10-25%: the most evictions; GPT-OSS): per case the
median and the range of the paired differences, and the refits' share of them (timed inside
the policy, AdaptivePolicy.refit_seconds).

    python benchmarks/adaptive_overhead.py --runs 7 --json overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from adaptive_default import workloads
from tqdm.auto import tqdm

from moe_runtime.atomic import check_writable, write_text_atomically
from moe_runtime.errors import run_script
from moe_runtime.policies import DEFAULT_POLICY, make_policy
from moe_runtime.simulator import replay

CASES = (
    ("flat E128 K8 L8", 0.1), ("flat E128 K8 L8", 0.25), ("flat E128 K8 L8", 0.5), ("esft-va/intent", 0.1), ("esft-va/law", 0.1),
    ("esft-va/law", 0.25), ("esft-va/summary", 0.25), ("gpt-oss/gpqa", 0.25),
)


def timed_replay(trace, name: str, capacity: int) -> tuple[float, object]:
    """(us per layer step, the policy) of one replay of `trace` under policy `name`."""
    policy = make_policy(name, num_layers=trace.num_layers, num_experts=trace.num_experts, capacity=capacity, top_k=trace.top_k)
    start = time.perf_counter()
    replay(trace, policy, capacity)
    return (time.perf_counter() - start) / (trace.num_tokens * trace.num_layers) * 1e6, policy


def measure(trace, budget: float, runs: int) -> dict:
    capacity = max(trace.top_k, int(budget * trace.num_layers * trace.num_experts))
    extra, refits = [], []
    for _ in range(runs):
        lru_us, _ = timed_replay(trace, "lru", capacity)
        default_us, policy = timed_replay(trace, DEFAULT_POLICY, capacity)
        extra.append(default_us - lru_us)
        refits.append(policy.refit_seconds / (trace.num_tokens * trace.num_layers) * 1e6)
    return {"extra_us": extra, "median_us": statistics.median(extra), "refit_us": statistics.median(refits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="paired runs per case (default 7)")
    parser.add_argument("--json", help="also write every run's figures to this JSON file")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.json:
        check_writable(args.json)  # before minutes of replays, not after
    traces = workloads()
    rows = [{"trace": name, "budget": budget, **measure(traces[name][0], budget, args.runs)} for name, budget in tqdm(CASES, desc="cases")]
    print(f"the default's replay time per layer step over LRU's, {args.runs} paired runs (us)")
    print(f"{'trace':<19} {'bud.':>4} {'median':>7} {'min':>6} {'max':>6} {'refits':>6}")
    for row in rows:
        print(f"{row['trace']:<19} {row['budget']:>4.2f} {row['median_us']:>7.1f} {min(row['extra_us']):>6.1f} {max(row['extra_us']):>6.1f} {row['refit_us']:>6.1f}")
    if args.json:
        write_text_atomically(args.json, json.dumps(rows, indent=1))


if __name__ == "__main__":
    run_script(main)
