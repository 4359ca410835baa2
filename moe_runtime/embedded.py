"""The embedded default model: a small OLMoE trained here on four domains of real text, shipped
in the package and copied to a cache folder on first use.

moe_runtime/data/embedded/model (bf16 safetensors, BPE tokenizer, model card; made by
training/train_embedded.py) -> copied once, atomically, to the cache folder (a damaged copy is
copied again) -> `demo`, `evaluate embedded`, examples and tests. Beside it ship held-out text
per domain (data/embedded/heldout/DOMAIN.txt) and their routing traces with router inputs
(data/embedded/traces/DOMAIN.npz), made by training/embedded_artifacts.py. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .atomic import staging_directory
from .checkpoint import CheckpointDir

EMBEDDED_NAME = "embedded-olmoe-v2"
DATA_DIR = Path(__file__).resolve().parent / "data" / "embedded"
PACKAGED_MODEL_DIR = DATA_DIR / "model"
HELDOUT_DIR = DATA_DIR / "heldout"
TRACES_DIR = DATA_DIR / "traces"
EMBEDDED_DOMAINS = ("code", "manual", "legal", "translation")
PIECE_SEPARATOR = "\n\f\n"  # between the held-out pieces of a DOMAIN.txt (a form-feed line)

DEMO_PROMPTS = (
    "def read_config(path):\n    \"\"\"Return the settings stored in the file at path.\"\"\"\n",
    "NAME\n       chmod - change file mode bits\n\nSYNOPSIS\n",
    "Permission is hereby granted, free of charge, to any person obtaining a copy",
    "English: cannot open file for reading\nFrench:",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "DESCRIPTION\n       The open() system call opens the file specified by pathname.",
    "THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS",
    "English: memory exhausted\nGerman:",
)


def cache_root() -> Path:
    """Where built artefacts live: $MOE_RUNTIME_CACHE, else ~/.cache/moe-runtime."""
    return Path(os.environ.get("MOE_RUNTIME_CACHE", Path.home() / ".cache" / "moe-runtime"))


def embedded_model_dir(*, rebuild: bool = False) -> Path:
    """The embedded model's checkpoint folder in the cache: copied from the package on first use,
    when `rebuild`, when damaged, or when the package ships a different model."""
    if not (PACKAGED_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"the embedded model is missing from the package ({PACKAGED_MODEL_DIR}); reinstall moe-runtime")
    target = cache_root() / EMBEDDED_NAME
    if not rebuild and _intact(target) and _same_files(target, PACKAGED_MODEL_DIR):
        return target
    with staging_directory(target, "embedded model cache", legacy=lambda folder: (folder / "config.json").is_file()) as staging:
        for name in _model_files():
            shutil.copyfile(PACKAGED_MODEL_DIR / name, staging / name)
    return target


def _model_files() -> list[str]:
    """The shipped model folder's files (weights, config, tokenizer, card, loss plot)."""
    return sorted(p.name for p in PACKAGED_MODEL_DIR.iterdir() if p.is_file() and not p.name.startswith("."))


def _same_files(copy: Path, original: Path) -> bool:
    """Whether the cached copy holds the shipped files at their sizes, with the same config."""
    names = _model_files()
    return all((copy / name).is_file() and (copy / name).stat().st_size == (original / name).stat().st_size for name in names) and (
        (copy / "config.json").read_bytes() == (original / "config.json").read_bytes()
    )


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


def heldout_pieces(domain: str) -> list[str]:
    """The held-out pieces of one domain (about 256 tokens each, from documents never trained on)."""
    if domain not in EMBEDDED_DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; the embedded model's domains are {', '.join(EMBEDDED_DOMAINS)}")
    return (HELDOUT_DIR / f"{domain}.txt").read_text().split(PIECE_SEPARATOR)
