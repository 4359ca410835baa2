"""Wrapped models compute what the unwrapped ones compute, for every family and budget."""

from __future__ import annotations

import pytest
import torch

import moe_runtime
from moe_runtime.adapters import adapter_for
from moe_runtime.tiny_models import tiny_model


def _min_fraction(model) -> float:
    blocks = adapter_for(model).blocks(model)
    return blocks[0].top_k / (len(blocks) * blocks[0].num_experts)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("share", ["min", 0.25, 0.5, 1.0])
def test_logits_equal_at_every_budget(family, share):
    reference = tiny_model(family)
    model = tiny_model(family)
    budget = _min_fraction(model) if share == "min" else share
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids).logits
        moe_runtime.wrap(model, budget=budget, device="cpu")
        got = model(ids).logits
    _close(got, want)
    counters = moe_runtime.stats(model)
    assert counters["hits"] + counters["misses"] > 0
    if share == "min":
        assert counters["num_slots"] == model.config.num_experts_per_tok
        assert counters["waves"] > 0  # the prefill needed more experts than slots


def test_greedy_generation_is_identical(family):
    reference = tiny_model(family)
    model = moe_runtime.wrap(tiny_model(family), budget=0.25, device="cpu")
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(1))
    want = reference.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    got = model.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert torch.equal(got, want)
    counters = moe_runtime.stats(model)
    assert counters["hits"] > 0 and counters["misses"] > 0


def test_batch_of_four_with_padding(family):
    reference = tiny_model(family)
    model = moe_runtime.wrap(tiny_model(family), budget=0.25, device="cpu")
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 300, (4, 10), generator=generator)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 5, 9)):  # left padding, as generate expects
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    with torch.no_grad():
        _close(model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)
    want = reference.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(got, want)


def test_bfloat16_model_runs_close_to_reference():
    reference = tiny_model("mixtral", dtype=torch.bfloat16)
    model = moe_runtime.wrap(tiny_model("mixtral", dtype=torch.bfloat16), budget=0.5, device="cpu")
    ids = torch.randint(3, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = reference(ids).logits.float(), model(ids).logits.float()
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()


def test_next_use_fitted_on_a_recorded_trace_drives_the_live_cache():
    """Record the model's routing, fit next-use on it, wrap with that policy: same outputs; a policy
    fitted for another shape is refused with the shapes named."""
    from moe_runtime.policies import NextUsePolicy, ReuseModel
    from moe_runtime.recording import record_trace

    reference = tiny_model("mixtral")
    sequences = [torch.randint(3, 300, (24,), generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    policy = NextUsePolicy.fitted(record_trace(reference, sequences))
    assert policy.model.transitions is not None
    model = moe_runtime.wrap(tiny_model("mixtral"), budget=0.25, device="cpu", policy=policy)
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(7))
    want = reference.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12), want)
    assert moe_runtime.stats(model)["policy"] == "next-use" and moe_runtime.stats(model)["hits"] > 0
    wrong = NextUsePolicy(policy.num_layers + 1, policy.num_experts, ReuseModel.uniform(policy.num_layers + 1, policy.num_experts, 2))
    with pytest.raises(ValueError, match=r"built for \d+ MoE layers x \d+ experts but the model has"):
        moe_runtime.wrap(tiny_model("mixtral"), budget=0.25, device="cpu", policy=wrong)


@pytest.mark.parametrize("policy", ["lfu", "arc", "next-use"])
def test_every_live_policy_keeps_the_outputs(policy):
    reference = tiny_model("mixtral")
    model = moe_runtime.wrap(tiny_model("mixtral"), budget=0.25, device="cpu", policy=policy)
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(7))
    want = reference.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16), want)
    assert moe_runtime.stats(model)["policy"] == policy
    moe_runtime.runtime_of(model).cache.check_invariants()
