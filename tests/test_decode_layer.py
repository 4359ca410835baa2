"""The CPU decode step's decoder layer (decode_layer.py) against the layer's own forward.

Bit-identical logits step by step through the KV cache for every llama-form family, at full
precision (also against the unwrapped model) and under quantize_rest (the routers' logits from
the decode kernel, counted), where the native top-k gives the same up to rounding; a hook on any part it would bypass (a router hook that changes the
choice, a norm's hook) is honoured; a prefill and a masked batch run the layer's own forward;
unwrap leaves no trace.
"""

from __future__ import annotations

import pytest
import torch

import moe_runtime
from decoding import greedy_logits  # tests/decoding.py
from test_decode_attention import PROMPT, WITH_IT, _model, _wrapped


def _without_it(runtime, run):
    """run() with every decoder layer's own forward, then the decode layers back."""
    for layer in runtime.decode_layers:
        layer.remove()
    try:
        return run()
    finally:
        for layer in runtime.decode_layers:
            layer.install()


def _served(runtime) -> int:
    return sum(layer.steps for layer in runtime.decode_layers)


@pytest.mark.parametrize("family", WITH_IT)
@pytest.mark.parametrize("rest", [None, "int4-g32"])
def test_decode_steps_are_bit_identical_to_the_layers_own_forward(family, rest):
    model, runtime, layers = _wrapped(family, rest)
    assert len(runtime.decode_layers) == layers == moe_runtime.stats(model)["decode_layers"]
    assert all(layer.routed == (family != "qwen2_moe") for layer in runtime.decode_layers)  # Qwen2-MoE's shared expert: its block
    rules = [layer.rule for layer in runtime.decode_layers]
    assert all((rule is not None) == (rest is not None and layer.routed) for rule, layer in zip(rules, runtime.decode_layers))
    for layer in runtime.decode_layers:  # the family's own top-k rule: bit for bit
        layer.rule = None
    seen = sum(router.seen for router in runtime.kernel_routers)
    got = greedy_logits(model, PROMPT)
    assert _served(runtime) == 5 * layers  # the prefill ran the layers' own forward
    if rest is not None and family != "qwen2_moe":  # every router's logits from the decode kernel: each step's, and the prefill's (6 rows)
        assert sum(router.seen for router in runtime.kernel_routers) - seen == 6 * layers
    assert torch.equal(got, _without_it(runtime, lambda: greedy_logits(model, PROMPT)))
    assert _served(runtime) == 5 * layers
    if rest is None:
        assert torch.equal(got, greedy_logits(_model(family), PROMPT))
    for layer, rule in zip(runtime.decode_layers, rules):  # the native top-k: the same up to the last bits of exp
        layer.rule = rule
    assert torch.allclose(greedy_logits(model, PROMPT), got, rtol=0, atol=1e-4)


def test_a_router_hook_that_changes_the_choice_is_honoured():
    model = moe_runtime.wrap(_model("olmoe"), budget=1.0, device="cpu")
    runtime = moe_runtime.runtime_of(model)
    plain = greedy_logits(model, PROMPT)
    router = model.model.layers[1].mlp.gate

    def second_choice(module, inputs, output):  # the next-best experts instead of the best
        logits, _, _ = output
        weights, index = torch.topk(logits.float().softmax(-1), 2 * module.top_k, dim=-1)
        return logits, weights[:, module.top_k :].to(logits.dtype), index[:, module.top_k :]

    handle = router.register_forward_hook(second_choice)
    try:
        hooked = greedy_logits(model, PROMPT)
        assert [layer.steps for layer in runtime.decode_layers] == [10, 5, 10]  # only the hooked layer gave way
        assert not torch.equal(hooked, plain)
        assert torch.equal(hooked, _without_it(runtime, lambda: greedy_logits(model, PROMPT)))
    finally:
        handle.remove()
    assert torch.equal(greedy_logits(model, PROMPT), plain)
    assert runtime.decode_layers[1].steps == 10


def test_a_norm_hook_runs_and_a_masked_batch_takes_the_layers_forward():
    model = moe_runtime.wrap(_model("qwen3_moe"), budget=1.0, device="cpu")
    runtime = moe_runtime.runtime_of(model)
    calls = []
    handle = model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda module, inputs, output: calls.append(output.shape[1]))
    try:
        greedy_logits(model, PROMPT, steps=2)
    finally:
        handle.remove()
    assert calls == [PROMPT.shape[1], 1, 1]
    served = _served(runtime)
    ids = torch.cat([PROMPT, PROMPT.flip(1)])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert _served(runtime) == served
    assert torch.equal(padded, _without_it(runtime, lambda: model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False)))


def test_unwrap_leaves_the_layers_own_forward():
    model = moe_runtime.wrap(_model("mixtral"), budget=0.5, device="cpu")
    layers = list(model.model.layers)
    assert all("forward" in layer.__dict__ for layer in layers)
    moe_runtime.unwrap(model)
    assert not any("forward" in layer.__dict__ for layer in layers)
    assert torch.equal(greedy_logits(model, PROMPT), greedy_logits(_model("mixtral"), PROMPT))
