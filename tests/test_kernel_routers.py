"""Routers where a decode step need not be exact (kernel_routers.py; quantize_rest's default):
their logits by the decode kernel on a CPU.

Installed on every router that computes its logits as F.linear(x, weight) (every tiny family's:
DeepSeek's casts its weight to fp32, which it is already), never at full precision; logits
within a few ulps of the terms' magnitude of the router's own, and the same experts chosen
wherever the choice is not a near tie; a prefill's rows keep torch's GEMM, bit for bit; a whole decode's logits close to
those with torch's routers; unwrap and a replaced forward leave the router's own code.
"""

from __future__ import annotations

import pickle

import pytest
import torch

import moe_runtime
from moe_runtime.kernel_routers import KERNEL_ROWS, KernelRouter, install_kernel_routers
from moe_runtime.kernels import cpu_gemv
from moe_runtime.tiny_models import TINY_FAMILIES, expert_fields, tiny_model

from decoding import greedy_logits  # tests/decoding.py

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="the CPU decode kernel cannot be built here (no C++ compiler)")

PROMPT = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(6))


def _wrapped(family: str, dtype: torch.dtype):
    model = tiny_model(family, dtype=dtype, **expert_fields(family, num_experts=8, intermediate_size=64, top_k=2))
    return moe_runtime.wrap(model, budget=1.0, device="cpu", quantize="int8", quantize_rest="int8")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_routers_take_the_kernel_and_choose_as_their_own_forward(family):
    model = _wrapped(family, torch.bfloat16)
    runtime = moe_runtime.runtime_of(model)
    expected = len(runtime.blocks)
    assert moe_runtime.stats(model)["kernel_routers"] == len(runtime.kernel_routers) == expected
    generator = torch.Generator().manual_seed(1)
    decided = 0
    for installed in runtime.kernel_routers:
        router = installed.router
        for _ in range(32):
            x = torch.randn(1, router.weight.shape[1], generator=generator).to(torch.bfloat16)
            logits, scores, chosen = router(x)
            own_logits, own_scores, own_chosen = type(router).forward(router, x)
            error = (logits.float() - own_logits.float()).abs()
            assert (error <= _ulps(router, x, own_logits.dtype)).all()
            ranked = own_logits.float().sort(descending=True).values[0]
            k = chosen.shape[-1]
            if ranked[k - 1] - ranked[k] > 2 * error.max():  # a gap no difference here can close: the same experts and weights
                decided += 1
                assert set(chosen[0].tolist()) == set(own_chosen[0].tolist())
                torch.testing.assert_close(scores.float().sort().values, own_scores.float().sort().values, rtol=0.02, atol=1e-3)
        assert installed.seen == 32
    assert decided >= 0.8 * 32 * expected


def _ulps(router, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, E]: four ulps of the logits' dtype at the magnitude of their terms (|x| |W|^T + |b|):
    two sums of the same terms in different orders, each rounded, differ by about that."""
    magnitude = x.float().abs() @ router.weight.float().abs().T
    bias = getattr(router, "bias", None)
    if bias is not None:
        magnitude = magnitude + bias.float().abs()
    return 4 * torch.finfo(dtype).eps * magnitude


def test_prefill_rows_keep_torch_and_full_precision_keeps_every_router():
    model = _wrapped("qwen3_moe", torch.bfloat16)
    router = moe_runtime.runtime_of(model).kernel_routers[0].router
    rows = torch.randn(KERNEL_ROWS + 1, router.weight.shape[1]).to(torch.bfloat16)
    for got, own in zip(router(rows), type(router).forward(router, rows)):
        assert torch.equal(got, own)
    assert moe_runtime.runtime_of(model).kernel_routers[0].seen == 0
    exact = moe_runtime.wrap(tiny_model("qwen3_moe"), budget=1.0, device="cpu", quantize="int8")  # the rest at full precision
    assert moe_runtime.runtime_of(exact).kernel_routers == [] and moe_runtime.stats(exact)["kernel_routers"] == 0


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "gpt_oss"])
def test_a_decode_with_them_is_close_to_one_with_torch_routers_and_unwrap_removes_them(family):
    model = _wrapped(family, torch.float32)
    runtime = moe_runtime.runtime_of(model)
    with_kernel = greedy_logits(model, PROMPT)
    for installed in runtime.kernel_routers:
        installed.remove()
    with_torch = greedy_logits(model, PROMPT)
    for installed in runtime.kernel_routers:
        installed.install()
    assert runtime.kernel_routers and all(installed.seen >= 5 for installed in runtime.kernel_routers)
    torch.testing.assert_close(with_kernel, with_torch, rtol=0, atol=1e-4)
    with pytest.raises(TypeError, match="pickling a model with offloaded experts"):  # the runtime's own refusal, not a pickling error
        pickle.dumps(model)
    routers = [installed.router for installed in runtime.kernel_routers]
    moe_runtime.unwrap(model)
    assert not any("forward" in router.__dict__ for router in routers)


def test_a_router_whose_forward_was_replaced_is_left_alone():
    model = tiny_model("olmoe", dtype=torch.bfloat16)
    routers = [layer.mlp.gate for layer in model.model.layers]
    theirs = routers[0]
    theirs.forward = lambda hidden_states: type(theirs).forward(theirs, hidden_states)
    installed = install_kernel_routers(routers)
    assert [entry.router for entry in installed] == routers[1:]
    assert all(isinstance(router.forward.__self__, KernelRouter) for router in routers[1:])
    for entry in installed:
        entry.remove()
    assert all("forward" not in router.__dict__ for router in routers[1:])


def test_the_kernel_reads_the_routers_weight_as_it_is_now():
    model = _wrapped("olmoe", torch.float32)
    installed = moe_runtime.runtime_of(model).kernel_routers[0]
    router = installed.router
    x = torch.randn(1, router.weight.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        router.weight.mul_(-2.0)  # changed in place: the view shares its storage
        torch.testing.assert_close(router(x)[0], type(router).forward(router, x)[0], rtol=0, atol=1e-5)
        router.weight = torch.nn.Parameter(torch.randn_like(router.weight), requires_grad=False)  # replaced
        torch.testing.assert_close(router(x)[0], type(router).forward(router, x)[0], rtol=0, atol=1e-5)
    assert installed.seen == 2


def test_a_router_whose_forward_needs_the_module_itself_is_left_alone():
    model = tiny_model("olmoe", dtype=torch.bfloat16)
    routers = [layer.mlp.gate for layer in model.model.layers]

    class Strict(type(routers[0])):
        def forward(self, hidden_states):
            return super().forward(hidden_states)  # super() needs an instance of the class

    routers[0].__class__ = Strict
    installed = install_kernel_routers(routers)
    assert [entry.router for entry in installed] == routers[1:]
