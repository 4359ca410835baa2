"""Record the routing a wrapped model serves, as it runs: its sessions become a trace of your task.

    with moe_runtime.record_routing(model, task="support") as log:
        model.generate(**inputs, max_new_tokens=64)
    log.trace().save("support.npz")    # later: wrap(..., policy_fit="support.npz")

The runtime's hook on the model (runtime/forward_shape.py) tells each forward's batch size and
whether it starts new sequences (no cache, or an empty one: a prefill); the runtime hands every
MoE layer's top-k experts [R, K] and gate weights to the log (Runtime.run_layer and
account_in_place, the decode path that computes experts where they lie), so nothing changes in
how a step runs: hooks on the routers would give a CPU decode step back to the modules' own
forwards (decode_layer.py). The R = B x T rows of a
forward are split into its B sequences, each continued by the decode steps that follow. A
forward cut short (an error, Ctrl-C) before its last MoE layer is left out whole, so the trace
holds every finished token and no half of one. Only the thread that opened the log is recorded:
another thread's requests (runtime.lock interleaves them layer by layer) are not its sessions.
A forward's layers are copied to the host once, when it ends: 44-48 us a token on the embedded
model's 6 MoE layers, no loss of decode tokens/s measurable (BENCHMARKS.md, "Learning across
sessions"; a copy per layer took 67-73).

Why: the default policy learns its task's routing as it serves it, but a one-shot session ends
before it has learnt much (its first refit comes after 128 tokens); started from the sessions
recorded before (policy_fit), short sessions of the shipped tasks make 0.8-10.5% of LRU's loads
fewer at 25% (BENCHMARKS.md, "Learning across sessions"). `moe-runtime generate --learn FILE`
does this across runs.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import check_writable
from .errors import InvalidFileError
from .runtime.assembly import runtime_of
from .runtime.executor import Runtime
from .trace import Trace, load_trace, merge_traces


class RoutingLog:
    """The routing one thread's forwards were served, grouped into sequences; see record_routing."""

    def __init__(self, model: nn.Module, task: str | None = None):
        self.model, self.runtime = model, runtime_of(model)
        if not isinstance(self.runtime, Runtime):
            raise ValueError(
                "this model runs a multi-GPU plan: every expert stays resident and no cache learns from its routing; "
                "moe_runtime.record_trace records the routing of any model"
            )
        blocks = self.runtime.blocks  # the MoE blocks the runtime serves, found when it was wrapped
        self.num_layers, self.num_experts, self.top_k = len(blocks), self.runtime.num_experts, self.runtime.top_k
        self.model_type = model.config.model_type
        self.moe_layers = tuple(block.layer_index for block in blocks)
        self.task = task
        self.thread: int | None = None  # the thread whose forwards are recorded: the one that entered the block
        self._sequences: list[list[tuple[np.ndarray, np.ndarray]]] = []  # each: finished forwards' rows [T, L, K] (ids, weights)
        self._open: list[int] = []  # indices in _sequences of the running batch's rows
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # its MoE layers' (ids [R, K], weights [R, K]) so far

    def __enter__(self) -> RoutingLog:
        """Attach to the runtime and the model (a second log on one runtime is refused)."""
        if self.runtime.routing_log is not None:
            raise RuntimeError("this model's routing is already being recorded: one record_routing block at a time")
        self.thread = threading.get_ident()
        self.runtime.routing_log = self
        return self

    def __exit__(self, *exc) -> None:
        self.runtime.routing_log = None
        self._layers = []

    @property
    def num_tokens(self) -> int:
        return sum(ids.shape[0] for sequence in self._sequences for ids, _ in sequence)

    def begin_forward(self) -> None:
        """A forward starts (the runtime's hook on the model): one of the recording thread's left
        unfinished is dropped here."""
        if threading.get_ident() == self.thread:
            self._layers = []

    def add(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        """MoE layer `layer` of the running forward chose `top_k_index` [R, K] with
        `top_k_weights` [R, K]; called by the runtime under its lock."""
        if threading.get_ident() != self.thread or self.runtime.forwards.current() is None or layer != len(self._layers):
            return
        self._layers.append((top_k_index.detach(), top_k_weights.detach()))  # copied once per forward, in _finish_forward
        if len(self._layers) == self.num_layers:
            self._finish_forward()

    def _finish_forward(self) -> None:
        """File the forward's rows under its sequences: one stack (a copy, so buffers the model
        reuses later do not matter) and one move to the host for all its layers."""
        shape, layers = self.runtime.forwards.current(), self._layers
        self._layers = []
        batch = shape.batch
        rows = layers[0][0].numel() // self.top_k
        if rows % batch or any(ids.numel() != rows * self.top_k for ids, _ in layers):
            return  # not a batch of whole rows (a caller's own forward shape): nothing to file it under
        if shape.new_sequences or len(self._open) != batch:
            self._open = list(range(len(self._sequences), len(self._sequences) + batch))
            self._sequences.extend([] for _ in range(batch))
        shape = (batch, rows // batch, self.num_layers, self.top_k)
        ids = torch.stack([ids.reshape(rows, self.top_k) for ids, _ in layers], dim=1).to("cpu", torch.int16).numpy().reshape(shape)
        weights = torch.stack([w.reshape(rows, self.top_k) for _, w in layers], dim=1).to("cpu", torch.float32).numpy().reshape(shape)
        for row, sequence in enumerate(self._open):
            self._sequences[sequence].append((ids[row], weights[row]))

    def trace(self) -> Trace:
        """The sequences recorded so far as a Trace (ids [T, L, K], gate weights, one sequence per
        batch row of each prefill). ValueError if no forward finished."""
        sequences = [sequence for sequence in self._sequences if sequence]
        if not sequences:
            raise ValueError("no routing was recorded: run the model (a forward or generate) inside record_routing")
        lengths = [sum(ids.shape[0] for ids, _ in sequence) for sequence in sequences]
        return Trace(
            expert_ids=np.concatenate([ids for sequence in sequences for ids, _ in sequence]).astype(np.int16),
            gate_weights=np.concatenate([w for sequence in sequences for _, w in sequence]).astype(np.float16),
            seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            num_experts=self.num_experts,
            top_k=self.top_k,
            model_type=self.model_type,
            moe_layers=self.moe_layers,
            task=self.task,
        )


def record_routing(model: nn.Module, task: str | None = None) -> RoutingLog:
    """A RoutingLog of the wrapped `model`: within its `with` block, the routing the model serves
    to this thread is recorded (log.trace() gives it, during or after the block). A model that is
    not wrapped is refused (moe_runtime.record_trace traces a plain one)."""
    return RoutingLog(model, task)


LEARN_TOKENS = 32_768  # a --learn file keeps the most recent whole sessions up to this many tokens: its fit takes about 0.1 s
LEARN_TASK = "generate --learn"  # the task of every session a --learn file holds: how a file of its own is told


def earlier_sessions(path: str | os.PathLike, shape: tuple[int, int, int]) -> Trace | None:
    """The sessions a --learn file holds (None before its first session) for a model of `shape`
    (MoE layers, experts, top-k), read and checked before any work: a path that cannot be
    written is refused, and so is a file --learn did not write (not a trace, or routing recorded
    otherwise), which is not its to rewrite or trim, and one of another model's routing."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"--learn {path}: a trace file's name ends in .npz (e.g. {path.with_suffix('.npz').name})")
    check_writable(path, "--learn file")
    if not path.exists():
        return None
    own_file = "--learn keeps its sessions in a file of its own: name a new file"
    try:
        trace = load_trace(path)
    except InvalidFileError as error:
        raise InvalidFileError(f"{error}; {own_file}") from None
    others = sorted(set(trace.tasks()) - {LEARN_TASK})
    if others:
        raise InvalidFileError(f"{path} holds routing recorded otherwise (tasks: {', '.join(map(repr, others))}); {own_file}, or pass this one as --policy-fit")
    if (trace.num_layers, trace.num_experts, trace.top_k) != shape:
        raise InvalidFileError(
            f"{path} holds the routing of another model ({trace.num_layers} MoE layers x {trace.num_experts} experts, top-{trace.top_k}; "
            f"this one has {shape[0]} x {shape[1]}, top-{shape[2]}): name a new file for this model"
        )
    return trace


def remember_session(path: str | os.PathLike, earlier: Trace | None, session: Trace) -> Trace:
    """Write `earlier` with `session` added to `path` (atomically), dropping the oldest sessions
    beyond LEARN_TOKENS tokens (never the new one); returns what was written."""
    kept = newest_sessions(session if earlier is None else merge_traces([earlier, session]))
    kept.save(path)
    return kept


def newest_sessions(trace: Trace) -> Trace:
    """`trace` without its oldest sequences beyond LEARN_TOKENS tokens (the newest is always kept)."""
    lengths = np.diff(trace.seq_offsets)
    fits = np.cumsum(lengths[::-1])[::-1] <= LEARN_TOKENS  # each sequence: whether it and every later one fit
    fits[-1] = True
    return trace if fits.all() else trace.select_sequences(np.flatnonzero(fits))
