"""`moe-runtime bench`: cache policies and prefetching replayed on traces, against Belady.

configs (trace x policy x predictor x budget) -> fit on the fit traces (or the first half of
each replayed trace, by sequence) -> replay on the rest -> rows of per-token figures, with
Belady's MIN and the two time bounds (compute only; max(compute, Belady loads x load time)).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from .belady import belady_misses, layer_keys
from .execution import DEVICE, HOST, HYBRID
from .policies import DEFAULT_POLICY, POLICIES, make_policy
from .predictor import PREDICTORS, predictor_from
from .simulator import Prefetch, TimingModel, replay, replay_per_layer
from .trace import Trace

NO_PREDICTOR = "none"
DEFAULT = "default"  # bench's name for the runtime's default policy, built as wrap builds it


@dataclass(frozen=True)
class BenchRun:
    """One replay: which trace, policy, predictor (or none) and budget."""

    trace: str
    policy: str
    predictor: str
    budget: float
    execution: str = DEVICE


@dataclass(frozen=True)
class BenchSettings:
    budgets: tuple[float, ...] = (0.1, 0.25, 0.5)
    policies: tuple[str, ...] = ("lru",)
    predictors: tuple[str, ...] = (NO_PREDICTOR,)
    prefetch_width: int | None = None  # default: the trace's top-k
    lookahead: int = 1
    min_score: float = 0.0
    per_layer_slots: int | None = None
    timing: TimingModel = TimingModel()
    executions: tuple[str, ...] = (DEVICE,)  # device (load every miss), host, hybrid: see execution.py

    def __post_init__(self):
        for budget in self.budgets:
            if not 0 < budget <= 1:
                raise ValueError(f"bench budgets are fractions of all experts in (0, 1], got {budget}")
        unknown = [p for p in self.policies if p not in POLICIES and p != DEFAULT]
        if unknown:
            raise ValueError(f"unknown policy {unknown[0]!r}; choose from {', '.join(sorted(POLICIES))}, {DEFAULT} or all")
        unknown = [p for p in self.predictors if p != NO_PREDICTOR and p not in PREDICTORS and not Path(p).is_file()]
        if unknown:
            raise ValueError(f"unknown predictor {unknown[0]!r}; choose from {', '.join(sorted(PREDICTORS))}, all, or a predictor file")
        unknown = [e for e in self.executions if e not in (DEVICE, HOST, HYBRID)]
        if unknown:
            raise ValueError(f"unknown execution {unknown[0]!r}; choose from {DEVICE}, {HOST}, {HYBRID}")
        if self.per_layer_slots is not None and self.executions != (DEVICE,):
            raise ValueError("per-layer pools (--per-layer-slots) are replayed with loads only; drop --execution")
        if self.lookahead < 1:
            raise ValueError("lookahead must be at least 1 layer")
        if self.per_layer_slots is not None and any(p != NO_PREDICTOR for p in self.predictors):
            raise ValueError(
                "per-layer pools (--per-layer-slots) are replayed without prefetching; "
                "drop --predictor, or bench prefetching with one global pool (--budget)"
            )

    def check_trace(self, name: str, trace: Trace) -> None:
        """Refuse a replay the trace cannot have: per-layer pools smaller than one token's top-k."""
        if self.per_layer_slots is not None and self.per_layer_slots < trace.top_k:
            raise ValueError(
                f"--per-layer-slots {self.per_layer_slots} is below {name}'s top-k = {trace.top_k}: "
                f"a layer needs room for one token's experts; pass at least {trace.top_k}"
            )


@dataclass(frozen=True)
class Workload:
    """A trace to replay and the trace its learned parts are fitted on."""

    name: str
    fit: Trace
    replay: Trace
    split: bool  # True: fit/replay are the two halves of one trace, by sequence


def workloads(traces: dict[str, Trace], fit: Trace | None) -> list[Workload]:
    """Pair each replayed trace with its fit trace: `fit` if given, else its own first half."""
    if fit is not None:
        return [Workload(name, fit, trace, split=False) for name, trace in traces.items()]
    out = []
    for name, trace in traces.items():
        first, second = trace.split(0.5)
        out.append(Workload(name, first, second, split=True))
    return out


def plan(settings: BenchSettings, names: Sequence[str]) -> list[BenchRun]:
    return [
        BenchRun(name, policy, predictor, budget, execution)
        for name, policy, predictor, budget, execution in itertools.product(
            names, settings.policies, settings.predictors, settings.budgets, settings.executions,
        )
    ]


def one_layer(trace: Trace, layer: int) -> Trace:
    """The routing of one MoE layer as a one-layer trace (fit data of a per-layer pool)."""
    span = slice(layer, layer + 1)
    return Trace(trace.expert_ids[:, span], trace.gate_weights[:, span], trace.seq_offsets, trace.num_experts, trace.top_k)


def capacity_for(trace: Trace, budget: float) -> int:
    return max(trace.top_k, int(budget * trace.num_layers * trace.num_experts))


def policy_for(name: str, trace: Trace, capacity: int, fit: Trace | None):
    """The policy of a bench row: `default` is exactly what wrap uses when given nothing (no fit)."""
    if name == DEFAULT:
        return make_policy(DEFAULT_POLICY, num_layers=trace.num_layers, num_experts=trace.num_experts, capacity=capacity, top_k=trace.top_k)
    return make_policy(name, num_layers=trace.num_layers, num_experts=trace.num_experts, capacity=capacity, top_k=trace.top_k, fit=fit)


def run_one(run: BenchRun, work: Workload, settings: BenchSettings, forecasts: dict) -> dict:
    """Replay one configuration; returns a JSON-ready row."""
    trace = work.replay
    capacity = capacity_for(trace, run.budget)
    if settings.per_layer_slots:
        slots = settings.per_layer_slots
        layer_policy = lambda layer: policy_for(run.policy, one_layer(trace, layer), slots, one_layer(work.fit, layer))  # noqa: E731
        result = replay_per_layer(trace, layer_policy, slots, settings.timing)
    else:
        policy = policy_for(run.policy, trace, capacity, work.fit)
        prefetch = None
        if run.predictor != NO_PREDICTOR:
            width = settings.prefetch_width or trace.top_k
            prefetch = Prefetch(forecasts[run.predictor], width, settings.lookahead, settings.min_score)
        pinned = getattr(policy, "pinned", frozenset())
        result = replay(trace, policy, capacity, timing=settings.timing, prefetch=prefetch, pinned=pinned, execution=run.execution)
    row = {**asdict(run), "capacity": capacity, **result.per_token()}
    row["tokens_per_second"] = 1e3 / row["ms_per_token"] if row["ms_per_token"] > 0 else 0.0
    return row


def belady_row(name: str, work: Workload, budget: float, settings: BenchSettings) -> dict:
    trace = work.replay
    if settings.per_layer_slots:
        misses = sum(
            belady_misses(trace.expert_ids[:, layer].astype("int64").reshape(-1), trace.top_k, settings.per_layer_slots)
            for layer in range(trace.num_layers)
        )
    else:
        misses = belady_misses(layer_keys(trace.expert_ids, trace.num_experts), trace.top_k, capacity_for(trace, budget))
    uses = trace.num_tokens * trace.num_layers * trace.top_k
    loads = misses / trace.num_tokens
    timing = settings.timing
    compute_ms = trace.num_layers * timing.layer_ms
    return {
        "trace": name,
        "budget": budget,
        "hit_rate": 1 - misses / uses,
        "loads_per_token": loads,
        "compute_bound_ms_per_token": compute_ms,
        "bound_ms_per_token": max(compute_ms, loads * timing.load_ms),
    }


def fitted_predictor(name_or_path: str, fit: Trace):
    """A predictor file as saved, or a kind fitted on `fit`."""
    predictor, fitted = predictor_from(name_or_path)
    return predictor if fitted else predictor.fit(fit)


def run_bench(
    traces: dict[str, Trace],
    settings: BenchSettings,
    fit: Trace | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Every configuration of `settings` on every trace; KeyboardInterrupt returns what finished."""
    for name, trace in traces.items():
        settings.check_trace(name, trace)
    work = {w.name: w for w in workloads(traces, fit)}
    runs = plan(settings, list(work))
    results, belady, interrupted = [], [], False
    forecasts: dict[str, dict] = {}
    try:
        for name, item in work.items():
            forecasts[name] = {
                predictor: fitted_predictor(predictor, item.fit).forecast_trace(item.replay, settings.lookahead)
                for predictor in settings.predictors
                if predictor != NO_PREDICTOR
            }
            budgets = settings.budgets if not settings.per_layer_slots else settings.budgets[:1]
            belady.extend(belady_row(name, item, budget, settings) for budget in budgets)
        for run in runs:
            results.append(run_one(run, work[run.trace], settings, forecasts[run.trace]))
            if progress:
                progress(1)
    except KeyboardInterrupt:
        interrupted = True
    return {
        "fit": "--fit traces" if fit is not None else "first half of each trace's sequences (replayed: second half)",
        "timing": {**asdict(settings.timing), "load_ms": settings.timing.load_ms, "host_ms": settings.timing.host_ms},
        "per_layer_slots": settings.per_layer_slots,
        "results": results,
        "belady": belady,
        "interrupted": interrupted,
    }
