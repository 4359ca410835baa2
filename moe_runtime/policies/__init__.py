"""Cache eviction policies, one implementation each, shared by the runtime and the simulator.

`make_policy(name, num_layers=..., num_experts=..., capacity=..., fit=...)` builds one; policies
that learn from traces (pinned frequencies, next-use reuse model) take them from `fit`, never from
the stream they are replayed on.
"""

from __future__ import annotations

import os

import numpy as np

from ..trace import Trace, load_trace
from ..trace_stats import selection_counts
from .adaptive import AdaptivePolicy, starting_model
from .arc import ARCPolicy
from .base import EvictionPolicy, NoVictimError
from .lfu import LFUPolicy
from .lru import LRUPolicy
from .next_use import NextUsePolicy, ReuseModel
from .pinned import PinnedPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (LRUPolicy, LFUPolicy, ARCPolicy, PinnedPolicy, NextUsePolicy, AdaptivePolicy)
}
NEEDS_FIT = frozenset({"pinned"})
# Policies a trace of the user's task can fit: the adaptive default and next-use start from a
# reuse model fitted on it (the default still follows whichever candidate misses least, so a fit
# that misleads costs little: BENCHMARKS.md, "A fit that misleads"), pinned ranks by its frequencies.
FITTABLE = ("adaptive", "next-use", "pinned")
# The runtime's default: follows the best of LRU, LFU and next-use (the generic reuse model, and
# one refitted on the routing served) on the routing it sees, so it is safe on routing no table
# was fitted on (adaptive.py, BENCHMARKS.md).
DEFAULT_POLICY = "adaptive"


def selection_frequency(trace: Trace) -> np.ndarray:
    """[L, E] share of tokens that select each expert at each layer."""
    return selection_counts(trace) / trace.num_tokens


def make_policy(
    name: str | EvictionPolicy,
    *,
    num_layers: int | None = None,
    num_experts: int | None = None,
    capacity: int | None = None,
    top_k: int | None = None,
    fit: Trace | None = None,
) -> EvictionPolicy:
    """A fresh policy by name (or the instance given), shaped for L x E experts and `capacity`."""
    if isinstance(name, EvictionPolicy):
        _check_shape(name, num_layers, num_experts)
        return name
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    if name == "lru":
        return LRUPolicy(num_experts)
    if name == "lfu":
        return POLICIES[name]()
    if capacity is None or num_layers is None or num_experts is None:
        raise ValueError(f"the {name} policy needs num_layers, num_experts and capacity")
    if name == "arc":
        return ARCPolicy(capacity)
    if fit is not None:
        check_fit_shape(fit, num_layers, num_experts)
    if name == "pinned":
        if fit is None:
            raise ValueError("the pinned policy needs fit traces to rank experts by frequency")
        return PinnedPolicy(selection_frequency(fit), capacity, top_k or 1)
    if name == "adaptive":  # next-use twice: from its starting model (generic, or fitted on `fit`) and refitted on the routing served
        return AdaptivePolicy(starting_model(num_layers, num_experts, fit), num_layers=num_layers, num_experts=num_experts, capacity=capacity, top_k=top_k or 1)
    return NextUsePolicy(num_layers, num_experts, ReuseModel.fit(fit) if fit is not None else ReuseModel.generic(num_layers, num_experts))


def fit_trace(fit: Trace | str | os.PathLike, policy: str | EvictionPolicy) -> Trace:
    """`fit` (a trace file of the user's task, or a Trace) read and checked for `policy`, before
    any work: a file that is missing or damaged, or a policy with nothing to fit, is refused."""
    if not (isinstance(policy, str) and policy in FITTABLE):
        named = repr(policy) if isinstance(policy, str) else f"a {type(policy).__name__} instance"
        raise ValueError(f"policy_fit fits the {' / '.join(FITTABLE)} policies, not {named}: drop policy (the default is adaptive) or policy_fit")
    if isinstance(fit, Trace):
        return fit
    if isinstance(fit, (str, os.PathLike)):
        return load_trace(fit)
    raise TypeError(f"policy_fit must be a trace file (moe-runtime trace) or a Trace, got {type(fit).__name__}")


def check_fit_shape(fit: Trace, num_layers: int, num_experts: int) -> None:
    """A trace fits a policy only for the model it was recorded on (L x E experts)."""
    _refuse_another_shape("the fit trace was recorded on", (fit.num_layers, fit.num_experts), num_layers, num_experts, "record")


def _check_shape(policy: EvictionPolicy, num_layers: int | None, num_experts: int | None) -> None:
    """A policy built for L x E experts (next-use) must meet a model of the same shape; one that
    needs only E and was built without it (LRUPolicy()) takes the model's."""
    if isinstance(policy, LRUPolicy) and policy.num_experts is None:
        policy.num_experts = num_experts
    shape = (getattr(policy, "num_layers", num_layers), getattr(policy, "num_experts", num_experts))
    if num_layers is not None and num_experts is not None:
        _refuse_another_shape(f"the {policy.name} policy was built for", shape, num_layers, num_experts, "fit it on")


def _refuse_another_shape(made: str, shape: tuple[int, int], num_layers: int, num_experts: int, remedy: str) -> None:
    """ValueError where `shape` (layers, experts) is not the model's, naming both and the fix."""
    if shape != (num_layers, num_experts):
        raise ValueError(
            f"{made} {shape[0]} MoE layers x {shape[1]} experts but the model has {num_layers} x {num_experts}; "
            f"{remedy} a trace of this model (moe-runtime trace)"
        )


__all__ = [
    "DEFAULT_POLICY", "POLICIES", "AdaptivePolicy", "ARCPolicy", "EvictionPolicy", "LFUPolicy", "LRUPolicy", "NextUsePolicy", "NoVictimError", "PinnedPolicy", "ReuseModel",
    "check_fit_shape", "fit_trace", "make_policy", "selection_frequency",
]
