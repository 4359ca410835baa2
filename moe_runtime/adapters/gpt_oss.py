"""GPT-OSS: router named `router` (top-k logits, then softmax), experts transposed
(`gate_up_proj` [E, H, 2I]), gate/up rows interleaved, with biases, clamped SwiGLU.

Its checkpoints keep the fused [E, ...] tensors, so one expert is row `e` of each tensor.
MXFP4-quantised checkpoints (`*_blocks`, `*_scales`) are not read: dequantise them first.
"""

import torch
from torch import nn

from .base import MoEAdapter, MoEBlock, TensorPart


class GptOssAdapter(MoEAdapter):
    model_type = "gpt_oss"
    router_attr = "router"

    def select(self, router: nn.Module, logits: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of the logits, then a softmax over those k (pruned: -inf)."""
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        values, index = torch.topk(logits, router.top_k, dim=-1)
        return torch.softmax(values, dim=1, dtype=values.dtype), index

    def checkpoint_parts(self, block: MoEBlock, expert: int) -> dict[str, list[TensorPart]]:
        return self.fused_checkpoint_parts(block, expert)
