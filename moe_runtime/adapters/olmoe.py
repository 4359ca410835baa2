"""OLMoE: the plain shape (softmax top-k router, fused experts), no shared expert."""

from .base import MoEAdapter


class OlmoeAdapter(MoEAdapter):
    model_type = "olmoe"
    decode_attention = "projection"
