"""exact=False on a CPU (config.exact_decode): every product by the decode kernel, the routers'
logits too, one native call per attention; at full precision and with quantize_rest.

The default stays exact at full precision (the unwrapped model's logits bit for bit, tested in
test_decode_attention and test_native_ops) and inexact under quantize_rest unless exact=True
asks otherwise; with exact=False every family's stepwise logits stay close to the exact ones
(sums in another order, nothing else), the dense layers, routers and attention take the fast
ops (and experts stored [N, K]; GPT-OSS's transposed ones keep torch's); unwrap gives back
nn.Linear modules holding the very same weights, and save_pretrained writes them (state_dict
unchanged); experts read from disk into host buffers take the kernel too; threads generating at
once each get their single-thread answer (the routers' TorchFunctionMode is per thread); a
wrong value of `exact` is refused by name.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import moe_runtime
from moe_runtime.decode_attention import _sdpa
from moe_runtime.kernel_linears import KernelLinear
from moe_runtime.kernels import cpu_decode_ops, cpu_gemv
from moe_runtime.tiny_models import TINY_FAMILIES, expert_fields, tiny_model

from decoding import greedy_logits  # tests/decoding.py

pytestmark = pytest.mark.skipif(not (cpu_gemv.available() and cpu_decode_ops.available()), reason="the CPU kernels cannot be built here")

PROMPT = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(7))
WIDTH = 96  # the experts' width: their gate_up_proj [2 * WIDTH, H] is no other matrix's shape


def _model(family: str, dtype=torch.float32):
    return tiny_model(family, dtype=dtype, **expert_fields(family, num_experts=8, intermediate_size=WIDTH, top_k=2))


class KernelCalls:
    """Counts the decode kernel's calls by the weights' shapes while active (cpu_gemv.products,
    and cpu_gemv.silu_experts by its gate_up matrices: `fused` lists those)."""

    def __init__(self):
        self.shapes: list[tuple] = []
        self.fused: list[tuple] = []
        self._products, self._silu_experts = cpu_gemv.products, cpu_gemv.silu_experts

    def __enter__(self):
        cpu_gemv.products, cpu_gemv.silu_experts = self._counted, self._counted_experts
        return self

    def __exit__(self, *_):
        cpu_gemv.products, cpu_gemv.silu_experts = self._products, self._silu_experts

    def _counted(self, x, matrices, *args, **kwargs):
        self.shapes.append((len(matrices), tuple(matrices[0].shape), matrices[0].dtype))
        return self._products(x, matrices, *args, **kwargs)

    def _counted_experts(self, x, gate_up, down, combine):
        matrices = gate_up[0]
        self.shapes.append((len(matrices), tuple(matrices[0].shape), matrices[0].dtype))
        self.fused.append(self.shapes[-1])
        return self._silu_experts(x, gate_up, down, combine)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_full_precision_takes_the_fast_ops_and_stays_close(family):
    exact = greedy_logits(_model(family), PROMPT)
    model = moe_runtime.wrap(_model(family), budget=1.0, device="cpu", exact=False)
    runtime = moe_runtime.runtime_of(model)
    stats = moe_runtime.stats(model)
    assert stats["exact"] is False and stats["kernel_routers"] == len(runtime.blocks)
    linears = [module for module in model.modules() if isinstance(module, KernelLinear)]
    assert len(linears) == stats["kernel_linears"] > 0 and model.lm_head in linears
    assert all(attention.attend is cpu_decode_ops.attend for attention in runtime.decode_attention)
    for layer in runtime.decode_layers:  # the kernels' calls counted op by op (the native front makes them inside one: layer_front.py)
        layer.native_front = False
    with KernelCalls() as calls:
        fast = greedy_logits(model, PROMPT)
    for layer in runtime.decode_layers:
        layer.native_front = True
    assert torch.equal(greedy_logits(model, PROMPT), fast)
    expert_calls = [shape for shape in calls.shapes if shape[:2] == (runtime.top_k, (2 * WIDTH, model.config.hidden_size))]
    assert len(expert_calls) == (0 if runtime.layout.is_transposed else 5 * len(runtime.blocks))  # each decode step's layer in one call
    assert calls.fused == expert_calls  # plain SwiGLU: both GEMMs and the gate between them
    assert all(dtype == torch.float32 for _, _, dtype in calls.shapes)  # full precision: no quantized copy anywhere
    torch.testing.assert_close(fast, exact, rtol=0, atol=1e-4)
    assert not torch.equal(fast, exact)  # another order of sums: not the exact path
    moe_runtime.unwrap(model)
    assert not any(isinstance(module, KernelLinear) for module in model.modules())
    assert all(type(module.weight) is nn.Parameter and not module.weight.is_meta for module in model.modules() if isinstance(module, nn.Linear))
    assert torch.equal(greedy_logits(model, PROMPT), exact)  # the same weights back, the exact ops again


def test_a_bf16_model_decodes_close_to_its_exact_self():
    exact = greedy_logits(moe_runtime.wrap(_model("olmoe", torch.bfloat16), budget=1.0, device="cpu"), PROMPT)
    fast = greedy_logits(moe_runtime.wrap(_model("olmoe", torch.bfloat16), budget=1.0, device="cpu", exact=False), PROMPT)
    assert (fast - exact).abs().max() <= 0.05 * exact.abs().max()  # bf16 rounds each layer's sums in another order


def test_save_pretrained_and_state_dict_hold_the_same_weights(tmp_path):
    reference = _model("qwen2_moe")
    model = moe_runtime.wrap(_model("qwen2_moe"), budget=1.0, device="cpu", exact=False)
    state, expected = model.state_dict(), reference.state_dict()
    assert set(state) == set(expected) and all(torch.equal(state[name], tensor) for name, tensor in expected.items())
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", local_files_only=True).eval()
    # closeness, as in test_wrapped_model: a reload of even an exact wrap is 6e-8 off
    torch.testing.assert_close(greedy_logits(reloaded, PROMPT), greedy_logits(reference, PROMPT))


def test_experts_read_from_disk_take_the_kernel(tiny_checkpoints):
    exact = greedy_logits(moe_runtime.from_pretrained(tiny_checkpoints["mixtral"], budget=0.25, device="cpu", host_budget=0, dtype=torch.float32), PROMPT)
    model = moe_runtime.from_pretrained(tiny_checkpoints["mixtral"], budget=0.25, device="cpu", host_budget=0, dtype=torch.float32, exact=False)
    with KernelCalls() as calls:
        fast = greedy_logits(model, PROMPT)
    gate_up = moe_runtime.runtime_of(model).blocks[0].expert_shapes()["gate_up_proj"]
    assert any(shape == gate_up for _, shape, _ in calls.shapes)  # the experts' GEMMs, read from the buffers the disk filled
    torch.testing.assert_close(fast, exact, rtol=0, atol=1e-4)
    assert moe_runtime.stats(model)["misses"] > 0


def test_threads_generating_at_once_each_get_their_own_answer():
    model = moe_runtime.wrap(_model("olmoe", torch.bfloat16), budget=0.5, device="cpu", exact=False)
    prompts = [torch.randint(3, 300, (1, 4 + n), generator=torch.Generator().manual_seed(n)) for n in range(4)]
    alone = [greedy_logits(model, ids) for ids in prompts]
    together: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda n=n: together.__setitem__(n, greedy_logits(model, prompts[n]))) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(torch.equal(together[n], alone[n]) for n in range(4))


def test_quantize_rest_is_inexact_unless_exact_is_asked_for():
    inexact = moe_runtime.runtime_of(moe_runtime.wrap(_model("qwen3_moe"), budget=1.0, device="cpu", quantize="int8", quantize_rest="int8"))
    assert inexact.exact is False and inexact.kernel_routers and inexact.decode_attention[0].attend is cpu_decode_ops.attend
    assert inexact.native_norms and not any(norm.exact for norm in inexact.native_norms)
    exact = moe_runtime.runtime_of(moe_runtime.wrap(_model("qwen3_moe"), budget=1.0, device="cpu", quantize="int8", quantize_rest="int8", exact=True))
    assert exact.exact is True and exact.kernel_routers == [] and exact.decode_attention[0].attend is _sdpa
    assert exact.native_norms and all(norm.exact for norm in exact.native_norms)
    plain = moe_runtime.runtime_of(moe_runtime.wrap(_model("qwen3_moe"), budget=1.0, device="cpu"))
    assert plain.exact is True and plain.dense is None and plain.kernel_routers == []


@pytest.mark.parametrize("bad", ["no", 0, 1.0])
def test_a_wrong_exact_is_refused_by_name(bad):
    model = _model("olmoe")
    with pytest.raises(TypeError, match="exact must be True, False or None"):
        moe_runtime.wrap(model, budget=1.0, device="cpu", exact=bad)
    assert not hasattr(model, "_moe_runtime")
