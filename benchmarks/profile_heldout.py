"""Held-out pruning figures on the shipped ESFT traces: retained gate mass and retrieval.

Each task's sequences are split in half (by sequence); profiles come from the first halves and
are scored on the second halves: retained gate mass of the own profile and of the others at
keep 0.25 / 0.5 / 0.75, per importance method, and the share of held-out sequences whose task
retrieval picks from their first 8 and 16 tokens. One split of a task with 7 or 17 sequences is
a noisy estimate, so the own-profile figure at keep 0.5 is also given over 20 random halvings
(both directions: 40 fit/score pairs) and leave-one-sequence-out (the shipped profiles' case:
fitted on every sequence but the scored one).

    python benchmarks/profile_heldout.py
"""

from __future__ import annotations

import os

import numpy as np

from moe_runtime.errors import run_script
from moe_runtime.pruning import make_profile, match_trace, profile_figures
from moe_runtime.pruning.importance import gate_mass
from moe_runtime.trace import Trace, load_traces

DATA = os.path.join(os.path.dirname(__file__), "..", "moe_runtime", "data", "routing", "esft-vanilla-lite")
TASKS = ("intent", "law", "summary", "translation")


def masses(task: str, trace: Trace, fit: list[int], scored: list[int], keep: float = 0.5) -> tuple[float, float]:
    """(kept, all) gate mass of the `scored` sequences under a profile made from the `fit` ones."""
    profile = make_profile(trace.select_sequences(fit), task, keep)
    mass = gate_mass(trace.select_sequences(scored))
    return float((mass * profile.keep_mask()).sum()), float(mass.sum())


def retained(task: str, trace: Trace, fit: list[int], scored: list[int]) -> float:
    kept, total = masses(task, trace, fit, scored)
    return kept / total


def resampled(task: str, trace: Trace, halvings: int = 20) -> tuple[float, float]:
    """Own-profile retained gate mass over random halvings and leave-one-sequence-out (printed);
    returns (mean over the halvings, leave-one-out)."""
    rng = np.random.default_rng(0)
    count = trace.num_sequences
    values = []
    for _ in range(halvings):
        order = rng.permutation(count)
        first, second = sorted(order[: count // 2]), sorted(order[count // 2 :])
        values += [retained(task, trace, first, second), retained(task, trace, second, first)]
    left_out = np.array([masses(task, trace, [s for s in range(count) if s != held], [held]) for held in range(count)])
    pooled = left_out[:, 0].sum() / left_out[:, 1].sum()  # every sequence scored once, by gate mass
    print(
        f"{task:<12} {count:>3} sequences | random halvings: mean {np.mean(values):.4f} min {min(values):.3f} "
        f"max {max(values):.3f}, {np.mean(np.array(values) >= 0.75):.0%} >= 0.75 | leave-one-out {pooled:.4f}"
    )
    return float(np.mean(values)), float(pooled)


def main() -> None:
    traces = {task: load_traces([os.path.join(DATA, f"{task}.npz")]) for task in TASKS}
    halves = {task: trace.split(0.5) for task, trace in traces.items()}
    for method in ("mass", "count", "balanced"):
        for keep in (0.25, 0.5, 0.75):
            profiles = {task: make_profile(halves[task][0], task, keep, method=method) for task in TASKS}
            own, other = [], []
            for task in TASKS:
                own.append(profile_figures(profiles[task], halves[task][1])["retained_gate_mass"])
                other += [profile_figures(profiles[o], halves[task][1])["retained_gate_mass"] for o in TASKS if o != task]
            cells = " ".join(f"{task} {value:.3f}" for task, value in zip(TASKS, own))
            print(f"{method:<9} keep {keep:<5} own: {cells} | mean {np.mean(own):.3f} min {min(own):.3f} | other tasks {min(other):.2f}-{max(other):.2f}")
    profiles = [make_profile(halves[task][0], task, 0.5) for task in TASKS]
    for tokens in (8, 16):
        right = [m["task"] == task for task in TASKS for m in match_trace(profiles, halves[task][1], tokens)]
        print(f"retrieval from the first {tokens} tokens: {np.mean(right):.3f} of {len(right)} held-out sequences")
    print("keep 0.5, own profile, resampled splits:")
    halved, left_out = zip(*(resampled(task, trace) for task, trace in traces.items()))
    print(f"mean over the tasks: random halvings {np.mean(halved):.4f}, leave-one-out {np.mean(left_out):.4f}")


if __name__ == "__main__":
    run_script(main)
