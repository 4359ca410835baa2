"""wrap/unwrap restore the model exactly; bad budgets and options are refused clearly."""

from __future__ import annotations

import inspect

import pytest
import torch

import moe_runtime
from moe_runtime.tiny_models import tiny_model


def _tree(model):
    return [(name, type(module).__name__, str(inspect.signature(module.forward))) for name, module in model.named_modules()]


def test_wrap_then_unwrap_restores_tree_signatures_and_weights(family):
    model = tiny_model(family)
    before_tree = _tree(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    moe_runtime.wrap(model, budget=0.5, device="cpu")
    assert any(type(m).__name__ == "OffloadedExperts" for m in model.modules())
    assert not any(k.endswith("experts.gate_up_proj") for k, _ in model.named_parameters())  # experts left the tree
    wrapped_state = model.state_dict()  # ... but the state dict still holds them, read back from the runtime
    assert wrapped_state.keys() == before_state.keys() and all(torch.equal(wrapped_state[k], before_state[k]) for k in before_state)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    moe_runtime.unwrap(model)
    assert _tree(model) == before_tree
    after = model.state_dict()
    assert after.keys() == before_state.keys()
    assert all(torch.equal(after[k], before_state[k]) for k in after)
    with pytest.raises(ValueError, match="not wrapped"):
        moe_runtime.stats(model)


def test_unwrap_after_spilling_to_disk_restores_weights(tmp_path):
    model = tiny_model("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moe_runtime.wrap(model, budget=0.25, device="cpu", host_budget="100KiB", store_dir=tmp_path / "store")
    assert (tmp_path / "store" / "manifest.json").is_file()
    moe_runtime.unwrap(model)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_budget_below_top_k_states_the_minimum():
    model = tiny_model("olmoe")  # 3 layers x 8 experts, top-2, 36 KiB per expert in fp32
    per_expert = 3 * 64 * 48 * 4
    with pytest.raises(ValueError, match=f"minimum is {2 * per_expert} bytes .* fraction of 0.0834 of all experts$") as refused:
        moe_runtime.wrap(model, budget=per_expert, device="cpu")
    assert not hasattr(model, "_moe_runtime")  # nothing half-done
    with pytest.raises(ValueError, match="fraction of all experts"):
        moe_runtime.wrap(model, budget=2.0, device="cpu")
    suggested = float(str(refused.value).split("fraction of ")[1].split()[0])  # rounded up: accepted as written
    moe_runtime.wrap(model, budget=suggested, device="cpu")
    assert moe_runtime.stats(model)["num_slots"] == 2
    moe_runtime.unwrap(model)


@pytest.mark.parametrize("typo", [1, "1", "1.5"])
def test_a_bare_small_number_budget_asks_what_was_meant(typo):
    with pytest.raises(ValueError, match=r"did you mean 1\.0 \(all experts\) or a size such as 1(\.5)?GiB\?"):
        moe_runtime.wrap(tiny_model("olmoe"), budget=typo, device="cpu")


def test_small_host_budget_needs_a_store_dir():
    with pytest.raises(ValueError, match="pass store_dir"):
        moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, device="cpu", host_budget="64KiB")


def test_unwritable_store_dir_is_named(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(OSError, match="not writable"):
        moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, device="cpu", host_budget="64KiB", store_dir=blocked / "store")


def test_wrapping_twice_is_refused():
    model = moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, device="cpu")
    with pytest.raises(ValueError, match="already wrapped"):
        moe_runtime.wrap(model, budget=0.5, device="cpu")


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown cache policy .fifo.; choose one of adaptive, arc, lfu, lru, next-use, pinned"):
        moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, device="cpu", policy="fifo")


def test_a_refused_wrap_loses_nothing(tmp_path):
    """Refused after spilling to store_dir and building a profile mask: weights and routers intact."""
    from moe_runtime.adapters import adapter_for
    from moe_runtime.pruning import PruningProfile

    model = tiny_model("olmoe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = adapter_for(model).blocks(model)
    profile = PruningProfile("all", 8, 2, [list(range(8)) for _ in blocks], [[1.0] * 8 for _ in blocks])
    with pytest.raises(ValueError, match="the minimum is"):
        moe_runtime.wrap(model, budget=1000, device="cpu", host_budget="64KiB", store_dir=tmp_path / "store", profile=profile)
    assert not hasattr(model, "_moe_runtime")
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)  # nothing freed to meta
    assert all(not block.router._forward_hooks for block in blocks)  # no mask left on the routers


def test_one_offload_config_for_both_entry_points(tiny_checkpoints):
    config = moe_runtime.OffloadConfig(budget=0.5, device="cpu", policy="lru", prefetch_width=3)
    reference = tiny_model("olmoe")
    ids = torch.tensor([[3, 9, 27, 81]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    for model in (
        moe_runtime.wrap(tiny_model("olmoe"), config=config),
        moe_runtime.from_pretrained(tiny_checkpoints["olmoe"], config=config),
    ):
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected)
        assert moe_runtime.stats(model)["policy"] == "lru" and moe_runtime.stats(model)["num_slots"] == 12
        moe_runtime.unwrap(model)
    with pytest.raises(ValueError, match="either as config=OffloadConfig.*not both.*policy"):
        moe_runtime.wrap(tiny_model("olmoe"), config=config, policy="arc")


def test_policy_fit_starts_the_policy_from_a_trace_of_the_task(tmp_path, tiny_checkpoints):
    from moe_runtime.synthetic import flat_routing

    path = flat_routing(3, 8, 2, 64, sequences=2).save(tmp_path / "task.npz")  # the tiny OLMoE's shape
    model = moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, device="cpu", policy_fit=path)
    with torch.no_grad():
        model(input_ids=torch.tensor([[3, 9, 27, 81]]))
    stats = moe_runtime.stats(model)
    assert stats["policy"] == "adaptive" and stats["policy_fit_tokens"] == 64  # in place too: the fit is kept
    moe_runtime.unwrap(model)
    model = moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, device="cpu", policy="pinned", policy_fit=path)  # needs a fit
    with torch.no_grad():
        model(input_ids=torch.tensor([[3, 9, 27, 81]]))
    assert moe_runtime.stats(model)["policy"] == "pinned"
    moe_runtime.unwrap(model)
    wrong = flat_routing(4, 8, 2, 64, sequences=2).save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="recorded on 4 MoE layers x 8 experts but the model has 3 x 8"):
        moe_runtime.from_pretrained(tiny_checkpoints["olmoe"], budget=0.5, device="cpu", store_dir=tmp_path / "store", policy_fit=wrong)
    assert not (tmp_path / "store").exists()  # refused before the store was written
    for options, error, message in [
        ({"policy": "lru"}, ValueError, "policy_fit fits the adaptive / next-use / pinned policies, not 'lru'"),
        ({"policy_fit": tmp_path / "missing.npz"}, FileNotFoundError, "missing.npz"),
        ({"policy_fit": 7}, TypeError, "policy_fit must be a trace file"),
    ]:
        model = tiny_model("olmoe")
        with pytest.raises(error, match=message):
            moe_runtime.wrap(model, budget=0.5, device="cpu", **{"policy_fit": path, **options})
        assert not hasattr(model, "_moe_runtime")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kernel", "cuda", "kernel must be one of auto, triton, torch, got 'cuda'"),
        ("policy", "fifo", "unknown cache policy 'fifo'; choose one of adaptive, arc, lfu, lru, next-use, pinned"),
        ("prefetch_width", 0, "prefetch_width must be a positive int"),
        ("prefetch_lookahead", 0, "prefetch_lookahead must be an int >= 1"),
        ("dtype", "bf16", "must be a torch.dtype such as torch.bfloat16"),
        ("budget", True, "budget must be bytes"),
    ],
)
def test_a_bad_config_field_is_named_with_its_allowed_values(field, value, message):
    options = {"budget": 0.5, field: value}
    with pytest.raises((ValueError, TypeError), match=message):
        moe_runtime.OffloadConfig(**options)
    model = tiny_model("olmoe")
    with pytest.raises((ValueError, TypeError), match=message):
        moe_runtime.wrap(model, **{"device": "cpu", **options}) if field != "dtype" else moe_runtime.OffloadConfig(**options)
    assert not hasattr(model, "_moe_runtime")
