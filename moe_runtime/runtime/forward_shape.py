"""The shape of the wrapped model's running forward: its batch size and whether it starts new
sequences, told by a pre-hook on the model.

An MoE layer sees its routing as rows [R, K], R = B x T, which cannot tell a prefill of one
prompt of T tokens (R consecutive tokens a reuse model can learn from) from one decode step of a
batch of B (R tokens of unrelated sequences). The model's forward arguments can: input_ids
[B, T] (or inputs_embeds [B, T, H]), and a KV cache that is absent or empty where sequences
start. Per thread: forwards from several threads interleave layer by layer (runtime.lock), each
with its own shape.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ForwardShape:
    batch: int  # B: the forward's sequences (rows of input_ids)
    new_sequences: bool  # no KV cache or an empty one: a prefill that starts its B sequences


class ForwardShapes:
    """The running forward's ForwardShape in each thread, while attached to a model."""

    def __init__(self, on_forward: Callable[[ForwardShape], None]):
        """on_forward: called with each forward's shape as it starts (in the forward's thread)."""
        self.on_forward = on_forward
        self._running = threading.local()
        self._hooks = []

    def attach(self, model: nn.Module) -> None:
        """Hook `model`'s forward: its shape is known from its start to its end (an error too)."""
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, always_call=True),
        ]

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def current(self) -> ForwardShape | None:
        """This thread's running forward (None before any, or where a forward gave neither input)."""
        return getattr(self._running, "shape", None)

    def _before_forward(self, module, args, kwargs) -> None:
        shape = forward_shape(args, kwargs)
        self._running.shape = shape
        if shape is not None:
            self.on_forward(shape)

    def _after_forward(self, module, args, output) -> None:
        self._running.shape = None  # a layer run outside the model's forward has no shape to go by


def forward_shape(args: tuple, kwargs: dict) -> ForwardShape | None:
    """The ForwardShape of a causal LM's forward arguments, None if neither input_ids nor
    inputs_embeds is given."""
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        return None
    past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5's name, and 4's
    return ForwardShape(int(inputs.shape[0]), past is None or past.get_seq_length() == 0)
