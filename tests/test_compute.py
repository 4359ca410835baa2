"""Expert compute from the slot pool, both paths, against the family's own experts module."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.adapters import ExpertLayout, adapter_for
from moe_runtime.compute import GROUPED_MM, LOOP, experts_from_slots
from moe_runtime.runtime.slot_pool import SlotPool
from moe_runtime.tiny_models import tiny_model
from moe_runtime.expert_format import ExpertSpec


def _pool_with(block, slot_of_expert: torch.Tensor, num_slots: int) -> SlotPool:
    """A pool whose free slots hold NaN and whose used slots hold the block's experts."""
    pool = SlotPool(ExpertSpec(block.expert_shapes(), torch.float32), num_slots, torch.device("cpu"), fill=float("nan"))
    for expert, slot in enumerate(slot_of_expert.tolist()):
        if slot >= 0:
            for name, tensor in pool.view(slot).items():
                tensor.copy_(getattr(block.experts, name)[expert])
    return pool


@pytest.mark.parametrize("path", [GROUPED_MM, LOOP])
@pytest.mark.parametrize("tokens", [1, 7], ids=["decode", "prefill"])
def test_matches_the_family_module(family, path, tokens):
    model = tiny_model(family)
    block = adapter_for(model).blocks(model)[0]
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(tokens, model.config.hidden_size, generator=generator)
    with torch.no_grad():
        _, weights, index = block.router(hidden)
        want = block.experts(hidden, index, weights)
        slot_of_expert = torch.randperm(12, generator=generator)[: block.num_experts]  # a scattered slot table
        pool = _pool_with(block, slot_of_expert, 12)
        got = experts_from_slots(hidden, index, weights, slot_of_expert, pool, ExpertLayout.of(block.experts), block.experts._apply_gate, path)
    assert torch.isfinite(got).all()  # NaN free slots never leak
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("path", [GROUPED_MM, LOOP])
def test_experts_outside_the_wave_contribute_nothing(path):
    model = tiny_model("olmoe")
    block = adapter_for(model).blocks(model)[0]
    hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(6))
    index = torch.tensor([[0, 1]] * 5)
    weights = torch.full((5, 2), 0.5)
    layout, gate = ExpertLayout.of(block.experts), block.experts._apply_gate
    with torch.no_grad():
        both = torch.tensor([3, 4, -1, -1, -1, -1, -1, -1])
        pool = _pool_with(block, both, 6)
        full = experts_from_slots(hidden, index, weights, both, pool, layout, gate, path)
        first = experts_from_slots(hidden, index, weights, torch.tensor([3, -1, -1, -1, -1, -1, -1, -1]), pool, layout, gate, path)
        second = experts_from_slots(hidden, index, weights, torch.tensor([-1, 4, -1, -1, -1, -1, -1, -1]), pool, layout, gate, path)
    assert torch.allclose(first + second, full, atol=1e-6)


def test_without_triton_auto_takes_pytorch_and_triton_is_refused_by_name(monkeypatch):
    """Triton ships for Linux x86_64 only: elsewhere the kernels do not import."""
    import sys

    from moe_runtime.adapters import ExpertLayout
    from moe_runtime.compute import choose_kernel_path, triton_imports
    from moe_runtime.tiny_models import tiny_model

    experts = tiny_model("olmoe").model.layers[0].mlp.experts
    layout, act = ExpertLayout.of(experts), experts.act_fn
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    assert not triton_imports()
    assert choose_kernel_path("auto", torch.device("cpu"), ExpertSpec({}, torch.float32), layout, act) in ("loop", "grouped_mm")
    with pytest.raises(ValueError, match="needs the triton package, which does not import here"):
        choose_kernel_path("triton", torch.device("cpu"), ExpertSpec({}, torch.float32), layout, act)
