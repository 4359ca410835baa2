"""The CPU decode path's attention (decode_attention.py) against transformers' own forward.

Bit-identical logits, step by step through the KV cache, for every family that has it, at
full precision (also against the unwrapped model) and with quantize_rest (projections
computed together) where SDPA computes the attention; quantize_rest's native one-query
attention (cpu_decode_ops.attend) against SDPA within rounding, and its logits close to
SDPA's; one-token steps only (the prefill and a padded batch go to transformers); unwrap
leaves no trace of it; families without it keep transformers' forward.
"""

from __future__ import annotations

import pytest
import torch

import moe_runtime
from moe_runtime.adapters import adapter_for
from moe_runtime.decode_attention import _sdpa
from moe_runtime.kernels import cpu_decode_ops, cpu_gemv
from moe_runtime.tiny_models import TINY_FAMILIES, expert_fields, tiny_model

from decoding import greedy_logits  # tests/decoding.py

WITH_IT = [family for family in TINY_FAMILIES if adapter_for(tiny_model(family).config).decode_attention is not None]
PROMPT = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(4))


def _model(family: str, dtype=torch.float32):
    """A tiny model whose expert width (64) every int4 group divides."""
    return tiny_model(family, **expert_fields(family, num_experts=8, intermediate_size=64, top_k=2)).to(dtype)


def _without_it(runtime, run):
    """run() with transformers' attention forward in every layer (and the layers' own forward,
    which calls it), then the decode path back."""
    for replaced in [*runtime.decode_layers, *runtime.decode_attention]:
        replaced.remove()
    try:
        return run()
    finally:
        for replaced in [*runtime.decode_attention, *runtime.decode_layers]:
            replaced.install()


def _with_sdpa(runtime, run):
    """run() with the decode path computing its attention by SDPA and its routers' top k by the
    family's rule (as at full precision)."""
    kept = [attention.attend for attention in runtime.decode_attention]
    rules = [layer.rule for layer in runtime.decode_layers]
    for attention in runtime.decode_attention:
        attention.attend = _sdpa
    for layer in runtime.decode_layers:
        layer.rule = None
    try:
        return run()
    finally:
        for attention, attend in zip(runtime.decode_attention, kept):
            attention.attend = attend
        for layer, rule in zip(runtime.decode_layers, rules):
            layer.rule = rule


def _wrapped(family: str, rest: str | None):
    """(model, runtime, decoder layers): the tiny model wrapped whole on the CPU, its experts and
    other linear layers in `rest` (None: full precision); skipped where `rest` needs the kernel."""
    if rest is not None and not cpu_gemv.available():
        pytest.skip("the CPU decode kernel is not built here")
    model = moe_runtime.wrap(_model(family), budget=1.0, device="cpu", quantize=rest, quantize_rest=rest)
    return model, moe_runtime.runtime_of(model), model.config.num_hidden_layers


@pytest.mark.parametrize("family", WITH_IT)
@pytest.mark.parametrize("rest", [None, "int8", "int4-g32"])
def test_decode_steps_are_bit_identical_to_transformers_attention(family, rest):
    model, runtime, layers = _wrapped(family, rest)
    assert len(runtime.decode_attention) == layers == moe_runtime.stats(model)["decode_attention_layers"]
    got = _with_sdpa(runtime, lambda: greedy_logits(model, PROMPT))
    assert sum(attention.steps for attention in runtime.decode_attention) == 5 * layers  # the prefill went to transformers
    assert torch.equal(got, _without_it(runtime, lambda: greedy_logits(model, PROMPT)))
    if rest is None:
        assert torch.equal(got, greedy_logits(_model(family), PROMPT))  # and the unwrapped model's
        assert all(attention.attend is _sdpa for attention in runtime.decode_attention)
    if rest is not None:  # k and v (one shape under GQA) in one kernel call, q alone
        assert [len(group) for group in runtime.decode_attention[0].together] == [1, 2]
        assert all(attention.attend is cpu_decode_ops.attend for attention in runtime.decode_attention)
        native = greedy_logits(model, PROMPT)  # the native attention: the same up to rounding
        assert torch.allclose(native, got, rtol=0, atol=1e-4)


def test_bf16_and_a_padded_batch_take_the_right_path():
    """bf16 activations are identical too; a batch with padding has a mask: transformers' forward."""
    model = moe_runtime.wrap(_model("olmoe", torch.bfloat16), budget=1.0, device="cpu", quantize="int8", quantize_rest="int8")
    runtime = moe_runtime.runtime_of(model)
    got = _with_sdpa(runtime, lambda: greedy_logits(model, PROMPT))
    assert torch.equal(got, _without_it(runtime, lambda: greedy_logits(model, PROMPT)))
    served = sum(attention.steps for attention in runtime.decode_attention)
    ids = torch.cat([PROMPT, PROMPT.flip(1)])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        padded = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert sum(attention.steps for attention in runtime.decode_attention) == served
        assert torch.equal(padded, _without_it(runtime, lambda: model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_unwrap_leaves_transformers_forward_and_other_families_keep_it(family):
    model = moe_runtime.wrap(_model(family), budget=0.5, device="cpu")
    attentions = [layer.self_attn for layer in model.model.layers]
    assert all(("forward" in attention.__dict__) == (family in WITH_IT) for attention in attentions)
    moe_runtime.unwrap(model)
    assert not any("forward" in attention.__dict__ for attention in attentions)
    assert torch.equal(greedy_logits(model, PROMPT), greedy_logits(_model(family), PROMPT))


def test_a_forward_set_on_the_module_before_wrap_keeps_every_step():
    model = _model("mixtral")
    attention = model.model.layers[0].self_attn
    calls = []

    def traced(*args, **kwargs):
        calls.append(kwargs["hidden_states"].shape[1])
        return type(attention).forward(attention, *args, **kwargs)

    attention.forward = traced
    moe_runtime.wrap(model, budget=1.0, device="cpu")
    assert len(moe_runtime.runtime_of(model).decode_attention) == model.config.num_hidden_layers - 1  # not on this one
    greedy_logits(model, PROMPT, steps=2)
    assert calls == [PROMPT.shape[1], 1, 1]  # the prefill and both one-token steps
    moe_runtime.unwrap(model)
    assert attention.forward is traced


def _counting_steps(runtime, monkeypatch) -> list:
    """Calls of cpu_decode_ops.attend_step from here on, counted; the decode layers take their
    ops one by one (their native front calls attend_step inside one native call: layer_front.py)."""
    for layer in runtime.decode_layers:
        layer.native_front = False
    calls, original = [], cpu_decode_ops.attend_step
    monkeypatch.setattr(cpu_decode_ops, "attend_step", lambda *args: calls.append(1) or original(*args))
    return calls


@pytest.mark.parametrize("family", WITH_IT)
@pytest.mark.parametrize("formats", [{"quantize_rest": "int4-g32", "quantize": "int4-g32"}, {"exact": False}], ids=["int4", "exact-false"])
def test_a_step_in_one_native_call_is_bit_identical_to_its_ops_one_by_one(family, formats, monkeypatch):
    if not cpu_gemv.available():
        pytest.skip("the CPU decode kernel is not built here")
    model = moe_runtime.wrap(_model(family, torch.bfloat16), budget=1.0, device="cpu", **formats)
    runtime = moe_runtime.runtime_of(model)
    calls = _counting_steps(runtime, monkeypatch)
    fused = greedy_logits(model, PROMPT, steps=70)  # past the first room's 64 positions: one regrowth
    assert len(calls) == 70 * model.config.num_hidden_layers
    for attention in runtime.decode_attention:
        attention.fused = False
    assert torch.equal(fused, greedy_logits(model, PROMPT, steps=70))
    assert len(calls) == 70 * model.config.num_hidden_layers


def test_clip_qkv_and_norms_not_served_natively_are_kept(monkeypatch):
    """OLMoE's clip_qkv is applied in the native step too; with the q/k norms' native forward
    removed, the step takes its ops one by one (the norms' own forward) and gives the same."""
    model = _model("olmoe", torch.bfloat16)
    model.config.clip_qkv = 0.05
    for layer in model.model.layers:
        layer.self_attn.config.clip_qkv = 0.05
    model = moe_runtime.wrap(model, budget=1.0, device="cpu", exact=False)
    runtime = moe_runtime.runtime_of(model)
    assert all(attention.clip == 0.05 for attention in runtime.decode_attention)
    calls = _counting_steps(runtime, monkeypatch)
    fused = greedy_logits(model, PROMPT)
    assert len(calls) == 5 * model.config.num_hidden_layers
    for attention in runtime.decode_attention:
        attention.fused = False
    assert torch.equal(fused, greedy_logits(model, PROMPT))
    for attention in runtime.decode_attention:
        attention.fused = True
    q_norms = [attention.qk_norms[0] for attention in runtime.decode_attention]
    for norm in q_norms:
        norm.remove()
    try:
        unserved = greedy_logits(model, PROMPT)
    finally:
        for norm in q_norms:
            norm.install()
    assert len(calls) == 5 * model.config.num_hidden_layers  # no native step without native norms
    assert torch.allclose(unserved, fused, rtol=0, atol=0.05)  # the family's norm sums in torch's order: not bit for bit under exact=False


def test_the_native_step_refuses_what_it_does_not_take():
    if not cpu_decode_ops.available():
        pytest.skip("the CPU decode ops cannot be built here")
    q, k, v = torch.randn(1, 8), torch.randn(1, 4), torch.randn(1, 4)
    cos, sin = torch.randn(1, 1, 4), torch.randn(1, 1, 4)
    keys, values = torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4)
    step = lambda **changed: cpu_decode_ops.attend_step(  # noqa: E731
        **{"q": q.clone(), "k": k.clone(), "v": v.clone(), "norms": 0, "q_weight": None, "k_weight": None, "q_eps": 1e-6, "k_eps": 1e-6, "exact": False,
           "clip": 0.0, "cos": cos, "sin": sin, "keys": keys, "values": values, "length": 2, "scale": 0.5, **changed})
    assert step().shape == (1, 8)
    with pytest.raises(RuntimeError, match="no room at position 3"):
        step(length=3)
    with pytest.raises(RuntimeError, match="one dtype"):
        step(v=v.double())
    with pytest.raises(RuntimeError, match="norm weights"):
        step(norms=1, q_weight=torch.ones(8), k_weight=torch.ones(3))
    with pytest.raises(RuntimeError, match="heads or widths"):
        step(k=torch.randn(1, 6))
