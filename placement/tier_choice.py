"""Choosing a tiering plan by cross-validation inside the fit traces, with plain caching a candidate.

fit traces -> two halves by sequence -> for each half: a plan made on the other half, and the
all-dynamic tiers (every expert cached by LRU, the least used on disk) made on it too -> both
replayed on the half they never saw -> the contender with the lower modelled ms per token over
both halves wins, and is made again on all the fit traces.

Why: a plan scored on the traces it was made from always looks best; on new sequences the
integer program's pinned and transient choices can cost more than they save (issue 20 saw a
plan lose to plain LRU at a 50% GPU budget). Cross-validation asks the held-out question before
the plan ships.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moe_runtime.simulator import TimingModel
from moe_runtime.trace import Trace

from .tier_replay import baseline_tiers, replay_tiers
from .tiering import TierCosts

PLAN, ALL_DYNAMIC = "plan", "all dynamic"


def cross_validated_choice(
    trace: Trace, plan_for: Callable[[Trace], np.ndarray], gpu_slots: int, host_experts: int, costs: TierCosts, layer_ms: float,
) -> tuple[str, dict[str, float]]:
    """(the winner, {contender: modelled ms per token on held-out halves}); `plan_for(trace)` gives
    a plan's flat [L*E] tiers. With fewer than two sequences there is nothing to hold out: the plan."""
    if trace.num_sequences < 2:
        return PLAN, {}
    timing = TimingModel(layer_ms=layer_ms)
    first, second = trace.split(0.5)
    total_ms = {PLAN: 0.0, ALL_DYNAMIC: 0.0}
    for train, test in ((first, second), (second, first)):
        contenders = {PLAN: plan_for(train), ALL_DYNAMIC: baseline_tiers(train, gpu_slots, host_experts, "lru")}
        for name, tiers in contenders.items():
            total_ms[name] += replay_tiers(test, tiers, gpu_slots, costs, timing).total_ms
    per_token = {name: ms / trace.num_tokens for name, ms in total_ms.items()}
    return min(per_token, key=per_token.get), per_token
