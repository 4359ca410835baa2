"""Qwen2-MoE: softmax router (optionally renormalised) plus a shared expert scaled by a sigmoid gate.

The shared expert (`shared_expert`) and its gate (`shared_expert_gate`) stay resident.
"""

from .base import MoEAdapter


class Qwen2MoeAdapter(MoEAdapter):
    model_type = "qwen2_moe"
    shared_attrs = ("shared_expert", "shared_expert_gate")
    decode_attention = "none"
