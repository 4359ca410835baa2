"""DeepSeek-V3: sigmoid router with group-limited top-k and a score-correction bias, shared
experts (`shared_experts`, resident), and dense MLPs in the first `first_k_dense_replace`
layers (skipped: only MoE layers count on the L axis).
"""

from .base import MoEAdapter


class DeepseekV3Adapter(MoEAdapter):
    model_type = "deepseek_v3"
    shared_attrs = ("shared_experts",)
