"""Single-GPU tiering: for every expert, pinned in a GPU slot, dynamic (cached in the slot pool),
host RAM (loaded on use, never kept in the pool) or disk (read on a miss, cached in the pool),
minimising the modelled stall time per token.

A multiple-choice knapsack over host RAM, one integer program per candidate pool configuration:

    minimise  sum_e  u_e (1 - h c_e) m_e [ t_h2d (dyn_e + host_e) + (t_disk + t_h2d) disk_e ]
    subject to  pin_e = [e among the S - D most used];  host_e = 0 unless e is transient;
                dyn_e = 0 if e is transient;  sum (dyn_e + host_e) <= H;
                pin_e + dyn_e + host_e + disk_e = 1

u_e: uses per token (popularity); m_e: the expert's miss rate measured by replaying the fit
traces through LRU with D dynamic slots, exactly the S - D most used experts pinned and the
transient experts dropped from the pool after their layer (a transient expert misses every use).
The pinned and transient sets are fixed per candidate because the measured rates hold for them
only: left free, the program pinned other experts and its plans simulated 40% slower than planned;
an analytical reuse model misjudged the cache as badly. Transient experts are what LRU caches in
vain: dropping the dynamic experts that miss most anyway leaves their slots to experts that are
reused (on held-out ESFT sequences, 2.7% fewer ms per token than plain LRU with all experts in
RAM).

The candidates: D over [S / 2, S] without transient experts, then at the best D, the 15% / 30% /
45% of the dynamic experts with the highest miss rates made transient; the lowest objective wins.
c_e: share of its uses the affinity table's top-K forecast from the previous layer contained,
and h the share of a load that compute can hide (compute time over load time per token, at
most 1). HiGHS (else CBC) with a time limit; the solver's own status and gap are reported, and a
greedy fallback is used, and said, when no integer solution comes back in time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pulp
from tqdm.auto import tqdm

from moe_runtime.policies import make_policy
from moe_runtime.policies.shadow_cache import ShadowCache
from moe_runtime.trace import Trace

from .affinity import RoutingStatistics, routing_statistics
from .solver import solve

TIERS = ("pinned", "dynamic", "host", "disk")


@dataclass(frozen=True)
class TierCosts:
    h2d_ms: float  # one expert host -> device
    disk_ms: float  # one expert disk -> host


@dataclass(frozen=True)
class TieringInputs:
    uses: np.ndarray  # [N] expected uses per token, N = L * E
    coverage: np.ndarray  # [N] share of uses a predictor forecast one layer ahead
    trace: Trace  # the fit traces, replayed to measure miss rates

    def most_used(self, count: int) -> np.ndarray:
        """The `count` most used experts (keys), most used first: the pinned set of a plan."""
        return np.argsort(-self.uses, kind="stable")[:count]

    def miss_rate(self, gpu_slots: int, dynamic: int, transient: frozenset[int] = frozenset()) -> np.ndarray:
        """[N] miss rate of each expert under LRU with `dynamic` slots, the rest pinned by use and
        the `transient` experts dropped from the pool after their layer."""
        pinned = frozenset(self.most_used(gpu_slots - dynamic).tolist())
        misses = lru_misses(self.trace, gpu_slots, pinned, transient)
        uses = self.uses * self.trace.num_tokens
        return np.where(uses > 0, misses / np.maximum(uses, 1), 1.0)


def lru_misses(trace: Trace, slots: int, pinned: frozenset[int] = frozenset(), transient: frozenset[int] = frozenset()) -> np.ndarray:
    """[L*E] misses of each expert when `trace` runs through `slots` slots under LRU, `pinned`
    experts holding theirs and `transient` ones dropped after their layer: the very counts of the
    simulator's replay with no prefetching (tested), from a shadow cache of the slots the pinned
    experts leave, at 2-3x the replay's speed: a plan replays its traces once per candidate
    (seven), and place_tiering plans once per cross-validation fold and once more on all."""
    if slots - len(pinned) < trace.top_k:
        raise ValueError(f"{slots} slots with {len(pinned)} pinned cannot hold one layer step's {trace.top_k} experts")
    shadow = ShadowCache(make_policy("lru"), num_experts=trace.num_experts, capacity=slots - len(pinned))
    misses = [0] * (trace.num_layers * trace.num_experts)
    for token in trace.expert_ids.tolist():
        for layer, experts in enumerate(token):
            base = layer * trace.num_experts
            if pinned:
                experts = [expert for expert in experts if base + expert not in pinned]
            for expert in dict.fromkeys(experts):  # a repeated expert misses once
                misses[base + expert] += base + expert not in shadow.resident
            shadow.step(layer, experts)
            if transient:
                shadow.drop([base + expert for expert in experts if base + expert in transient])
    return np.array(misses, dtype=float)


@dataclass(frozen=True)
class Tiering:
    tier_of: list[list[str]]  # [L][E]
    dynamic_slots: int
    objective_ms: float  # modelled stall per token
    method: str  # "ilp" or "greedy"
    solver: str | None
    status: str
    gap: float | None
    seconds: float  # the whole plan: miss-rate replays and every candidate's program
    solver_seconds: float = 0.0  # the solver's time over all candidates' programs


def tiering_inputs(trace: Trace, stats: RoutingStatistics | None = None) -> TieringInputs:
    """What the tiering program needs from `trace` (`stats`: its routing statistics, if measured already)."""
    stats = stats or routing_statistics(trace)
    coverage = _affinity_coverage(stats.transitions, trace.expert_ids.astype(np.int64), trace.top_k, trace.num_experts)
    return TieringInputs(stats.popularity.reshape(-1), coverage, trace)


def _affinity_coverage(transitions: np.ndarray, ids: np.ndarray, top_k: int, experts: int) -> np.ndarray:
    """[L*E] share of each expert's uses that the previous layer's affinity forecast contained."""
    layers = ids.shape[1]
    covered = np.zeros((layers, experts))
    used = np.zeros((layers, experts))
    for layer in range(1, layers):
        table = transitions[layer - 1] / np.maximum(transitions[layer - 1].sum(1, keepdims=True), 1e-12)
        previous = np.zeros((len(ids), experts))
        np.put_along_axis(previous, ids[:, layer - 1], 1.0, axis=1)
        forecast = np.argsort(-(previous @ table), axis=1)[:, :top_k]
        hit = (forecast[:, :, None] == ids[:, layer][:, None, :]).any(axis=1)  # [T, K]
        np.add.at(covered[layer], ids[:, layer], hit)
        np.add.at(used[layer], ids[:, layer], 1)
    return (covered / np.maximum(used, 1)).reshape(-1)


TRANSIENT_SHARES = (0.15, 0.3, 0.45)  # of the dynamic experts, those with the highest miss rates


def plan_tiering(
    inputs: TieringInputs,
    shape: tuple[int, int, int],
    gpu_slots: int,
    host_experts: int,
    costs: TierCosts,
    *,
    time_limit: float = 5.0,
    candidates: int = 4,
    compute_ms_per_token: float = 0.0,
    progress: bool = False,
) -> Tiering:
    """Tiers for L x E experts (shape = (L, E, K)) with `gpu_slots` and `host_experts` of room.

    Each candidate replays the fit traces once (seconds on the ESFT traces); `progress` shows a bar.
    """
    layers, experts, top_k = shape
    if gpu_slots < top_k:
        raise ValueError(f"GPU budget holds {gpu_slots} experts, fewer than top-k = {top_k}: short by {top_k - gpu_slots}")
    if gpu_slots + host_experts < top_k:
        raise ValueError("GPU and host budgets together cannot hold one token's experts")
    started = time.perf_counter()
    options = sorted({int(round(top_k + (gpu_slots - top_k) * f)) for f in np.linspace(0.5, 1, candidates)})
    loads_ms = (inputs.uses.sum() * costs.h2d_ms) or 1.0
    hidden = min(1.0, compute_ms_per_token / loads_ms)  # share of a forecast load that compute hides
    per_solve = time_limit / (len(options) + len(TRANSIENT_SHARES))

    solver_seconds = []
    bar = tqdm(total=len(options) + len(TRANSIENT_SHARES), desc="tiering candidates", unit="plan", disable=not progress)

    def solve_for(dynamic: int, transient: frozenset[int]) -> tuple[Tiering, np.ndarray]:
        miss_rate = inputs.miss_rate(gpu_slots, dynamic, transient)
        cost = _costs(inputs, miss_rate, costs, hidden)
        result = _solve_for(inputs, cost, gpu_slots - dynamic, host_experts, dynamic, transient, per_solve)
        solver_seconds.append(result.seconds)
        bar.update()
        return result, miss_rate

    best, miss_rate = min((solve_for(dynamic, frozenset()) for dynamic in options), key=lambda pair: pair[0].objective_ms)
    dynamic = np.flatnonzero(np.array(best.tier_of) == "dynamic")
    by_misses = dynamic[np.argsort(-miss_rate[dynamic], kind="stable")]
    for share in TRANSIENT_SHARES:
        transient = frozenset(by_misses[: int(share * len(by_misses))].tolist())
        result, _ = solve_for(best.dynamic_slots, transient)
        if result.objective_ms < best.objective_ms:
            best = result
    bar.close()
    tier_of = np.array(best.tier_of).reshape(layers, experts).tolist()
    return Tiering(
        tier_of, best.dynamic_slots, best.objective_ms, best.method, best.solver, best.status, best.gap,
        time.perf_counter() - started, sum(solver_seconds),
    )


def _costs(inputs: TieringInputs, miss_rate: np.ndarray, costs: TierCosts, hidden: float) -> np.ndarray:
    """[N, 4] stall ms per token of each expert in each tier (pinned, dynamic, host, disk)."""
    exposed = inputs.uses * (1 - hidden * inputs.coverage) * miss_rate
    return np.stack([np.zeros_like(exposed), exposed * costs.h2d_ms, exposed * costs.h2d_ms, exposed * (costs.h2d_ms + costs.disk_ms)], axis=1)


def _solve_for(inputs, cost, pinned_room, host_experts, dynamic, transient, time_limit) -> Tiering:
    """The program for one candidate: pinned set and transient set fixed, RAM or disk chosen."""
    total = len(cost)
    pinned = set(inputs.most_used(pinned_room).tolist())  # the set the miss rates were measured with
    fixed_zero = [{1, 2, 3} if e in pinned else {0, 1} if e in transient else {0, 2} for e in range(total)]
    problem = pulp.LpProblem("tiering", pulp.LpMinimize)
    x = [{t: pulp.LpVariable(f"x_{e}_{t}", cat="Binary") for t in range(4) if t not in fixed_zero[e]} for e in range(total)]
    problem += pulp.lpSum(float(cost[e, t]) * var for e in range(total) for t, var in x[e].items() if t)
    for e in range(total):
        problem += pulp.lpSum(x[e].values()) == 1
    problem += pulp.lpSum(var for e in range(total) for t, var in x[e].items() if t in (1, 2)) <= host_experts
    result = solve(problem, time_limit)
    chosen = [max(x[e], key=lambda t: x[e][t].value() or 0) for e in range(total)]
    feasible = all((x[e][chosen[e]].value() or 0) > 0.5 for e in range(total))
    if not feasible:
        return _greedy(inputs, cost, pinned_room, host_experts, dynamic, transient, result.status)
    objective = float(sum(cost[e, chosen[e]] for e in range(total)))
    return Tiering([TIERS[t] for t in chosen], dynamic, objective, "ilp", result.solver, result.status, result.gap, result.seconds)


def _greedy(inputs, cost, pinned_room, host_experts, dynamic, transient, why) -> Tiering:
    """Fallback: pin the most used; the host RAM goes to the experts disk would cost most."""
    total = len(inputs.uses)
    tier = np.full(total, 3)
    order = inputs.most_used(total)
    tier[order[:pinned_room]] = 0
    rest = sorted(order[pinned_room:], key=lambda e: -cost[e, 3])
    for e in rest[:host_experts]:
        tier[e] = 2 if e in transient else 1
    objective = float(cost[np.arange(total), tier].sum())
    return Tiering([TIERS[t] for t in tier], dynamic, objective, "greedy", None, f"greedy fallback ({why})", None, 0.0)
