"""Record routing traces from a live model: sequence -> forward -> router hooks -> Trace.

The model's own router modules decide routing; forward hooks on them copy out what they
returned (`top_k_index` [T, K], `top_k_weights` [T, K]) and, optionally, their input hidden
states [T, H] (the features a cross-layer predictor needs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import adapter_for
from .trace import Trace


class RouterRecorder:
    """Forward hooks on every MoE router; collects one sequence at a time."""

    def __init__(self, model: nn.Module, *, router_inputs: bool = False):
        self.blocks = adapter_for(model).blocks(model)
        self.router_inputs = router_inputs
        self._ids: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self._weights: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self._inputs: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self._handles = [
            block.router.register_forward_hook(self._hook(block.moe_index)) for block in self.blocks
        ]

    def _hook(self, moe_index: int):
        def capture(module, inputs, output):
            _, top_k_weights, top_k_index = output
            self._ids[moe_index].append(top_k_index.detach().reshape(-1, top_k_index.shape[-1]).cpu())
            self._weights[moe_index].append(top_k_weights.detach().reshape(-1, top_k_weights.shape[-1]).float().cpu())
            if self.router_inputs:
                hidden = inputs[0].detach()
                self._inputs[moe_index].append(hidden.reshape(-1, hidden.shape[-1]).float().cpu())

        return capture

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """What was captured since the last call: ids [T, L, K], weights [T, L, K], inputs [T, L, H]."""
        ids = np.stack([torch.cat(chunks).numpy() for chunks in self._ids], axis=1)
        weights = np.stack([torch.cat(chunks).numpy() for chunks in self._weights], axis=1)
        inputs = None
        if self.router_inputs:
            inputs = np.stack([torch.cat(chunks).numpy() for chunks in self._inputs], axis=1)
        for store in (self._ids, self._weights, self._inputs):
            for chunks in store:
                chunks.clear()
        return ids, weights, inputs

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def record_trace(
    model: nn.Module,
    sequences: Sequence[Sequence[int] | torch.Tensor],
    *,
    router_inputs: bool = False,
    task: str | None = None,
    progress: bool = False,
) -> Trace:
    """Run each sequence through the model (batch 1, one forward) and record its routing.

    sequences: 1-D token-id tensors or lists. Returns a Trace with expert_ids [T, L, K] and
    gate_weights [T, L, K] exactly as the routers returned them (weights stored as float16).
    """
    if len(sequences) == 0:
        raise ValueError("record_trace needs at least one sequence")
    _check_vocabulary(model, sequences)
    device = next(model.parameters()).device
    recorder = RouterRecorder(model, router_inputs=router_inputs)
    ids, weights, inputs, lengths = [], [], [], []
    try:
        with torch.no_grad():
            for sequence in tqdm(sequences, desc="tracing", unit="seq", disable=not progress):
                tokens = torch.as_tensor(sequence, dtype=torch.long).reshape(1, -1).to(device)
                if tokens.shape[1] == 0:
                    raise ValueError("record_trace got an empty sequence")
                model(input_ids=tokens, use_cache=False)
                seq_ids, seq_weights, seq_inputs = recorder.take()
                if seq_ids.shape[0] != tokens.shape[1]:
                    raise AssertionError(f"routers saw {seq_ids.shape[0]} tokens for a sequence of {tokens.shape[1]}")
                ids.append(seq_ids)
                weights.append(seq_weights)
                inputs.append(seq_inputs)
                lengths.append(tokens.shape[1])
    finally:
        recorder.close()
    blocks = recorder.blocks
    return Trace(
        expert_ids=np.concatenate(ids).astype(np.int16),
        gate_weights=np.concatenate(weights).astype(np.float16),
        seq_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        num_experts=blocks[0].num_experts,
        top_k=blocks[0].top_k,
        model_type=model.config.model_type,
        moe_layers=tuple(block.layer_index for block in blocks),
        task=task,
        router_inputs=np.concatenate(inputs).astype(np.float16) if router_inputs else None,
    )


def _check_vocabulary(model: nn.Module, sequences) -> None:
    """Refuse token ids the embedding has no row for (an IndexError deep in the model otherwise)."""
    vocabulary = model.get_input_embeddings().num_embeddings
    for number, sequence in enumerate(sequences, start=1):
        tokens = torch.as_tensor(sequence, dtype=torch.long)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocabulary):
            raise ValueError(
                f"sequence {number} holds token ids outside the model's vocabulary [0, {vocabulary}) "
                f"(found {int(tokens.min())}..{int(tokens.max())}); tokenize the prompts with this model's tokenizer"
            )
