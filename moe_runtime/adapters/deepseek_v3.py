"""DeepSeek-V3: sigmoid router with group-limited top-k and a score-correction bias, shared
experts (`shared_experts`, resident), and dense MLPs in the first `first_k_dense_replace`
layers (skipped: only MoE layers count on the L axis).
"""

import torch
from torch import nn

from .base import MoEAdapter


class DeepseekV3Adapter(MoEAdapter):
    model_type = "deepseek_v3"
    shared_attrs = ("shared_experts",)

    def select(self, router: nn.Module, logits: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid scores + correction bias, best groups, top-k within them (pruned: -inf)."""
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias
        if keep is not None:
            choice = choice.masked_fill(~keep, float("-inf"))
        grouped = choice.view(-1, router.num_group, router.num_experts // router.num_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        group_index = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_index, 1)
        score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, router.num_experts)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        index = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, index)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, index
