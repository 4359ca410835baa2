"""Shared fixtures: an isolated cache folder, tiny checkpoints per family, the shipped real traces."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; it is read when kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moe_runtime.tiny_models import TINY_FAMILIES, tiny_model  # noqa: E402

TRACE_DIR = Path(__file__).resolve().parent.parent / "moe_runtime" / "data" / "routing" / "esft-vanilla-lite"
TASKS = ("intent", "law", "summary", "translation")


def pytest_configure(config):
    # One cache per test session, so the embedded model is built the way a fresh user gets it.
    os.environ.setdefault("MOE_RUNTIME_CACHE", str(Path(config.rootpath) / ".pytest_cache" / "moe-runtime"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def trace_paths() -> dict[str, Path]:
    return {task: TRACE_DIR / f"{task}.npz" for task in TASKS}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A saved checkpoint directory (save_pretrained layout) of each tiny family."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for model_type in TINY_FAMILIES:
        path = root / model_type
        tiny_model(model_type).save_pretrained(path)
        paths[model_type] = path
    return paths


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    return request.param
