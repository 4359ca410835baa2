"""Held-out pruning figures on the shipped ESFT traces: retained gate mass and retrieval.

Each task's sequences are split in half (by sequence); profiles come from the first halves and
are scored on the second halves: retained gate mass of the own profile and of the others at
keep 0.25 / 0.5 / 0.75, per importance method, and the share of held-out sequences whose task
retrieval picks from their first 8 and 16 tokens.

    python benchmarks/profile_heldout.py
"""

from __future__ import annotations

import os

import numpy as np

from moe_runtime.pruning import make_profile, match_trace, profile_figures
from moe_runtime.trace import load_traces

DATA = os.path.join(os.path.dirname(__file__), "..", "moe_runtime", "data", "routing", "esft-vanilla-lite")
TASKS = ("intent", "law", "summary", "translation")


def main() -> None:
    halves = {task: load_traces([os.path.join(DATA, f"{task}.npz")]).split(0.5) for task in TASKS}
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


if __name__ == "__main__":
    main()
