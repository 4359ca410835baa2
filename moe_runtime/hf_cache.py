"""The KV cache's keyword in a transformers causal LM's forward, for every transformers 5.

transformers 5.24 takes the cache as `cache` (and returns it as `output.cache`), and turns
`past_key_values` into it with a warning; 5.25 warns that `past_key_values` goes in 5.40. The
first 5.x releases knew only `past_key_values`. Our own stepwise loops (evaluation, live bench)
pass the cache under whichever name the model's forward declares, so that neither an old nor a
new transformers feeds a token without its cache.
"""

from __future__ import annotations

import inspect


def cache_keyword(model) -> str:
    """'cache' if `model.forward` declares it, else 'past_key_values'."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a forward returned: `output.cache`, or `output.past_key_values` before it."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
