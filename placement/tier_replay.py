"""A tier assignment replayed in the bench simulator, and the baselines a tiering plan must beat.

Every contender is a flat [L*E] array of tiers over the same GPU slots and host RAM, so one
replay scores them all: pinned experts are loaded once and never evicted, dynamic and disk
experts share the LRU pool (a disk expert's load also pays its disk read), host experts leave
the pool after their layer. The baselines:
  lru      every expert dynamic; the least used ones that do not fit in RAM on disk;
  pinning  half the slots pin the most used experts (the `pinned` policy), the rest LRU; the
           next most used fill RAM (pinned experts need no RAM copy), the rest on disk.
"""

from __future__ import annotations

import numpy as np

from moe_runtime.policies import PinnedPolicy, make_policy, selection_frequency
from moe_runtime.simulator import SimResult, TimingModel, replay
from moe_runtime.trace import Trace

from .tiering import TierCosts

BASELINES = ("lru", "pinning")


def replay_tiers(trace: Trace, tiers: np.ndarray, gpu_slots: int, costs: TierCosts, timing: TimingModel = TimingModel()) -> SimResult:
    """Replay `trace` with the flat [L*E] tier array `tiers` and `gpu_slots` slots."""
    tiers = np.asarray(tiers).ravel()
    load_ms = np.where(tiers == "disk", costs.h2d_ms + costs.disk_ms, costs.h2d_ms)
    keys = lambda tier: frozenset(np.flatnonzero(tiers == tier).tolist())  # noqa: E731
    return replay(trace, make_policy("lru"), gpu_slots, timing=timing, pinned=keys("pinned"), load_ms_of=load_ms, transient=keys("host"))


def baseline_tiers(fit: Trace, gpu_slots: int, host_experts: int, baseline: str) -> np.ndarray:
    """[L*E] tiers of a baseline (`lru` or `pinning`), ranked by use on the `fit` traces."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")
    frequency = selection_frequency(fit).reshape(-1)
    by_use = np.argsort(-frequency, kind="stable")
    pinned = 0
    if baseline == "pinning":
        pinned = len(PinnedPolicy(frequency, gpu_slots, fit.top_k).pinned)
    tiers = np.full(len(frequency), "disk", dtype=object)
    tiers[by_use[pinned : pinned + host_experts]] = "dynamic"
    tiers[by_use[:pinned]] = "pinned"
    return tiers


def compare_tiers(fit: Trace, held_out: Trace, tier_of, gpu_slots: int, host_experts: int, costs: TierCosts, timing: TimingModel) -> dict:
    """Modelled ms per token on `held_out` of the plan's `tier_of` [L][E] and of each baseline."""
    contenders = {"plan": np.asarray(tier_of, dtype=object).ravel()}
    contenders.update({name: baseline_tiers(fit, gpu_slots, host_experts, name) for name in BASELINES})
    return {name: replay_tiers(held_out, tiers, gpu_slots, costs, timing).per_token()["ms_per_token"] for name, tiers in contenders.items()}
