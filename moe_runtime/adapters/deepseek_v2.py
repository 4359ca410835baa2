"""DeepSeek-V2 (and V2-Lite, the ESFT traces' architecture): softmax router, greedy or
group-limited top-k, weights scaled by `routed_scaling_factor` and not renormalised; shared
experts (`shared_experts`, resident); dense MLPs in the first `first_k_dense_replace` layers
(skipped: only MoE layers count on the L axis).
"""

import torch
from torch import nn

from .base import MoEAdapter


class DeepseekV2Adapter(MoEAdapter):
    model_type = "deepseek_v2"
    shared_attrs = ("shared_experts",)

    def select(self, router: nn.Module, logits: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax scores, the best `topk_group` groups when group-limited, top-k (pruned: never)."""
        scores = logits.float().softmax(dim=-1)
        if keep is not None:
            scores = scores.masked_fill(~keep, -1.0)  # below every real score: never chosen
        if router.topk_method == "group_limited_greedy":
            grouped = scores.view(-1, router.num_group, router.num_experts // router.num_group)
            group_index = torch.topk(grouped.max(dim=-1).values, k=router.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(grouped[..., 0]).scatter_(1, group_index, 1)
            score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, router.num_experts)
            scores = scores.masked_fill(~score_mask.bool(), 0.0 if keep is None else -1.0)
        weights, index = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
        return weights * router.routed_scaling_factor, index
