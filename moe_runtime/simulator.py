"""Trace replay: a cache policy (+ prefetching) over a routing trace, with a timing model.

tokens in order -> layers in order -> a layer's K experts together (protected while it runs)
-> hits / misses decided by the live runtime's own cache core (cache_core.py: residency,
eviction policy, pinned and transient experts, prefetch accounting) -> the top M forecast
experts of layer l + D prefetched as layer l starts, queued behind its misses (as the runtime
issues them while the layer's loads are in flight), so they overlap its compute -> one copy
engine, misses ahead of queued prefetches -> modelled ms per token. Optionally each sequence's
first tokens come as one prefill step (a prompt): per layer the union of their experts, in
waves that fit the pool, and the policy told each token's routing, as the runtime serves one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from .runtime.cache_core import CacheCore
from .execution import DEVICE, HOST, HYBRID, HybridCostModel
from .policies import EvictionPolicy
from .prefetch_gate import PrefetchGate
from .stats import RuntimeStats
from .trace import Trace


@dataclass(frozen=True)
class TimingModel:
    """Load time per expert, CPU time per expert and token, and compute time per MoE layer, in ms.

    Defaults: DeepSeek-V2-Lite experts (17.3 MB in bf16) over PCIe 4.0 x16 (25 GB/s pinned); a
    CPU computing an expert from its RAM reads its bytes at 40 GB/s (decode is bandwidth-bound).
    """

    expert_mb: float = 17.3
    h2d_gbps: float = 25.0
    layer_ms: float = 0.25
    host_gbps: float = 40.0

    def __post_init__(self):
        if self.expert_mb <= 0 or self.h2d_gbps <= 0 or self.host_gbps <= 0 or self.layer_ms < 0:
            raise ValueError("expert_mb, h2d_gbps and host_gbps must be positive and layer_ms non-negative")

    @property
    def load_ms(self) -> float:
        return self.expert_mb * 1e6 / (self.h2d_gbps * 1e9) * 1e3

    @property
    def host_ms(self) -> float:
        """One expert computed on the CPU for one token: its bytes read at host_gbps."""
        return self.expert_mb * 1e6 / (self.host_gbps * 1e9) * 1e3

    def costs(self) -> HybridCostModel:
        """The runtime's cost model with these constants (the device's per-expert compute is in layer_ms)."""
        return HybridCostModel(load_ms=self.load_ms, host_ms=self.host_ms)


@dataclass(frozen=True)
class Prefetch:
    """Prefetch the top `width` experts forecast for layer l + `lookahead` after layer l.

    scores: [T, L, E] from a predictor's forecast_trace for that lookahead; only experts scoring
    at least `min_score` are fetched (a confidence threshold that keeps wasted loads down), and,
    `gated`, only those whose expected saving beats their expected cost (PrefetchGate, as the
    runtime decides).
    """

    scores: np.ndarray
    width: int
    lookahead: int
    min_score: float = 0.0
    gated: bool = True  # PrefetchGate: only when the expected saving beats the expected cost


@dataclass
class SimResult:
    tokens: int
    hits: int = 0
    misses: int = 0
    loads: int = 0
    prefetch_loads: int = 0
    prefetch_hits: int = 0  # a prefetched expert used before eviction
    late_prefetches: int = 0  # ... whose load had not finished when its layer started
    wasted_prefetches: int = 0  # a prefetched expert evicted (or left) unused
    host_computes: int = 0  # misses computed on the CPU (host and hybrid execution)
    admissions: int = 0  # background loads of CPU-computed experts (hybrid)
    prompt_loads: int = 0  # ... of the loads, those of prefill steps (replay's prompts)
    stall_ms: float = 0.0
    total_ms: float = 0.0

    @property
    def hit_rate(self) -> float:
        uses = self.hits + self.misses
        return self.hits / uses if uses else 0.0

    def per_token(self) -> dict:
        out = {k: v / self.tokens for k, v in asdict(self).items() if k != "tokens"}
        return {
            "hit_rate": self.hit_rate,
            "loads_per_token": out["loads"],
            "misses_per_token": out["misses"],
            "prefetch_hits_per_token": out["prefetch_hits"],
            "late_prefetches_per_token": out["late_prefetches"],
            "wasted_prefetches_per_token": out["wasted_prefetches"],
            "host_computes_per_token": out["host_computes"],
            "stall_ms_per_token": out["stall_ms"],
            "ms_per_token": out["total_ms"],
        }


class CopyEngine:
    """One host-to-device copy engine: demand loads jump ahead of queued prefetches."""

    def __init__(self):
        self.queue: deque[list] = deque()  # [key, start, end] of prefetches not yet finished
        self.busy_until = 0.0  # end of the last transfer scheduled

    def prefetch(self, key: int, now: float, duration: float) -> float:
        start = max(now, self.busy_until)
        self.busy_until = start + duration
        self.queue.append([key, start, self.busy_until])
        return self.busy_until

    def in_flight_end(self, now: float) -> float:
        """When the transfer in flight at `now` ends (demand loads wait for it, not for the
        queued prefetches behind it); `now` when the engine is idle."""
        while self.queue and self.queue[0][2] <= now:
            self.queue.popleft()
        return self.queue[0][2] if self.queue and self.queue[0][1] <= now else now

    def demand(self, duration: float, now: float, ready: dict[int, float]) -> float:
        """Load missed experts taking `duration` ms now; queued prefetches not yet started move back."""
        done = self.in_flight_end(now) + duration
        delay = duration
        for item in self.queue:
            if item[1] > now:
                item[1] += delay
                item[2] += delay
                ready[item[0]] = item[2]
        self.busy_until = max(self.busy_until + delay, done)
        return done


def replay(
    trace: Trace,
    policy: EvictionPolicy,
    capacity: int,
    *,
    timing: TimingModel = TimingModel(),
    prefetch: Prefetch | None = None,
    pinned: frozenset[int] = frozenset(),
    load_ms_of: np.ndarray | None = None,
    transient: frozenset[int] = frozenset(),
    miss_counts: np.ndarray | None = None,
    execution: str = DEVICE,
    prompts: np.ndarray | None = None,
) -> SimResult:
    """Replay `trace` through `policy` with one global pool of `capacity` slots.

    The decisions are the live runtime's own (cache_core.CacheCore, in the runtime's order: a
    layer's experts acquired, the next layer's prefetches issued, the layer's experts released);
    this adds the clock. Pinned experts are loaded before the first token and not counted, as
    the runtime does. load_ms_of [L*E]: per-expert load time (e.g. disk-tier experts cost more),
    default the timing model's; transient: experts loaded on use but not kept after their layer
    (the host tier). execution: "device" (every miss loaded), "host" (every expert computed
    on the CPU, which works while the device computes the rest of the layer: a layer takes
    max(layer_ms, K x host_ms); no pool) or "hybrid" (each miss to the engine that finishes it
    first, as the runtime decides it (HybridCostModel); the layer ends when both have; an idle
    copy engine admits the CPU's experts in the background). prompts [S]: how many of each
    sequence's first tokens come as one prefill step (`_prefill`; device execution, no
    prefetching); result.prompt_loads counts its loads.
    """
    if execution not in (DEVICE, HOST, HYBRID):
        raise ValueError(f"execution must be one of {DEVICE}, {HOST}, {HYBRID}, got {execution!r}")
    prefills = _prefill_steps(trace, prompts, execution == DEVICE and prefetch is None)
    num_layers, num_experts = trace.num_layers, trace.num_experts
    if capacity < trace.top_k + len(pinned):
        raise ValueError(f"capacity {capacity} is below top-k {trace.top_k} plus {len(pinned)} pinned experts")
    stats = RuntimeStats(num_layers)
    core = CacheCore(num_experts=num_experts, num_slots=capacity, policy=policy, stats=stats, pinned=pinned, transient=transient)
    _load_pinned(core, num_layers)
    top = None
    if prefetch is not None:
        top = np.argsort(-prefetch.scores, axis=2, kind="stable")[:, :, : prefetch.width]
        confident = np.take_along_axis(prefetch.scores, top, axis=2) >= prefetch.min_score
        top = np.where(confident, top, -1)
    result = SimResult(tokens=trace.num_tokens)
    ready: dict[int, float] = {}  # key -> when its prefetch lands
    engine = CopyEngine()
    cost = [timing.load_ms] * (num_layers * num_experts) if load_ms_of is None else np.asarray(load_ms_of, dtype=float).tolist()
    costs = timing.costs()
    gate = PrefetchGate(load_ms=timing.load_ms, layer_ms=timing.layer_ms)
    now = 0.0
    ids = trace.expert_ids.astype(np.int64)
    prompt_end = 0
    for token, layers in enumerate(ids.tolist()):  # [L][K] per token
        if token < prompt_end:
            continue
        if token in prefills:
            prompt_end = prefills[token]
            now, loads = _prefill(core, ids[token:prompt_end], engine, cost, now, timing.layer_ms)
            result.prompt_loads += loads
            continue
        for layer, experts in enumerate(layers):
            core.start_layer(layer, experts)
            on_host: list[int] = []
            if execution == HOST:
                on_host = experts
            elif execution == HYBRID:
                missed = [e for e in experts if core.key(layer, e) not in core.slot_of]
                on_host = costs.split(missed, {}, engine.in_flight_end(now) - now, timing.layer_ms)[1] if missed else []
            on_device = [e for e in experts if e not in on_host] if on_host else experts
            if on_host:
                core.compute_elsewhere(layer, on_host)
            accesses = core.acquire(layer, on_device)
            latest_ready = now
            for access in accesses:
                if access.prefetched and ready.get(access.key, 0.0) > now:
                    result.late_prefetches += 1
                    latest_ready = max(latest_ready, ready[access.key])
            missed = [access.key for access in accesses if not access.hit]
            if missed:
                if miss_counts is not None:
                    np.add.at(miss_counts, missed, 1)
                latest_ready = max(latest_ready, engine.demand(sum(cost[key] for key in missed), now, ready))
            result.stall_ms += latest_ready - now
            started, now = now, max(latest_ready + timing.layer_ms, now + len(on_host) * costs.host_ms)
            if top is not None and layer + prefetch.lookahead < num_layers:  # issued as the runtime does, behind the layer's misses
                target = layer + prefetch.lookahead
                core.forecast(target, prefetch.lookahead, np.clip(prefetch.scores[token, layer], 0.0, 1.0))  # as the runtime does
                wanted = [int(e) for e in top[token, layer] if e >= 0]
                forecast = {e: float(np.clip(prefetch.scores[token, layer, e], 0.0, 1.0)) for e in wanted}
                if prefetch.gated:
                    resident = core.slot_of
                    candidates = [(e, forecast[e]) for e in wanted if core.key(target, e) not in resident]
                    wanted = gate.select(candidates, prefetch.lookahead, engine.busy_until - started, core.prefetch_outcomes)
                for access in core.prefetch(target, wanted, probabilities=forecast):
                    ready[access.key] = engine.prefetch(access.key, started, cost[access.key])
            core.release(layer, on_device)
            if execution == HYBRID and on_host and engine.busy_until <= now and core.admission_value.worthwhile():  # as the runtime
                for access in core.prefetch(layer, on_host, admission=True):
                    ready[access.key] = engine.prefetch(access.key, now, cost[access.key])
    total = stats.total()
    result.hits, result.misses, result.loads = total.hits, total.misses, total.loads
    result.prefetch_loads, result.prefetch_hits = total.prefetches_issued, total.prefetches_used
    result.host_computes, result.admissions = total.host_computes, total.admissions
    result.wasted_prefetches = core.wasted_prefetches + len(core.prefetched)
    result.total_ms = now
    return result


def _prefill_steps(trace: Trace, prompts: np.ndarray | None, supported: bool) -> dict[int, int]:
    """{first token: token after it} of each sequence's prompt (none of fewer than 2 tokens)."""
    if prompts is None:
        return {}
    prompts = np.asarray(prompts)
    starts, lengths = trace.seq_offsets[:-1], np.diff(trace.seq_offsets)
    if prompts.shape != starts.shape or (prompts < 0).any() or (prompts > lengths).any():
        raise ValueError(f"prompts must give 0 to the sequence's length for each of the {len(starts)} sequences, got {prompts.tolist()}")
    if not supported:
        raise ValueError("prompts are replayed with execution 'device' and no prefetching")
    return {int(start): int(start + length) for start, length in zip(starts, prompts) if length > 1}


def _prefill(core: CacheCore, routing: np.ndarray, engine: CopyEngine, cost: list[float], now: float, layer_ms: float) -> tuple[float, int]:
    """One prefill step of the T tokens `routing` [T, L, K], as the runtime serves it: at each
    layer the union of their experts (router order) in waves that fit the pool, each wave's misses
    loaded and then one layer step of compute, the policy told every token's experts. Returns
    the clock after it and its loads."""
    loads = 0
    for layer in range(routing.shape[1]):
        rows = routing[:, layer]
        experts = list(dict.fromkeys(rows.ravel().tolist()))
        core.start_layer(layer, experts)
        core.policy.on_prompt(layer, rows[None])
        for wave in core.waves(layer, experts):
            missed = [access.key for access in core.acquire(layer, wave) if not access.hit]
            loads += len(missed)
            now = max(now, engine.demand(sum(cost[key] for key in missed), now, {})) + layer_ms
            core.release(layer, wave)
    return now, loads


def _load_pinned(core: CacheCore, num_layers: int) -> None:
    """Pinned experts take their slots before the first token, uncounted (as the runtime's install)."""
    for layer in range(num_layers):
        experts = [key - layer * core.num_experts for key in sorted(core.pinned) if key // core.num_experts == layer]
        if experts:
            core.acquire(layer, experts)
            core.release(layer, experts)
    core.stats.reset()


def replay_per_layer(trace: Trace, layer_policy: Callable[[int], EvictionPolicy], slots: int, timing: TimingModel = TimingModel()) -> SimResult:
    """Per-layer pools of `slots` each (as the literature reports them); `layer_policy(l)` builds
    layer l's policy (keys are expert ids of that layer). Each layer's pool is a CacheCore of
    its own; loads are not overlapped with compute."""
    if slots < trace.top_k:
        raise ValueError(f"per-layer slots {slots} is below top-k {trace.top_k}")
    result = SimResult(tokens=trace.num_tokens)
    for layer in range(trace.num_layers):
        stats = RuntimeStats(1)
        core = CacheCore(num_experts=trace.num_experts, num_slots=slots, policy=layer_policy(layer), stats=stats)
        for experts in trace.expert_ids[:, layer].astype(np.int64).tolist():
            core.start_layer(0, experts)
            core.acquire(0, experts)
            core.release(0, experts)
        result.hits += stats.layers[0].hits
        result.misses += stats.layers[0].misses
    result.loads = result.misses
    result.total_ms = trace.num_tokens * trace.num_layers * timing.layer_ms + result.misses * timing.load_ms
    return result
