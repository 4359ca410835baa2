"""Placement plans as JSON: what the `place` command writes and `wrap(placement=...)` follows.

{"kind": "multi_gpu", "device_of": [[device of each expert] per MoE layer], "method": ...,
 "cut_fraction": ..., ...} or {"kind": "tiering", "tier_of": [[tier per expert] per layer],
 "dynamic_slots": N, ...} or {"kind": "disk_layout", "disk_order": [[expert ids in file order] per
layer], "runs_per_read": ..., ...}; a tiering plan carries a "disk_order" too, for the experts it
leaves on disk. All carry "shape": {"num_layers", "num_experts", "top_k"} and the traces they
were made from. A plan for another model shape is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from moe_runtime.atomic import write_text_atomically
from moe_runtime.errors import InvalidFileError
from moe_runtime.reading import read_json

from .tiering import TIERS

KINDS = ("multi_gpu", "tiering", "disk_layout")
TABLES = {"multi_gpu": "device_of", "tiering": "tier_of", "disk_layout": "disk_order"}


def validate_plan(plan: dict) -> dict:
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
    if plan.get("disk_order") is not None:
        _validate_disk_order(np.asarray(plan["disk_order"]), layers, experts)
    if kind == "multi_gpu":
        gpus = plan.get("gpus")
        if not isinstance(gpus, int) or gpus < 1 or experts % gpus:
            raise ValueError(f"plan field 'gpus' must divide the {experts} experts, got {gpus}")
        if not np.issubdtype(table.dtype, np.integer):
            raise ValueError(f"plan 'device_of' must hold device indices (ints), got {table.dtype}")
        if table.min() < 0 or table.max() >= gpus:
            raise ValueError(f"plan 'device_of' must hold device indices in [0, {gpus})")
        counts = np.stack([np.bincount(row, minlength=gpus) for row in table.astype(np.int64)])
        if table.min() < 0 or table.max() >= gpus or (counts != experts // gpus).any():
            raise ValueError(f"plan 'device_of' must put exactly {experts // gpus} experts of every layer on each of {gpus} devices")
    elif kind == "tiering":
        unknown = {str(tier) for tier in table.ravel()} - set(TIERS)
        if unknown:
            raise ValueError(f"plan 'tier_of' has unknown tiers {sorted(unknown)}; tiers are {', '.join(TIERS)}")
        if not isinstance(plan.get("dynamic_slots"), int) or plan["dynamic_slots"] < 0:
            raise ValueError("plan field 'dynamic_slots' must be a non-negative int")
    return plan


def _validate_disk_order(order: np.ndarray, layers: int, experts: int) -> None:
    permutations = order.shape == (layers, experts) and (np.sort(order, axis=1) == np.arange(experts)).all()
    if not permutations:
        raise ValueError(f"plan field 'disk_order' must order all {experts} experts of each of the {layers} layers (a permutation per layer)")


def save_plan(plan: dict, path: str | os.PathLike) -> Path:
    validate_plan(plan)
    return write_text_atomically(path, json.dumps(plan, indent=1))


def load_plan(path_or_plan) -> dict:
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


def tier_counts(plan: dict) -> dict[str, int]:
    """How many experts a tiering plan puts in each tier."""
    flat = [tier for row in plan["tier_of"] for tier in row]
    return {tier: flat.count(tier) for tier in TIERS}


def check_plan_shape(plan: dict, num_layers: int, num_experts: int) -> None:
    shape = plan["shape"]
    if (shape["num_layers"], shape["num_experts"]) != (num_layers, num_experts):
        raise ValueError(
            f"this placement plan was made for (L, E) = {(shape['num_layers'], shape['num_experts'])}, "
            f"the model has {(num_layers, num_experts)}"
        )
