"""Runtime counters, per MoE layer and in total.

An expert use is one (forward call, MoE layer, distinct expert) lookup: a decode step at batch 1
makes K uses per layer; a prefill makes one use per distinct expert its tokens chose. Every use
is a hit (resident, or prefetched and at most still in flight) or a miss (a blocking load, or
under hybrid execution a computation on the CPU), so hits + misses = uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class LayerCounters:
    hits: int = 0
    misses: int = 0
    loads: int = 0  # copies into slots: misses + prefetches
    bytes_loaded: int = 0
    prefetches_issued: int = 0
    prefetches_used: int = 0  # a prefetched expert used before its eviction
    late_prefetches: int = 0  # ... that was still loading when its layer needed it
    host_computes: int = 0  # misses computed on the CPU where they lie (hybrid), or from low-bit copies (miss_precision): no load
    admissions: int = 0  # background loads of experts the CPU computed, admitted to the pool
    waves: int = 0  # extra passes when a layer needed more distinct experts than slots
    stall_seconds: float = 0.0  # time compute waited for loads

    def add(self, other: LayerCounters) -> None:
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_dict(self) -> dict:
        out = asdict(self)
        uses = self.hits + self.misses
        out["hit_rate"] = self.hits / uses if uses else 0.0
        return out


class RuntimeStats:
    """Counters of every MoE layer plus what ran (compute path, slots, tiers)."""

    def __init__(self, num_layers: int):
        self.layers = [LayerCounters() for _ in range(num_layers)]
        self.info: dict = {}
        self.paths: dict[str, int] = {}  # compute path -> layer calls that ran on it

    def reset(self) -> None:
        self.layers = [LayerCounters() for _ in self.layers]
        self.paths = {}

    def total(self) -> LayerCounters:
        total = LayerCounters()
        for layer in self.layers:
            total.add(layer)
        return total

    def as_dict(self) -> dict:
        out = self.total().as_dict()
        out["per_layer"] = [layer.as_dict() for layer in self.layers]
        out.update(self.info)
        out["compute_calls"] = dict(self.paths)
        return out
