"""The adaptive default's candidates compiled (candidates.cpp, built on first use like the CPU
decode kernels), making exactly candidates.py's decisions.

The cache calls the default on every expert use, load and eviction and at every layer step; in
Python its four rankers and four shadows cost 30-91 us per layer step on the 2-core EPYC of
BENCHMARKS.md. Here the events go straight to the compiled object (bound methods, no Python
frame of ours in between); only forecasts and refits pass through Python, to convert their arrays.
`available()` is False where the extension cannot be built or MOE_RUNTIME_CPU_KERNEL=torch is set;
the default then runs candidates.py.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..kernels.cpu_build import build
from .lfu import AGE_EVERY
from .next_use import AGE_CAP, IDLE_PER_WAIT, WINDOW, ReuseModel, summarize_prompt

SOURCE = Path(__file__).with_name("candidates.cpp")


@lru_cache(maxsize=None)
def extension():
    """The compiled module, or None where it cannot be had (cpu_build.build)."""
    return build(SOURCE, "moe_runtime_policy_candidates", "cache policy's candidates", "about 20 s")


def available() -> bool:
    return extension() is not None


class NativeCandidates:
    """candidates.Candidates' interface over the compiled object."""

    def __init__(
        self, model: ReuseModel, sampled_model: ReuseModel, *, num_layers: int, num_experts: int, sampled: list[int], shadow_slots: int,
        decay: float, keep: float, prior: float, settle: int, forget: float,
    ):
        self.num_experts = num_experts
        self.core = extension().Candidates(
            num_layers, num_experts, sampled, shadow_slots, decay, keep, prior, settle, forget, AGE_EVERY, AGE_CAP, WINDOW, IDLE_PER_WAIT,
            _operands(model), _operands(sampled_model),
        )
        self.layer_start, self.insert, self.access, self.evict, self.victim = (
            self.core.layer_start, self.core.insert, self.core.access, self.core.evict, self.core.victim,
        )

    def forecast(self, layer: int, probabilities) -> None:
        self.core.forecast(layer, torch.as_tensor(np.asarray(probabilities, dtype=np.float64)))

    def prompt(self, layer: int, routing) -> None:
        summary = summarize_prompt(routing, self.num_experts)
        self.core.prompt(layer, [experts.tolist() for experts in summary.recent], summary.idle.tolist(), summary.tokens)

    def use_model(self, candidate: int, model: ReuseModel, sampled_model: ReuseModel) -> None:
        self.core.use_model(candidate, _operands(model), _operands(sampled_model))

    @property
    def leader(self) -> int:
        return self.core.leader

    @property
    def switches(self) -> int:
        return self.core.switches

    @property
    def misses(self) -> np.ndarray:
        return np.array(self.core.misses)

    def scores(self) -> np.ndarray:
        return np.array(self.core.scores)


def _operands(model: ReuseModel) -> tuple:
    """(row, wait, forecasts, age stride, transitions, edges): the model as NextUsePolicy reads it."""
    row, wait, forecasts, age_stride = model.flat_layout()
    transitions = np.zeros(0, dtype=np.float32) if model.transitions is None else model.transitions
    return (
        torch.from_numpy(np.ascontiguousarray(row, dtype=np.int64)), torch.from_numpy(np.ascontiguousarray(wait, dtype=np.float64)), forecasts, age_stride,
        torch.from_numpy(np.ascontiguousarray(transitions, dtype=np.float32)), torch.from_numpy(np.ascontiguousarray(model.forecast_edges, dtype=np.float64)),
    )
