"""Timed greedy generation: the figures `generate`, `demo` and the live benchmark report."""

from __future__ import annotations

import contextlib
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from .runtime.assembly import reset_stats, stats
from .runtime.executor import RUNTIME_ATTR


@dataclass(frozen=True)
class GenerationTiming:
    tokens: torch.Tensor  # [1, prompt + new] ids
    new_tokens: int
    prefill_seconds: float  # latency of the first new token (one forward over the prompt)
    decode_seconds: float  # the remaining new tokens

    @property
    def decode_tokens_per_second(self) -> float:
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0


def time_generation(model, ids: torch.Tensor, max_new_tokens: int, session: AbstractContextManager = contextlib.nullcontext()) -> GenerationTiming:
    """Greedy generation of exactly `max_new_tokens` tokens, prefill and decode timed apart;
    `session`: the context the timed generation runs in (generate --learn records its routing
    there: the warm-up prefill before it is no session of the user's).

    Works for any causal LM; a wrapped model's stats afterwards cover the full generation only.
    Runs under torch.inference_mode (no autograd bookkeeping: 5-8% more decode tokens/s on the
    CPU of BENCHMARKS.md than no_grad, which generate() uses alone); a wrapped model may run
    with or without it afterwards (tested). Exactly `max_new_tokens` come from generating
    without an end-of-sequence token, not from min_new_tokens: its logits processor masks the
    whole vocabulary every step (about 1 ms of a 12 ms int4 step on that CPU's small model).
    """
    wrapped = hasattr(model, RUNTIME_ATTR)
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, **_no_end(model))
        prefill = time.perf_counter() - started
        if wrapped:
            reset_stats(model)
        with session:
            started = time.perf_counter()
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **_no_end(model))
            total = time.perf_counter() - started
    return GenerationTiming(out, int(out.shape[1] - ids.shape[1]), prefill, max(total - prefill, 1e-9))


def _no_end(model) -> dict:
    """generate() arguments that never end a sequence early: no end-of-sequence token, and a
    padding token of the model's (else 0: one unfinished sequence is never padded)."""
    pad = model.generation_config.pad_token_id
    return {"eos_token_id": [], "pad_token_id": 0 if pad is None else pad}


def timed_generate(
    model, tokenizer, prompt: str, max_new_tokens: int, session: AbstractContextManager = contextlib.nullcontext(),
) -> tuple[str, GenerationTiming, dict]:
    """Generate from a text prompt through a wrapped model: (new text, timing, runtime stats)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    timing = time_generation(model, ids, max_new_tokens, session)
    text = tokenizer.decode(timing.tokens[0, ids.shape[1] :], skip_special_tokens=True)
    return text, timing, stats(model)
