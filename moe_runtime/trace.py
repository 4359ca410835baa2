"""Routing traces: which experts each token chose at each MoE layer, and with what gate weight.

The file format is the `.npz` schema of the shared ESFT traces (data/routing/esft-vanilla-lite):
`expert_ids` [T, L, K] int16, `gate_weights` [T, L, K] float16, `seq_offsets` [S+1] int64,
`num_experts` and `top_k` scalars. We add optional metadata arrays (`model_type`, `moe_layers`,
`task`, `sequence_tasks` [S], `router_inputs` [T, L, H] float16); readers that do not know them
ignore them, and every trace-consuming command reads the shared files as they are.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .atomic import write_atomically
from .errors import InvalidFileError
from .checked_reading import read_npz

REQUIRED_ARRAYS = ("expert_ids", "gate_weights", "seq_offsets", "num_experts", "top_k")


@dataclass(frozen=True)
class Trace:
    """A routing trace of T tokens in S sequences over L MoE layers (K experts of E per token)."""

    expert_ids: np.ndarray  # [T, L, K] int16
    gate_weights: np.ndarray  # [T, L, K] float16
    seq_offsets: np.ndarray  # [S+1] int64, sequence s = tokens seq_offsets[s]:seq_offsets[s+1]
    num_experts: int
    top_k: int
    model_type: str | None = None
    moe_layers: tuple[int, ...] | None = None  # decoder-layer index of each MoE layer
    task: str | None = None
    sequence_tasks: tuple[str, ...] | None = None  # [S] task of each sequence (merged traces)
    router_inputs: np.ndarray | None = field(default=None, repr=False)  # [T, L, H] float16

    def __post_init__(self) -> None:
        _validate(self, source="Trace")

    def __repr__(self) -> str:
        """One line: the shape and the metadata, never the arrays."""
        known = {"model_type": self.model_type, "task": self.task, "router_inputs": self.router_inputs is not None or None}
        extra = "".join(f", {key}={value!r}" for key, value in known.items() if value is not None)
        return (
            f"Trace(tokens={self.num_tokens}, sequences={self.num_sequences}, layers={self.num_layers}, "
            f"experts={self.num_experts}, top_k={self.top_k}{extra})"
        )

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def num_sequences(self) -> int:
        return int(len(self.seq_offsets) - 1)

    def tasks(self) -> tuple[str, ...]:
        """The task of every sequence ("" where unknown)."""
        if self.sequence_tasks is not None:
            return self.sequence_tasks
        return (self.task or "",) * self.num_sequences

    def select_sequences(self, indices: Sequence[int]) -> Trace:
        """A trace of the given sequences only, in the given order."""
        indices = [int(i) for i in indices]
        if any(not 0 <= i < self.num_sequences for i in indices):
            raise ValueError(f"sequence index out of range 0..{self.num_sequences - 1}: {indices}")
        spans = [np.arange(self.seq_offsets[i], self.seq_offsets[i + 1]) for i in indices]
        rows = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
        lengths = np.array([len(span) for span in spans], dtype=np.int64)
        tasks = self.tasks()
        return replace(
            self,
            expert_ids=self.expert_ids[rows],
            gate_weights=self.gate_weights[rows],
            seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            sequence_tasks=tuple(tasks[i] for i in indices),
            router_inputs=None if self.router_inputs is None else self.router_inputs[rows],
        )

    def split(self, fit_share: float = 0.5) -> tuple[Trace, Trace]:
        """Split by sequence into (fit, held-out): the first `fit_share` of sequences fits.

        Splitting by sequence, never by token, keeps what is learned from leaking into what is
        measured (tokens of one sequence are strongly correlated).
        """
        if self.num_sequences < 2:
            raise ValueError("a trace needs at least 2 sequences to be split into fit and held-out parts")
        n_fit = min(max(1, round(self.num_sequences * fit_share)), self.num_sequences - 1)
        return (
            self.select_sequences(range(n_fit)),
            self.select_sequences(range(n_fit, self.num_sequences)),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the `.npz` file (atomically: a temporary file renamed into place)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        arrays = {
            "expert_ids": self.expert_ids.astype(np.int16),
            "gate_weights": self.gate_weights.astype(np.float16),
            "seq_offsets": self.seq_offsets.astype(np.int64),
            "num_experts": np.int64(self.num_experts),
            "top_k": np.int64(self.top_k),
        }
        if self.model_type is not None:
            arrays["model_type"] = np.array(self.model_type)
        if self.moe_layers is not None:
            arrays["moe_layers"] = np.array(self.moe_layers, dtype=np.int64)
        if self.task is not None:
            arrays["task"] = np.array(self.task)
        if self.sequence_tasks is not None:
            arrays["sequence_tasks"] = np.array(self.sequence_tasks, dtype=str)
        if self.router_inputs is not None:
            arrays["router_inputs"] = self.router_inputs.astype(np.float16)
        return write_atomically(path, lambda handle: np.savez_compressed(handle, **arrays))


def load_trace(path: str | os.PathLike) -> Trace:
    """Read a trace file (ours or the shared ESFT files) and validate it.

    Raises InvalidFileError (a ValueError) naming the bad array (missing, wrong rank or dtype,
    ids out of range, offsets not increasing) or saying the file is truncated or corrupt, and
    FileNotFoundError for a missing file.
    """
    path = Path(path)
    arrays = read_npz(path, "trace file", "record it again (moe-runtime trace) or copy the file again")
    missing = [name for name in REQUIRED_ARRAYS if name not in arrays]
    if missing:
        raise InvalidFileError(f"{path}: trace file lacks the array(s) {', '.join(missing)}")
    try:
        return Trace(
            expert_ids=_integer_array(arrays["expert_ids"], "expert_ids", np.int16),
            gate_weights=_float_array(arrays["gate_weights"], "gate_weights"),
            seq_offsets=_integer_array(arrays["seq_offsets"], "seq_offsets", np.int64),
            num_experts=_scalar(arrays["num_experts"], "num_experts"),
            top_k=_scalar(arrays["top_k"], "top_k"),
            model_type=_optional_str(arrays.get("model_type")),
            moe_layers=None if "moe_layers" not in arrays else tuple(int(x) for x in _integer_array(arrays["moe_layers"], "moe_layers", np.int64)),
            task=_optional_str(arrays.get("task")),
            sequence_tasks=None if "sequence_tasks" not in arrays else tuple(str(x) for x in arrays["sequence_tasks"]),
            router_inputs=arrays.get("router_inputs"),
        )
    except (ValueError, TypeError) as error:
        raise InvalidFileError(f"{path}: {error}; record the trace again (moe-runtime trace)") from None


def merge_traces(traces: Sequence[Trace]) -> Trace:
    """Concatenate traces of one model (e.g. several tasks) into one; each sequence keeps its task."""
    if not traces:
        raise ValueError("merge_traces needs at least one trace")
    first = traces[0]
    for other in traces[1:]:
        if (other.num_layers, other.num_experts, other.top_k) != (first.num_layers, first.num_experts, first.top_k):
            raise ValueError(
                "cannot merge traces of different model shapes: "
                f"(L, E, K) = {(first.num_layers, first.num_experts, first.top_k)} vs "
                f"{(other.num_layers, other.num_experts, other.top_k)}"
            )
    lengths = np.concatenate([np.diff(t.seq_offsets) for t in traces])
    with_inputs = all(t.router_inputs is not None for t in traces)
    tasks = {t.task for t in traces}
    return Trace(
        expert_ids=np.concatenate([t.expert_ids for t in traces]),
        gate_weights=np.concatenate([t.gate_weights for t in traces]),
        seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        num_experts=first.num_experts,
        top_k=first.top_k,
        model_type=first.model_type,
        moe_layers=first.moe_layers,
        task=first.task if len(tasks) == 1 else None,
        sequence_tasks=tuple(task for t in traces for task in t.tasks()),
        router_inputs=np.concatenate([t.router_inputs for t in traces]) if with_inputs else None,
    )


def load_traces(paths: Sequence[str | os.PathLike]) -> Trace:
    """Load several trace files and merge them; a file without a task is named after its stem."""
    traces = []
    for path in paths:
        trace = load_trace(path)
        if trace.task is None and trace.sequence_tasks is None:
            trace = replace(trace, task=Path(path).stem)
        traces.append(trace)
    return traces[0] if len(traces) == 1 else merge_traces(traces)


def _validate(trace: Trace, source: str) -> None:
    ids, weights, offsets = trace.expert_ids, trace.gate_weights, trace.seq_offsets
    if ids.ndim != 3:
        raise ValueError(f"expert_ids must be [T, L, K] (3-D), got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"expert_ids must be integers, got {ids.dtype}")
    if weights.shape != ids.shape:
        raise ValueError(f"gate_weights must have the shape of expert_ids {ids.shape}, got {weights.shape}")
    if weights.size and not (np.isfinite(weights).all() and weights.min() >= 0):
        raise ValueError("gate_weights must be finite and non-negative")
    if trace.num_experts <= 0 or trace.top_k <= 0:
        raise ValueError(f"num_experts and top_k must be positive, got {trace.num_experts} and {trace.top_k}")
    if ids.shape[2] != trace.top_k:
        raise ValueError(f"top_k = {trace.top_k} but expert_ids has {ids.shape[2]} experts per token")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= trace.num_experts):
        raise ValueError(
            f"expert_ids must lie in [0, num_experts = {trace.num_experts}), "
            f"found values in [{int(ids.min())}, {int(ids.max())}]"
        )
    if offsets.ndim != 1 or len(offsets) < 2:
        raise ValueError(f"seq_offsets must be 1-D [S+1] with S >= 1, got shape {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != ids.shape[0]:
        raise ValueError(f"seq_offsets must start at 0 and end at T = {ids.shape[0]}, got {offsets[0]}..{offsets[-1]}")
    if np.any(np.diff(offsets) <= 0):
        raise ValueError("seq_offsets must be strictly increasing (every sequence has at least one token)")
    if trace.sequence_tasks is not None and len(trace.sequence_tasks) != len(offsets) - 1:
        raise ValueError(f"sequence_tasks has {len(trace.sequence_tasks)} entries for {len(offsets) - 1} sequences")
    if trace.router_inputs is not None and trace.router_inputs.shape[:2] != ids.shape[:2]:
        raise ValueError(f"router_inputs must be [T, L, H] with T, L = {ids.shape[:2]}, got {trace.router_inputs.shape}")


def _integer_array(array: np.ndarray, name: str, dtype) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {array.dtype}")
    limits = np.iinfo(dtype)
    if array.size and (array.min() < limits.min or array.max() > limits.max):
        raise ValueError(f"{name} holds values outside {np.dtype(dtype).name} ({array.min()}..{array.max()})")
    return array.astype(dtype, copy=False)


def _float_array(array: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    return array.astype(np.float16, copy=False)


def _scalar(array: np.ndarray, name: str) -> int:
    if array.ndim != 0 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an integer scalar, got shape {array.shape} dtype {array.dtype}")
    return int(array)


def _optional_str(array: np.ndarray | None) -> str | None:
    return None if array is None else str(array)
