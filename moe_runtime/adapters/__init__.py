"""Model-family adapters, keyed by `config.model_type`.

One small file per family; `adapter_for(model_or_config)` picks one, and an unknown family
raises a ValueError listing the supported ones.
"""

from __future__ import annotations

from .base import EXPERT_PARAMS, ExpertLayout, MoEAdapter, MoEBlock, TensorPart
from .deepseek_v2 import DeepseekV2Adapter
from .deepseek_v3 import DeepseekV3Adapter
from .gpt_oss import GptOssAdapter
from .mixtral import MixtralAdapter
from .olmoe import OlmoeAdapter
from .qwen2_moe import Qwen2MoeAdapter
from .qwen3_moe import Qwen3MoeAdapter

ADAPTERS: dict[str, type[MoEAdapter]] = {
    cls.model_type: cls
    for cls in (
        MixtralAdapter,
        Qwen2MoeAdapter,
        Qwen3MoeAdapter,
        OlmoeAdapter,
        DeepseekV2Adapter,
        DeepseekV3Adapter,
        GptOssAdapter,
    )
}

SUPPORTED_MODEL_TYPES = tuple(sorted(ADAPTERS))


def adapter_for(model_or_config) -> MoEAdapter:
    """The adapter for a model (or its config), by `config.model_type`."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model_type {model_type!r}: moe-runtime supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. A new family needs an adapter in moe_runtime/adapters/."
        )
    return ADAPTERS[model_type]()


__all__ = [
    "ADAPTERS",
    "EXPERT_PARAMS",
    "SUPPORTED_MODEL_TYPES",
    "ExpertLayout",
    "MoEAdapter",
    "MoEBlock",
    "TensorPart",
    "adapter_for",
]
