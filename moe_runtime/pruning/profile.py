"""Pruning profiles: the experts one task keeps, as a JSON file (schema: profiles/README.md).

trace of a task -> importance [L, E] -> keep plan -> profile (+ an opening signature, the
routing of the first positions of the task's sequences, for retrieval) -> JSON.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_text_atomically
from ..errors import InvalidFileError
from ..checked_reading import read_json
from ..trace import Trace
from .importance import task_importance
from .plan import keep_plan

SCHEMA_VERSION = 1
OPENING_POSITIONS = 16  # positions of a sequence's start kept in the signature (retrieval reads 16 tokens)
OPENING_EXPERTS = 12  # most frequent experts per (position, layer) kept in the signature


@dataclass(frozen=True)
class PruningProfile:
    task: str
    num_experts: int  # E
    top_k: int  # K
    keep: list[list[int]]  # per MoE layer, the kept expert ids
    scores: list[list[float]]  # [L][E] importance
    model: dict = field(default_factory=dict)  # model_type, moe_layers (when known)
    source: dict = field(default_factory=dict)  # traces, tokens, sequences, method, allocation, keep share
    opening: list = field(default_factory=list)  # [P][L] -> [[expert, share], ...] at sequence starts
    version: int = SCHEMA_VERSION

    def __post_init__(self):
        validate(asdict(self))

    @property
    def num_layers(self) -> int:
        return len(self.keep)

    def keep_mask(self) -> np.ndarray:
        """[L, E] bool, True for kept experts."""
        mask = np.zeros((self.num_layers, self.num_experts), dtype=bool)
        for layer, kept in enumerate(self.keep):
            mask[layer, kept] = True
        return mask

    def kept_share(self) -> float:
        return float(self.keep_mask().mean())

    def check_shape(self, num_layers: int, num_experts: int, top_k: int, model_type: str | None = None) -> None:
        """Refuse a profile made for another model shape."""
        expected = (num_layers, num_experts, top_k)
        if (self.num_layers, self.num_experts, self.top_k) != expected:
            raise ValueError(
                f"profile {self.task!r} was made for (L, E, K) = {(self.num_layers, self.num_experts, self.top_k)}, "
                f"this model has {expected}"
            )
        made_for = self.model.get("model_type")
        if model_type and made_for and made_for != model_type:
            raise ValueError(f"profile {self.task!r} was made for a {made_for} model, not {model_type}")

    def save(self, path: str | os.PathLike) -> Path:
        return write_text_atomically(path, json.dumps(asdict(self), indent=1))


def load_profile(path: str | os.PathLike) -> PruningProfile:
    data = read_json(path, "profile file", "make it again with 'moe-runtime profile'")
    try:
        if not isinstance(data, dict):
            raise ValueError(f"a profile is a JSON object, got {type(data).__name__}")
        validate(data)  # names a missing or bad field before the dataclass sees it
        return PruningProfile(**{key: data[key] for key in data if key in PruningProfile.__dataclass_fields__})
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
        raise InvalidFileError(f"{path}: not a usable profile ({error}); make it again with 'moe-runtime profile'") from None


def validate(data: dict) -> None:
    """Check a profile's fields; raises ValueError naming the bad field."""
    for name in ("task", "num_experts", "top_k", "keep", "scores"):
        if name not in data or data[name] is None:
            raise ValueError(f"profile lacks the field {name!r}")
    experts, top_k, keep = data["num_experts"], data["top_k"], data["keep"]
    if not isinstance(data["task"], str) or not data["task"]:
        raise ValueError("profile field 'task' must be a non-empty string")
    if not isinstance(experts, int) or experts <= 0 or not isinstance(top_k, int) or not 0 < top_k <= experts:
        raise ValueError(f"profile fields num_experts and top_k must satisfy 0 < top_k <= num_experts, got {experts}, {top_k}")
    if not isinstance(keep, list) or not keep:
        raise ValueError("profile field 'keep' must be a non-empty list with the kept expert ids of each layer")
    for layer, kept in enumerate(keep):
        if not isinstance(kept, list) or len(set(kept)) != len(kept) or not all(isinstance(e, int) and 0 <= e < experts for e in kept):
            raise ValueError(f"profile field 'keep' layer {layer}: needs distinct expert ids in [0, {experts})")
        if len(kept) < top_k:
            raise ValueError(f"profile field 'keep' layer {layer} keeps {len(kept)} experts, fewer than top_k = {top_k}")
    scores = np.asarray(data["scores"], dtype=float)
    if scores.shape != (len(keep), experts) or not np.isfinite(scores).all():
        raise ValueError(f"profile field 'scores' must be [L, E] = {(len(keep), experts)} finite numbers, got shape {scores.shape}")
    _validate_opening(data.get("opening") or [], len(keep), experts)
    if data.get("version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise ValueError(f"profile schema version {data.get('version')} is not {SCHEMA_VERSION}")


def _validate_opening(opening, layers: int, experts: int) -> None:
    """[P][L] -> [[expert, share], ...] with experts in range and shares in [0, 1]."""
    def pair_ok(pair) -> bool:
        return (
            isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int) and 0 <= pair[0] < experts
            and isinstance(pair[1], (int, float)) and 0 <= pair[1] <= 1
        )

    shaped = isinstance(opening, list) and all(isinstance(position, list) and len(position) == layers for position in opening)
    if not shaped or not all(isinstance(pairs, list) and all(map(pair_ok, pairs)) for position in opening for pairs in position):
        raise ValueError(f"profile field 'opening' must be [P][L = {layers}] lists of [expert id < {experts}, share in [0, 1]] pairs")


def opening_signature(trace: Trace, positions: int = OPENING_POSITIONS) -> list:
    """[P][L] -> the most frequent experts at each of the first P positions, with their share."""
    signature = []
    starts = trace.seq_offsets[:-1]
    lengths = np.diff(trace.seq_offsets)
    for position in range(positions):
        rows = starts[lengths > position] + position
        if len(rows) == 0:
            break
        layers = []
        for layer in range(trace.num_layers):
            counts = np.bincount(trace.expert_ids[rows, layer].ravel().astype(np.int64), minlength=trace.num_experts)
            top = np.argsort(-counts, kind="stable")[:OPENING_EXPERTS]
            layers.append([[int(e), round(float(counts[e]) / len(rows), 4)] for e in top if counts[e] > 0])
        signature.append(layers)
    return signature


def make_profile(
    trace: Trace,
    task: str,
    keep: float,
    *,
    method: str = "mass",
    allocation: str = "global",
    source_names: list[str] | None = None,
) -> PruningProfile:
    """The profile of `task` from its trace, keeping a `keep` share of all experts."""
    scores = task_importance(trace, method)
    return PruningProfile(
        task=task,
        num_experts=trace.num_experts,
        top_k=trace.top_k,
        keep=keep_plan(scores, keep, trace.top_k, allocation),
        scores=np.round(scores, 6).tolist(),
        model={"model_type": trace.model_type, "moe_layers": list(trace.moe_layers) if trace.moe_layers else None},
        source={
            "traces": source_names or [],
            "tokens": trace.num_tokens,
            "sequences": trace.num_sequences,
            "method": method,
            "allocation": allocation,
            "keep": keep,
        },
        opening=opening_signature(trace),
    )
