"""Timed greedy generation (moe_runtime/generation.py): exactly the tokens asked for."""

from __future__ import annotations

import pytest
import torch

import moe_runtime
from moe_runtime.generation import time_generation
from moe_runtime.tiny_models import tiny_model


@pytest.mark.parametrize("pad", [None, 5])
def test_exactly_the_tokens_asked_for_even_past_an_end_of_sequence_token(pad):
    """The model's end-of-sequence token is the first greedy token: generate() would stop there,
    time_generation goes on to the count asked for, and leaves the model's settings as they were."""
    model = moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, device="cpu")
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = first, pad
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 1  # stops at it
    timing = time_generation(model, ids, 5)
    assert timing.new_tokens == 5 and timing.tokens.shape == (1, ids.shape[1] + 5)
    assert int(timing.tokens[0, ids.shape[1]]) == first  # not masked, as min_new_tokens would
    with torch.no_grad():
        assert torch.equal(timing.tokens, _greedy(model, ids, 5))
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (first, pad)


def _greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full forwards, no generate(): [1, prompt + new_tokens]."""
    for _ in range(new_tokens):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids
