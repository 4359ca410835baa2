"""Small configs of the seven supported families, and a byte-level tokenizer, for tests and examples.

Each builds and runs on a CPU in well under a second; shapes are deliberately odd-free and
small but keep every family's structure (shared experts, dense first layers, biases, ...).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2

_COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# DeepSeek V2 and V3: group-limited routing, a dense first layer, multi-head latent attention.
_DEEPSEEK = dict(
    intermediate_size=96,
    moe_intermediate_size=48,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    num_key_value_heads=4,  # MLA: as many key/value heads as query heads
    q_lora_rank=None,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    rope_scaling=None,
)

# Per family: what its config calls E, K and the expert width, plus its structural extras.
_FAMILIES: dict[str, dict] = {
    "mixtral": dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=96,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=96,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(intermediate_size=96, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2, head_dim=16),
    "olmoe": dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(**_DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=1.5, n_shared_experts=2),
    "deepseek_v3": dict(**_DEEPSEEK, n_shared_experts=1),
    "gpt_oss": dict(
        intermediate_size=48,
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=32,
    ),
}

TINY_FAMILIES = tuple(_FAMILIES)


def expert_fields(model_type: str, *, num_experts: int, intermediate_size: int, top_k: int) -> dict:
    """Config overrides that set E, the routed experts' width and K, under the names the family uses."""
    family = _FAMILIES[model_type]
    experts_field = next(name for name in ("num_local_experts", "n_routed_experts", "num_experts") if name in family)
    width_field = "moe_intermediate_size" if "moe_intermediate_size" in family else "intermediate_size"
    return {experts_field: num_experts, width_field: intermediate_size, "num_experts_per_tok": top_k}


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """A small config of `model_type`; keyword overrides replace any field."""
    if model_type not in _FAMILIES:
        raise ValueError(f"no tiny config for {model_type!r}; known: {', '.join(TINY_FAMILIES)}")
    fields = {**_COMMON, **_FAMILIES[model_type], **overrides}
    if model_type == "gpt_oss" and "layer_types" not in overrides:
        kinds = ("sliding_attention", "full_attention")
        fields["layer_types"] = [kinds[i % 2] for i in range(fields["num_hidden_layers"])]
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised small model of `model_type` (eval mode, on CPU)."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if model_type == "deepseek_v3":
        # The score-correction bias starts at zero; give it values so tests exercise it.
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                gate.e_score_correction_bias.normal_(0, 0.1)
    return model.eval()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer for the tiny models' 320 ids (3 special + 256 bytes): needs no training or download."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=4096)
