"""The CPU decode step's native small ops (kernels/cpu_decode_ops.cpp) and the RMS norms that use
them (native_norms.py): bit for bit what transformers computes, or not used at all.

The ops against each family's own norm class and rotary function in every dtype they take and
over twelve orders of magnitude; the norms installed only where (and for the input dtypes in
which) they reproduce the module, GPT-OSS's differently rounded norm refused; bf16 models
wrapped on a CPU decode with logits equal to the unwrapped model's; unwrap removes them. The
one-query attention (not bit for bit: quantize_rest's) as close to an fp64 reference as SDPA.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import moe_runtime
from moe_runtime import decode_attention
from moe_runtime.kernels import cpu_decode_ops
from moe_runtime.native_norms import NativeNorm, install_native_norms, reproduced_dtypes
from moe_runtime.tiny_models import TINY_FAMILIES, tiny_model

from decoding import greedy_logits  # tests/decoding.py

pytestmark = pytest.mark.skipif(not cpu_decode_ops.available(), reason="the CPU decode ops cannot be built here (no C++ compiler)")

LLAMA_FORM = {"olmoe": "OlmoeRMSNorm", "qwen3_moe": "Qwen3MoeRMSNorm", "qwen2_moe": "Qwen2MoeRMSNorm", "mixtral": "MixtralRMSNorm", "deepseek_v2": "DeepseekV2RMSNorm"}
ROTARY = ["olmoe", "qwen3_moe", "qwen2_moe", "mixtral"]
PROMPT = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(5))
DTYPE_PAIRS = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


def _family(name: str):
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


@pytest.mark.parametrize("family", LLAMA_FORM)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda pair: f"{pair[0]}-weight-{pair[1]}".replace("torch.", ""))
def test_rms_norm_is_bit_identical_to_the_family_norm(family, dtypes):
    x_dtype, weight_dtype = dtypes
    generator = torch.Generator().manual_seed(1)
    for hidden, rows, scale in [(1024, 1, 1e-4), (64, 3, 1.0), (2048, 2, 1e3), (1000, 5, 1e-2), (4096, 1, 1e4)]:
        norm = getattr(_family(family), LLAMA_FORM[family])(hidden, eps=1e-6).to(weight_dtype)
        norm.weight.data = torch.randn(hidden, generator=generator).to(weight_dtype)
        x = (torch.randn(rows, 1, hidden, generator=generator) * scale).to(x_dtype)
        want = norm(x)
        got = cpu_decode_ops.rms_norm(x, norm.weight, norm.variance_epsilon)
        assert got.dtype == want.dtype and torch.equal(got, want), (hidden, rows, scale)


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda pair: f"{pair[0]}-weight-{pair[1]}".replace("torch.", ""))
def test_rms_norm_summing_in_its_own_order_is_within_rounding_of_the_family_norm(dtypes):
    """exact=False: the mean of squares summed in one fp32 pass, not by at::mean; the outputs
    differ from the exact ones by the roundings after it: the normalized x's (to x's dtype, an
    ulp) and the product's (four of the output's dtype), relative to the output."""
    x_dtype, weight_dtype = dtypes
    generator = torch.Generator().manual_seed(7)
    differs = []
    for hidden, rows, scale in [(1024, 1, 1e-4), (64, 3, 1.0), (2048, 2, 1e3), (1000, 5, 1e-2), (4096, 1, 1e4)]:
        norm = _family("olmoe").OlmoeRMSNorm(hidden, eps=1e-6).to(weight_dtype)
        norm.weight.data = torch.randn(hidden, generator=generator).to(weight_dtype)
        x = (torch.randn(rows, 1, hidden, generator=generator) * scale).to(x_dtype)
        want = norm(x)
        got = cpu_decode_ops.rms_norm(x, norm.weight, norm.variance_epsilon, exact=False)
        tolerance = 2 * torch.finfo(x_dtype).eps + 4 * torch.finfo(want.dtype).eps
        assert got.dtype == want.dtype
        assert ((got.float() - want.float()).abs() <= tolerance * want.float().abs()).all(), (hidden, rows, scale)
        differs.append(not torch.equal(got, want))
    assert any(differs) or x_dtype == torch.bfloat16  # its own sum, not at::mean (bf16 rounds the difference away)


@pytest.mark.parametrize("family", ROTARY)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rotary_embedding_is_bit_identical_to_the_family_function(family, dtype):
    """Decode and prefill shapes, GQA, and one position table for a batch of two."""
    rotate = _family(family).apply_rotary_pos_emb
    generator = torch.Generator().manual_seed(2)
    for batch, table_batch, seq, q_heads, kv_heads, head_dim in [(1, 1, 1, 16, 16, 64), (2, 2, 1, 8, 2, 128), (2, 1, 5, 4, 4, 32)]:
        q = torch.randn(batch, seq, q_heads, head_dim, generator=generator).to(dtype).transpose(1, 2)  # as the attention views it
        k = torch.randn(batch, seq, kv_heads, head_dim, generator=generator).to(dtype).transpose(1, 2)
        angles = torch.randn(table_batch, seq, head_dim, generator=generator) * 300
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        for want, got in zip(rotate(q, k, cos, sin), cpu_decode_ops.rotate(q, k, cos, sin)):
            assert torch.equal(got, want)


def test_shapes_the_native_rotation_does_not_take_go_to_the_family_function():
    """A position table of one step for a query of five broadcasts in the family's function:
    the native op refuses it with an error, and decode attention's rotation hands it over."""
    rotate = _family("olmoe").apply_rotary_pos_emb
    generator = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 4, 5, 64, generator=generator).bfloat16() for _ in range(2))
    angles = torch.randn(1, 1, 64, generator=generator) * 300
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    with pytest.raises(RuntimeError, match="do not match"):
        cpu_decode_ops.rotate(q, k, cos, sin)
    rotation = decode_attention.rotation(rotate)
    assert isinstance(rotation, decode_attention.NativeRotation)
    for want, got in zip(rotate(q, k, cos, sin), rotation(q, k, cos, sin)):
        assert torch.equal(got, want)


def test_a_norm_that_rounds_differently_is_refused_whatever_its_weights():
    """GPT-OSS's norm multiplies by the weight before rounding once. Initialized to ones it
    agrees with the native op on every input; the check also tries random weights, so it is
    refused for bf16 inputs, and kept for fp32 ones, where the two roundings coincide."""
    bf16 = _family("gpt_oss").GptOssRMSNorm(256).to(torch.bfloat16)
    assert torch.all(bf16.weight == 1)
    assert reproduced_dtypes(bf16) == frozenset()
    fp32 = _family("gpt_oss").GptOssRMSNorm(256)
    assert reproduced_dtypes(fp32) == frozenset({torch.float32})
    llama = _family("olmoe").OlmoeRMSNorm(256).to(torch.bfloat16)
    assert reproduced_dtypes(llama) == frozenset({torch.bfloat16})  # fp16 or fp32 inputs promote differently


def test_install_skips_what_is_not_a_norm_it_reproduces_or_was_replaced():
    model = tiny_model("olmoe", dtype=torch.bfloat16)
    theirs = model.model.norm
    theirs.forward = lambda hidden_states: hidden_states  # someone else's forward: left alone
    installed = install_native_norms(model)
    norms = [m for m in model.modules() if type(m).__name__ == "OlmoeRMSNorm"]
    assert {id(n.module) for n in installed} == {id(m) for m in norms if m is not theirs}
    assert all(isinstance(m.forward.__self__, NativeNorm) for m in norms if m is not theirs)
    for norm in installed:
        norm.remove()
    assert all("forward" not in m.__dict__ for m in norms if m is not theirs)
    assert install_native_norms(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))) == []


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_bf16_model_on_a_cpu_decodes_exactly_as_without_them(family):
    """Stepwise logits through the KV cache equal, bit for bit, those of the same wrapped model
    with transformers' norms and rotary function put back (and, where the rest of the wrapped
    path is exact in bf16, the unwrapped model's); unwrap takes them away."""
    model = moe_runtime.wrap(tiny_model(family, dtype=torch.bfloat16), budget=1.0, device="cpu")
    runtime = moe_runtime.runtime_of(model)
    expected_norms = 0 if family == "gpt_oss" else len([m for m in model.modules() if type(m).__name__.endswith("RMSNorm")])
    assert moe_runtime.stats(model)["native_norms"] == len(runtime.native_norms) == expected_norms
    native = greedy_logits(model, PROMPT)
    assert torch.equal(native, _without_native_ops(runtime, lambda: greedy_logits(model, PROMPT)))
    if family in ("olmoe", "qwen3_moe", "qwen2_moe"):
        assert torch.equal(native, greedy_logits(tiny_model(family, dtype=torch.bfloat16), PROMPT))
    moe_runtime.unwrap(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def _without_native_ops(runtime, run):
    """run() with every norm's and attention's own code, then the native ops back."""
    rotations = [attention.rotate for attention in runtime.decode_attention]
    for norm in runtime.native_norms:
        norm.remove()
    for attention in runtime.decode_attention:
        attention.rotate = attention.family_rotate
    try:
        return run()
    finally:
        for norm in runtime.native_norms:
            norm.install()
        for attention, rotate in zip(runtime.decode_attention, rotations):
            attention.rotate = rotate



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 4, 1, 32, 32), (1, 16, 16, 20, 64, 64), (2, 8, 2, 300, 128, 128), (1, 4, 2, 50, 192, 128)], ids=str)
def test_one_query_attention_is_as_close_to_the_exact_result_as_sdpa(dtype, shape):
    """(B, Hq, Hk, T, D, Dv): GQA, a batch, a context long enough for threads, MLA-like Dv != D;
    the error against an fp64 reference at most SDPA's own plus two ulps of the output's largest
    value (a rounded output is off by up to half of one; fp32 sums of 300 terms by a few)."""
    batch, heads, kv_heads, length, width, value_width = shape
    generator = torch.Generator().manual_seed(length)
    q, k = (torch.randn(batch, h, n, width, generator=generator).to(dtype) for h, n in ((heads, 1), (kv_heads, length)))
    v = torch.randn(batch, kv_heads, length, value_width, generator=generator).to(dtype)
    scale = width**-0.5
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale, enable_gqa=heads != kv_heads)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=heads != kv_heads)
    native = cpu_decode_ops.attend(q, k, v, scale)
    assert native.shape == sdpa.shape and native.dtype == dtype
    ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert (native.double() - exact).abs().max() <= (sdpa.double() - exact).abs().max() + 2 * ulp


def test_one_query_attention_refuses_what_it_does_not_take():
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    for bad in [(torch.randn(1, 4, 2, 8), k, k), (q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8)), (q, k, torch.randn(1, 2, 4, 8)), (q, k, k.double())]:
        with pytest.raises(RuntimeError, match="attend:"):
            cpu_decode_ops.attend(*bad, 1.0)


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen3_moe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_top_k_softmax_applies_the_familys_rule_up_to_rounding(family, dtype):
    """The router's own forward on random logits of several spreads: the same experts (as a set:
    exact ties may be ordered otherwise), weights within an ulp of the dtype, the same dtype."""
    from moe_runtime.adapters import adapter_for

    model = tiny_model(family)
    adapter, router = adapter_for(model.config), model.model.layers[0].mlp.gate
    rule = adapter.top_k_rule(router)
    generator = torch.Generator().manual_seed(6)
    for spread in (0.1, 3.0, 30.0):
        logits = (torch.randn(7, router.weight.shape[0], generator=generator) * spread).to(dtype)
        want_weights, want_index = adapter.select(router, logits, None)
        weights, index = cpu_decode_ops.top_k_softmax(logits, *rule)
        assert weights.dtype == want_weights.dtype and index.dtype == torch.long
        assert torch.equal(index.sort(-1).values, want_index.sort(-1).values)
        tolerance = 1e-6 if weights.dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        assert torch.allclose(weights.float().sort(-1).values, want_weights.float().sort(-1).values, rtol=0, atol=tolerance)


def test_top_k_softmax_refuses_what_it_does_not_take():
    with pytest.raises(RuntimeError, match="k must be in 1..E"):
        cpu_decode_ops.top_k_softmax(torch.randn(1, 4), 5, True, True)
    with pytest.raises(RuntimeError, match=r"CPU logits \[T, E\]"):
        cpu_decode_ops.top_k_softmax(torch.randn(4), 2, True, True)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        cpu_decode_ops.top_k_softmax(torch.randn(1, 4).double(), 2, True, True)
