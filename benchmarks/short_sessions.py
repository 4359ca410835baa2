"""The default policy on short sessions: every held-out sequence replayed alone, from a cold cache.

A one-shot `moe-runtime generate` starts a fresh process: the default has only the session's
own few hundred tokens to learn from, and its first refit comes after 128. For each shipped task
(the held-out half of each file, as adaptive_default.py) and budget, each sequence is replayed
alone through LRU, LFU, next-use with the generic table and the default (no fit traces), and
the default started from a fit on the task's other half (what one trace recorded once and given
as policy_fit buys every later session), and the default started from the sessions before it
(the first from nothing: what `generate --learn` gives, run after run); loads summed over the
sessions as multiples of LRU's, and the default's worst single session.

    python benchmarks/short_sessions.py --json sessions.json --plot sessions.png
"""

from __future__ import annotations

import argparse

from adaptive_default import add_replay_arguments, check_outputs, plot_ratio_bars, shipped_halves, write_outputs
from tqdm.auto import tqdm

from moe_runtime.errors import run_script
from moe_runtime.policies import DEFAULT_POLICY, AdaptivePolicy, make_policy
from moe_runtime.policies.adaptive import starting_model
from moe_runtime.routing_log import newest_sessions
from moe_runtime.simulator import replay
from moe_runtime.trace import Trace

POLICIES = ("lru", "lfu", "next-use", DEFAULT_POLICY, "default_fitted", "default_learned")
LABELS = {
    "lfu": "LFU", "next-use": "next-use, generic table", DEFAULT_POLICY: "default", "default_fitted": "default, policy_fit",
    "default_learned": "default, --learn",
}


def measure(trace: Trace, fit: Trace, budget: float) -> dict:
    """Loads of each policy summed over `trace`'s sequences, each replayed alone from a cold
    cache (default_fitted: the default given `fit` as policy_fit; default_learned: given the
    sequences before, as a --learn file keeps them), and the default's largest ratio to LRU in
    any one of them, and with history (--learn, every session but the first)."""
    capacity = max(trace.top_k, int(budget * trace.num_layers * trace.num_experts))
    shape = {"num_layers": trace.num_layers, "num_experts": trace.num_experts, "capacity": capacity, "top_k": trace.top_k}
    fitted = starting_model(trace.num_layers, trace.num_experts, fit)
    loads, worst, worst_learned = dict.fromkeys(POLICIES, 0), 0.0, 0.0
    for index in range(trace.num_sequences):
        session = trace.select_sequences([index])
        earlier = newest_sessions(trace.select_sequences(range(index))) if index else None
        fresh = {name: make_policy(name, **shape) for name in POLICIES[:4]} | {
            "default_fitted": AdaptivePolicy(fitted, **shape), "default_learned": make_policy(DEFAULT_POLICY, **shape, fit=earlier),
        }
        found = {name: replay(session, fresh[name], capacity).loads for name in POLICIES}
        worst = max(worst, found[DEFAULT_POLICY] / found["lru"])
        worst_learned = max(worst_learned, found["default_learned"] / found["lru"]) if index else worst_learned
        loads = {name: loads[name] + found[name] for name in POLICIES}
    return {"budget": budget, "sessions": trace.num_sequences, "tokens": trace.num_tokens, **loads, "worst_session": worst, "worst_learned_session": worst_learned}


def plot(rows: list[dict], path: str) -> None:
    plot_ratio_bars(rows, path, {name: LABELS[name] for name in POLICIES[1:]}, "loads over all sessions / LRU's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_replay_arguments(parser, budgets=True)
    args = parser.parse_args()
    check_outputs(args.json, args.plot)
    halves = shipped_halves()
    jobs = [(name, budget) for name in halves for budget in args.budgets]
    rows = [{"trace": name, **measure(*halves[name], budget)} for name, budget in tqdm(jobs, desc="tasks", unit="run")]
    print("each held-out sequence replayed alone from a cold cache; loads summed over the")
    print("sessions: LRU's per token, the rest as multiples of LRU's; len: tokens per")
    print("session; worst: the default's largest ratio to LRU in any one session; +fit:")
    print("the default started from a fit on the task's other half (policy_fit); learn:")
    print("from the sessions before each (generate --learn)")
    print(f"{'trace':<19} {'bud.':>4} {'sess':>4} {'len':>4} {'LRU':>5} {'LFU':>5} {'generic':>7} {'default':>7} {'worst':>5} {'+fit':>5} {'learn':>5}")
    for row in rows:
        lru = row["lru"]
        print(
            f"{row['trace']:<19} {row['budget']:>4.2f} {row['sessions']:>4} {row['tokens'] / row['sessions']:>4.0f} {lru / row['tokens']:>5.1f}"
            f" {row['lfu'] / lru:>5.3f} {row['next-use'] / lru:>7.3f} {row[DEFAULT_POLICY] / lru:>7.3f} {row['worst_session']:>5.3f}"
            f" {row['default_fitted'] / lru:>5.3f} {row['default_learned'] / lru:>5.3f}"
        )
    learned = max(rows, key=lambda row: row["worst_learned_session"])
    print("the default's worst session with --learn's history (all but a task's first):")
    print(f"{learned['worst_learned_session']:.3f}x LRU's loads ({learned['trace']}, {learned['budget']:.0%})")
    write_outputs(rows, args.json, args.plot, plot)


if __name__ == "__main__":
    run_script(main)
