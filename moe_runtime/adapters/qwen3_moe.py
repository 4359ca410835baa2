"""Qwen3-MoE: the plain shape (softmax top-k router, fused experts), no shared expert."""

from .base import MoEAdapter


class Qwen3MoeAdapter(MoEAdapter):
    model_type = "qwen3_moe"
    decode_attention = "head"
