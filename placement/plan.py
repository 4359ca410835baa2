"""Placement plans as JSON: what the `place` command writes and `wrap(placement=...)` follows.

{"kind": "multi_gpu", "device_of": [[device of each expert] per MoE layer], "method": ...,
 "cut_fraction": ..., ...} or {"kind": "tiering", "tier_of": [[tier per expert] per layer],
 "dynamic_slots": N, ...} or {"kind": "disk_layout", "disk_order": [[expert ids in file order] per
layer], "runs_per_read": ..., ...}; a tiering plan carries a "disk_order" too, for the experts it
leaves on disk. All carry "shape": {"num_layers", "num_experts", "top_k"} and the traces they
were made from. A plan for another model shape is refused. `load_plan` turns the JSON into a
typed plan (MultiGpuPlan, TieringPlan, DiskLayoutPlan), validated field by field; nothing past
the loader reads the dict.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from moe_runtime.atomic import write_text_atomically
from moe_runtime.errors import InvalidFileError
from moe_runtime.checked_reading import read_json

from .tiering import TIERS

KINDS = ("multi_gpu", "tiering", "disk_layout")
TABLES = {"multi_gpu": "device_of", "tiering": "tier_of", "disk_layout": "disk_order"}


@dataclass(frozen=True)
class PlacementPlan:
    """A validated plan: its model shape (L, E), its table [L][E] (`TABLES[kind]`), and the
    store order it asks for (a disk layout's, or a tiering plan's for the experts it leaves on
    disk). `details` keeps the rest of the JSON (method, traces, figures) for reports."""

    kind: ClassVar[str]
    num_layers: int
    num_experts: int
    disk_order: list[list[int]] | None
    details: dict

    def check_shape(self, num_layers: int, num_experts: int) -> None:
        if (self.num_layers, self.num_experts) != (num_layers, num_experts):
            raise ValueError(
                f"this placement plan was made for (L, E) = {(self.num_layers, self.num_experts)}, "
                f"the model has {(num_layers, num_experts)}"
            )

    def to_dict(self) -> dict:
        return dict(self.details)


@dataclass(frozen=True)
class MultiGpuPlan(PlacementPlan):
    """Every expert resident on one of `gpus` devices: device_of[layer][expert]."""

    kind: ClassVar[str] = "multi_gpu"
    gpus: int = 1
    device_of: list[list[int]] = field(default_factory=list)

    def experts_on(self, device: int) -> int:
        return sum(row.count(device) for row in self.device_of)


@dataclass(frozen=True)
class TieringPlan(PlacementPlan):
    """Each expert's tier (pinned / dynamic / host / disk: tiering.TIERS) and the slots left to caching."""

    kind: ClassVar[str] = "tiering"
    tier_of: list[list[str]] = field(default_factory=list)
    dynamic_slots: int = 0

    def keys_in(self, tier: str) -> list[int]:
        """Cache keys (layer * E + expert) of the experts in `tier`."""
        return [layer * self.num_experts + expert for layer, row in enumerate(self.tier_of) for expert, name in enumerate(row) if name == tier]

    def ram_experts(self) -> frozenset[tuple[int, int]] | None:
        """(layer, expert) pairs held in host RAM (dynamic and host tiers) when the plan puts
        others on disk; None when it leaves RAM to the budget (no disk tier)."""
        if not any("disk" in row for row in self.tier_of):
            return None
        return frozenset((layer, e) for layer, row in enumerate(self.tier_of) for e, tier in enumerate(row) if tier in ("dynamic", "host"))

    def tier_counts(self) -> dict[str, int]:
        """How many experts the plan puts in each tier."""
        flat = [tier for row in self.tier_of for tier in row]
        return {tier: flat.count(tier) for tier in TIERS}


@dataclass(frozen=True)
class DiskLayoutPlan(PlacementPlan):
    """Only a store file order: disk_order[layer] lists the experts in file order."""

    kind: ClassVar[str] = "disk_layout"


def validate_plan(plan: dict) -> PlacementPlan:
    """The typed plan of a plan's JSON form, or ValueError naming the bad field."""
    kind = plan.get("kind")
    if kind not in KINDS:
        raise ValueError(f"plan field 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    shape = plan.get("shape") or {}
    layers, experts = shape.get("num_layers"), shape.get("num_experts")
    if not isinstance(layers, int) or not isinstance(experts, int):
        raise ValueError("plan field 'shape' needs num_layers and num_experts")
    table = np.asarray(plan.get(TABLES[kind]))
    if table.shape != (layers, experts):
        raise ValueError(f"plan field {TABLES[kind]!r} must be [L, E] = {(layers, experts)}, got {table.shape}")
    order = plan.get("disk_order")
    if order is not None:
        order = np.asarray(order)
        _validate_disk_order(order, layers, experts)
        order = order.tolist()
    common = {"num_layers": layers, "num_experts": experts, "disk_order": order, "details": dict(plan)}
    if kind == "multi_gpu":
        gpus = plan.get("gpus")
        if not isinstance(gpus, int) or gpus < 1 or experts % gpus:
            raise ValueError(f"plan field 'gpus' must divide the {experts} experts, got {gpus}")
        if not np.issubdtype(table.dtype, np.integer):
            raise ValueError(f"plan 'device_of' must hold device indices (ints), got {table.dtype}")
        if table.min() < 0 or table.max() >= gpus:
            raise ValueError(f"plan 'device_of' must hold device indices in [0, {gpus})")
        counts = np.stack([np.bincount(row, minlength=gpus) for row in table.astype(np.int64)])
        if (counts != experts // gpus).any():
            raise ValueError(f"plan 'device_of' must put exactly {experts // gpus} experts of every layer on each of {gpus} devices")
        return MultiGpuPlan(**common, gpus=gpus, device_of=table.astype(np.int64).tolist())
    if kind == "tiering":
        unknown = {str(tier) for tier in table.ravel()} - set(TIERS)
        if unknown:
            raise ValueError(f"plan 'tier_of' has unknown tiers {sorted(unknown)}; tiers are {', '.join(TIERS)}")
        slots = plan.get("dynamic_slots")
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 0:
            raise ValueError("plan field 'dynamic_slots' must be a non-negative int")
        return TieringPlan(**common, tier_of=table.astype(str).tolist(), dynamic_slots=slots)
    return DiskLayoutPlan(**common)


def _validate_disk_order(order: np.ndarray, layers: int, experts: int) -> None:
    permutations = order.shape == (layers, experts) and (np.sort(order, axis=1) == np.arange(experts)).all()
    if not permutations:
        raise ValueError(f"plan field 'disk_order' must order all {experts} experts of each of the {layers} layers (a permutation per layer)")


def save_plan(plan: dict | PlacementPlan, path: str | os.PathLike) -> Path:
    """Write a plan (its JSON form, checked first) atomically."""
    plan = plan.to_dict() if isinstance(plan, PlacementPlan) else plan
    validate_plan(plan)
    return write_text_atomically(path, json.dumps(plan, indent=1))


def load_plan(path_or_plan) -> PlacementPlan:
    """The typed plan of a plan file, a plan's JSON form (dict) or a typed plan."""
    if isinstance(path_or_plan, PlacementPlan):
        return path_or_plan
    if isinstance(path_or_plan, dict):
        return validate_plan(path_or_plan)
    path = Path(path_or_plan)
    plan = read_json(path, "placement plan", "make it again with 'moe-runtime place'")
    try:
        if not isinstance(plan, dict):
            raise ValueError(f"a plan is a JSON object, got {type(plan).__name__}")
        return validate_plan(plan)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise InvalidFileError(f"{path}: not a usable placement plan ({error}); make it again with 'moe-runtime place'") from None
