"""Trace replay: a cache policy (+ prefetching) over a routing trace, with a timing model.

tokens in order -> layers in order -> a layer's K experts together (protected while it runs)
-> hits / misses through the same EvictionPolicy objects the live runtime uses -> after the
layer, the top M forecast experts of layer l + D are prefetched -> one copy engine, misses ahead
of queued prefetches -> modelled ms per token.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from .policies import EvictionPolicy
from .trace import Trace


@dataclass(frozen=True)
class TimingModel:
    """Load time per expert and compute time per MoE layer, in ms.

    Defaults: DeepSeek-V2-Lite experts (17.3 MB in bf16) over PCIe 4.0 x16 (25 GB/s pinned).
    """

    expert_mb: float = 17.3
    h2d_gbps: float = 25.0
    layer_ms: float = 0.25

    def __post_init__(self):
        if self.expert_mb <= 0 or self.h2d_gbps <= 0 or self.layer_ms < 0:
            raise ValueError("expert_mb and h2d_gbps must be positive and layer_ms non-negative")

    @property
    def load_ms(self) -> float:
        return self.expert_mb * 1e6 / (self.h2d_gbps * 1e9) * 1e3


@dataclass(frozen=True)
class Prefetch:
    """Prefetch the top `width` experts forecast for layer l + `lookahead` after layer l.

    scores: [T, L, E] from a predictor's forecast_trace for that lookahead; only experts scoring
    at least `min_score` are fetched (a confidence threshold that keeps wasted loads down).
    """

    scores: np.ndarray
    width: int
    lookahead: int
    min_score: float = 0.0


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

    def demand(self, duration: float, now: float, ready: dict[int, float]) -> float:
        """Load missed experts taking `duration` ms now; queued prefetches not yet started move back."""
        while self.queue and self.queue[0][2] <= now:
            self.queue.popleft()
        in_flight_end = now
        if self.queue and self.queue[0][1] <= now:
            in_flight_end = self.queue[0][2]
        done = in_flight_end + duration
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
    bypass: frozenset[int] = frozenset(),
    miss_counts: np.ndarray | None = None,
) -> SimResult:
    """Replay `trace` through `policy` with one global pool of `capacity` slots.

    load_ms_of [L*E]: per-expert load time (e.g. disk-tier experts cost more), default the
    timing model's; bypass: experts loaded on use but not kept after their layer (host tier).
    """
    num_layers, num_experts = trace.num_layers, trace.num_experts
    if capacity < trace.top_k + len(pinned):
        raise ValueError(f"capacity {capacity} is below top-k {trace.top_k} plus {len(pinned)} pinned experts")
    ids = trace.expert_ids.astype(np.int64) + (np.arange(num_layers, dtype=np.int64) * num_experts)[None, :, None]
    groups = ids.reshape(-1, trace.top_k).tolist()
    top = None
    if prefetch is not None:
        top = np.argsort(-prefetch.scores, axis=2, kind="stable")[:, :, : prefetch.width]
        confident = np.take_along_axis(prefetch.scores, top, axis=2) >= prefetch.min_score
        top = np.where(confident, top, -1)
    result = SimResult(tokens=trace.num_tokens)
    resident: set[int] = set()  # pinned experts load at first use (counted), then never leave
    prefetched: set[int] = set()
    ready: dict[int, float] = {}
    engine = CopyEngine()
    cost = [timing.load_ms] * (num_layers * num_experts) if load_ms_of is None else np.asarray(load_ms_of, dtype=float).tolist()
    now = 0.0
    for index, group in enumerate(groups):
        token, layer = divmod(index, num_layers)
        policy.on_layer_start(layer, group)
        protected = set(group)
        evictable = lambda key: key not in protected and key not in pinned  # noqa: E731
        misses = 0
        miss_ms = 0.0
        latest_ready = now
        for key in group:
            if key in resident:
                result.hits += 1
                if key not in pinned:
                    policy.on_access(key)
                if key in prefetched:
                    prefetched.discard(key)
                    result.prefetch_hits += 1
                    if ready.get(key, 0.0) > now:
                        result.late_prefetches += 1
                        latest_ready = max(latest_ready, ready[key])
            else:
                misses += 1
                miss_ms += cost[key]
                if miss_counts is not None:
                    miss_counts[key] += 1
                if len(resident) >= capacity:
                    _evict(policy, evictable, resident, prefetched, result)
                resident.add(key)
                if key not in pinned:  # the policy never sees pinned keys: no victim scan passes them
                    policy.on_insert(key)
                    policy.on_access(key)
        result.misses += misses
        result.loads += misses
        if misses:
            latest_ready = max(latest_ready, engine.demand(miss_ms, now, ready))
        for key in bypass.intersection(group):  # host-tier experts do not stay
            if key in resident:
                policy.on_evict(key)
                resident.discard(key)
        result.stall_ms += latest_ready - now
        now = latest_ready + timing.layer_ms
        if top is not None and layer + prefetch.lookahead < num_layers:
            target_layer = layer + prefetch.lookahead
            policy.on_forecast(target_layer, prefetch.scores[token, layer])
            target = target_layer * num_experts
            for expert in top[token, layer]:
                key = target + int(expert)
                if expert < 0 or key in resident:
                    continue
                if len(resident) >= capacity:
                    try:
                        _evict(policy, evictable, resident, prefetched, result)
                    except RuntimeError:
                        break
                resident.add(key)
                prefetched.add(key)
                policy.on_insert(key)
                ready[key] = engine.prefetch(key, now, cost[key])
                result.loads += 1
                result.prefetch_loads += 1
    result.wasted_prefetches += len(prefetched)
    result.total_ms = now
    return result


def _evict(policy, evictable, resident: set[int], prefetched: set[int], result: SimResult) -> None:
    victim = policy.choose_victim(evictable)
    policy.on_evict(victim)
    resident.discard(victim)
    if victim in prefetched:
        prefetched.discard(victim)
        result.wasted_prefetches += 1


def replay_per_layer(trace: Trace, layer_policy: Callable[[int], EvictionPolicy], slots: int, timing: TimingModel = TimingModel()) -> SimResult:
    """Per-layer pools of `slots` each (as the literature reports them); `layer_policy(l)` builds
    layer l's policy (keys are expert ids of that layer)."""
    result = SimResult(tokens=trace.num_tokens)
    if slots < trace.top_k:
        raise ValueError(f"per-layer slots {slots} is below top-k {trace.top_k}")
    for layer in range(trace.num_layers):
        policy = layer_policy(layer)
        resident: set[int] = set()
        for group in trace.expert_ids[:, layer].tolist():
            protected = set(group)
            policy.on_layer_start(0, group)
            for key in group:
                if key in resident:
                    result.hits += 1
                    policy.on_access(key)
                    continue
                result.misses += 1
                if len(resident) >= slots:
                    victim = policy.choose_victim(lambda k: k not in protected)
                    policy.on_evict(victim)
                    resident.discard(victim)
                resident.add(key)
                policy.on_insert(key)
                policy.on_access(key)
    result.loads = result.misses
    result.total_ms = trace.num_tokens * trace.num_layers * timing.layer_ms + result.misses * timing.load_ms
    return result
