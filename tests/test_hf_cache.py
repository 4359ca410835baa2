"""Our stepwise loops pass the KV cache under the name the model's forward declares."""

from __future__ import annotations

import torch
from transformers import DynamicCache

import moe_runtime
from moe_runtime.hf_cache import cache_keyword, returned_cache
from moe_runtime.tiny_models import tiny_model


def test_a_forward_that_knows_only_past_key_values_gets_it():
    class Older(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return input_ids

    assert cache_keyword(Older()) == "past_key_values"


def test_token_by_token_with_the_named_cache_gives_the_full_forwards_logits():
    """Fed one token at a time with the cache under cache_keyword's name, a wrapped model's last
    logits equal one forward over all tokens; a cache the forward did not take (an unknown name
    swallowed by **kwargs) would leave the last token without its context and fail this."""
    model = moe_runtime.wrap(tiny_model("mixtral"), budget=0.5)
    ids = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(0))
    keyword = cache_keyword(model)
    with torch.no_grad():
        whole = model(input_ids=ids).logits[0, -1]
        cache = DynamicCache(config=model.config)
        for position in range(ids.shape[1]):
            output = model(input_ids=ids[:, position : position + 1], **{keyword: cache}, use_cache=True)
            cache = returned_cache(output)
    torch.testing.assert_close(output.logits[0, -1], whole, rtol=1e-4, atol=1e-4)
    assert cache.get_seq_length() == ids.shape[1]
    moe_runtime.unwrap(model)
