"""write_random_checkpoint: a checkpoint written a layer at a time that transformers and
from_pretrained both load whole, for every family."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moe_runtime
from moe_runtime.random_checkpoint import write_random_checkpoint
from moe_runtime.tiny_models import TINY_FAMILIES, tiny_config, tiny_model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_random_checkpoint_loads_whole_in_transformers_and_offloaded(family, tmp_path):
    write_random_checkpoint(tiny_config(family), tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).architectures == [type(tiny_model(family)).__name__]  # converters read it
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(0))
    offloaded = moe_runtime.from_pretrained(tmp_path, budget=0.5, dtype=torch.float32)
    with torch.no_grad():
        want = model.eval()(ids).logits
        torch.testing.assert_close(offloaded(ids).logits, want, atol=1e-4 * max(1.0, want.abs().max().item()), rtol=1e-4)
