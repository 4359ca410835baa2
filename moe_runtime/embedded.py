"""The embedded default model: a small OLMoE built locally, saved as a real checkpoint directory.

config + fixed seed -> random weights -> save_pretrained (per-expert safetensors, as a hub
checkpoint) + a byte-level tokenizer that works offline -> cache folder (built once, atomically).
Nothing is downloaded. `demo`, examples and tests use it in place of a hub model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .atomic import staging_directory
from .checkpoint import CheckpointDir
from .tiny_models import tiny_model

EMBEDDED_NAME = "embedded-olmoe-v1"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
VOCAB_SIZE = 320  # 3 special + 256 byte tokens, padded to a multiple of 64
EMBEDDED_SHAPE = dict(
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts=32,
    num_experts_per_tok=4,
    vocab_size=VOCAB_SIZE,
)
SEED = 1234

DEMO_PROMPTS = (
    "Translate to French: the weather is lovely today and the market is open.",
    "Summarise: the committee met on Tuesday and agreed to expand the library budget.",
    "Question: what is the capital of the country with the longest coastline?",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "The defendant argued that the contract was void because the clause was never signed.",
    "Once upon a time, in a village by the sea, there lived an old fisherman.",
    "Intent: book a table for two at an Italian restaurant tomorrow at eight.",
    "The mitochondria is the powerhouse of the cell, converting nutrients into energy.",
)


# Prompt sets of three "tasks" for the embedded model (profiles, retrieval and quality figures).
EMBEDDED_TASKS: dict[str, tuple[str, ...]] = {
    "translate": (
        "Translate to French: the weather is lovely today and the market is open.",
        "Translate to French: where is the nearest train station, please?",
        "Translate to French: my brother bought three apples and a loaf of bread.",
        "Translate to French: the museum closes at six on Sundays.",
        "Translate to French: we would like a table for four near the window.",
        "Translate to French: the children are playing in the garden after school.",
        "Translate to French: please send me the report before Friday morning.",
        "Translate to French: the river flooded the village last spring.",
    ),
    "code": (
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
        "for (int i = 0; i < count; ++i) {\n    total += values[i] * weights[i];\n}\n",
        "import numpy as np\nx = np.arange(10)\nprint(x.reshape(2, 5).sum(axis=0))\n",
        "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)\n",
        "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 3;",
        "fn main() {\n    let v: Vec<u32> = (1..=5).collect();\n    println!(\"{:?}\", v);\n}\n",
        "while queue:\n    node = queue.pop(0)\n    for child in node.children:\n        queue.append(child)\n",
        "const total = items.reduce((sum, item) => sum + item.price, 0);",
    ),
    "legal": (
        "The defendant argued that the contract was void because the clause was never signed.",
        "Pursuant to section 4(b), the lessee shall indemnify the lessor against all claims.",
        "The court held that the statute of limitations had expired before the filing date.",
        "Notwithstanding the foregoing, either party may terminate this agreement upon notice.",
        "The appellant contends that the trial judge erred in admitting the hearsay evidence.",
        "Any dispute arising under this agreement shall be resolved by binding arbitration.",
        "The plaintiff seeks damages for breach of fiduciary duty and unjust enrichment.",
        "The parties hereby agree that the governing law shall be that of the State of New York.",
    ),
}


def cache_root() -> Path:
    """Where built artefacts live: $MOE_RUNTIME_CACHE, else ~/.cache/moe-runtime."""
    return Path(os.environ.get("MOE_RUNTIME_CACHE", Path.home() / ".cache" / "moe-runtime"))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (every byte one token, no merges): needs no training or download."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=4096,
    )


def embedded_model_dir(*, rebuild: bool = False) -> Path:
    """The embedded model's checkpoint directory, built on first use, when `rebuild`, or when damaged."""
    target = cache_root() / EMBEDDED_NAME
    if not rebuild and _intact(target):
        return target
    with staging_directory(target, "embedded model cache", legacy=lambda folder: (folder / "config.json").is_file()) as staging:
        model = tiny_model("olmoe", seed=SEED, **EMBEDDED_SHAPE)
        model.generation_config.pad_token_id = 0
        model.save_pretrained(staging)
        byte_tokenizer().save_pretrained(staging)
    return target


def _intact(folder: Path) -> bool:
    """Whether the cached checkpoint opens with every shard whole (a truncated or corrupt one is rebuilt)."""
    try:
        CheckpointDir(folder).close()
        json.loads((folder / "config.json").read_text())
        json.loads((folder / "tokenizer.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def load_embedded_model(dtype: torch.dtype = torch.float32):
    """The embedded model fully in RAM, with its tokenizer: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)
