"""Greedy decoding through the KV cache, one token per step, for tests that compare logits."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def greedy_logits(model, ids: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """[steps + 1, B, V]: the prompt's last logits, then each greedy one-token step's."""
    cache = DynamicCache(config=model.config)
    rows = []
    with torch.no_grad():
        for _ in range(steps + 1):
            logits = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]
            rows.append(logits)
            ids = logits.argmax(-1, keepdim=True)
    return torch.stack(rows)
