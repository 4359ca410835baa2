"""Task pruning: importance formulas, keep plans, masked routers, profiles, retrieval, runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import moe_runtime
from moe_runtime.adapters import adapter_for
from moe_runtime.profiles import PROFILES_DIR
from moe_runtime.pruning import keep_plan, load_profile, load_profiles, make_profile, match_trace, profile_figures, task_importance
from moe_runtime.pruning.profile import PruningProfile
from moe_runtime.tiny_models import tiny_model
from moe_runtime.trace import Trace


def _trace(ids, weights, offsets, num_experts):
    ids = np.asarray(ids, dtype=np.int16)
    return Trace(ids, np.asarray(weights, dtype=np.float16), np.asarray(offsets), num_experts=num_experts, top_k=ids.shape[2])


def test_importance_formulas_on_a_hand_made_trace():
    # One layer, K = 2, E = 4; 3 tokens in 2 sequences (2 + 1 tokens).
    trace = _trace([[[0, 1]], [[0, 2]], [[3, 0]]], [[[0.5, 0.25]], [[0.75, 0.125]], [[0.5, 0.25]]], [0, 2, 3], 4)
    assert task_importance(trace, "count")[0].tolist() == pytest.approx([1.0, 1 / 3, 1 / 3, 1 / 3])
    assert task_importance(trace, "mass")[0].tolist() == pytest.approx([1.5 / 3, 0.25 / 3, 0.125 / 3, 0.5 / 3])
    # balanced: sequence means (0: [0.625, 0.125, 0.0625, 0]; 1: [0.25, 0, 0, 0.5]) averaged
    assert task_importance(trace, "balanced")[0].tolist() == pytest.approx([0.4375, 0.0625, 0.03125, 0.25])
    with pytest.raises(ValueError, match="unknown importance method"):
        task_importance(trace, "entropy")


def test_keep_plan_respects_top_k_and_share():
    rng = np.random.default_rng(0)
    scores = rng.random((5, 16))
    scores[0] *= 10  # a layer that matters more gets more of a global budget
    for allocation in ("global", "per-layer"):
        plan = keep_plan(scores, 0.25, top_k=3, allocation=allocation)
        assert sum(map(len, plan)) == 5 * 4
        assert all(len(kept) >= 3 for kept in plan)
    plan = keep_plan(scores, 0.25, top_k=3, allocation="global")
    assert len(plan[0]) > 4
    assert keep_plan(scores, 0.1, top_k=3, allocation="per-layer") == [sorted(np.argsort(-s)[:3].tolist()) for s in scores]


def test_select_without_a_mask_reproduces_every_router(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    hidden = torch.randn(11, model.config.hidden_size, generator=torch.Generator().manual_seed(8))
    for block in adapter.blocks(model):
        with torch.no_grad():
            logits, weights, index = block.router(hidden)
            mine_weights, mine_index = adapter.select(block.router, logits, None)
        assert torch.equal(mine_index, index) and torch.equal(mine_weights, weights)


def test_masked_router_never_selects_pruned_experts(family):
    model = tiny_model(family)
    blocks = adapter_for(model).blocks(model)
    keep = [[e for e in range(8) if e % 2 == 0] for _ in blocks]  # 4 of 8 kept per layer (K = 2)
    profile = PruningProfile("even", 8, 2, keep, [[1.0] * 8 for _ in blocks], model={"model_type": family})
    moe_runtime.wrap(model, budget=1.0, device="cpu", profile=profile)
    seen = []
    for block in blocks:  # registered after the mask's hooks: sees what the experts receive
        block.router.register_forward_hook(lambda module, inputs, output: seen.append(output))
    with torch.no_grad():
        model(torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(9)))
    assert seen and all((output[2] % 2 == 0).all() for output in seen)
    if family in ("mixtral", "gpt_oss"):  # families that renormalise the top-k
        assert all(torch.allclose(output[1].sum(-1), torch.ones(output[1].shape[0])) for output in seen)


def test_pruned_experts_are_never_loaded(tiny_checkpoints):
    model = tiny_model("olmoe")
    blocks = adapter_for(model).blocks(model)
    keep = [[0, 1, 2, 3] for _ in blocks]
    profile = PruningProfile("low", 8, 2, keep, [[1.0] * 8 for _ in blocks], model={"model_type": "olmoe"})
    offloaded = moe_runtime.from_pretrained(tiny_checkpoints["olmoe"], budget=0.5, device="cpu", profile=profile)
    offloaded.generate(torch.tensor([[5, 9, 11, 40]]), max_new_tokens=12, do_sample=False)
    stats = moe_runtime.stats(offloaded)
    assert stats["pruned_experts"] == 12 and stats["kept_experts"] == 12 and stats["num_slots"] == 6
    host = moe_runtime.runtime_of(offloaded).source
    assert len(host) > 0 and all(expert < 4 for _, expert in host._entries)


def test_profile_of_another_shape_is_refused():
    profile = PruningProfile("x", 4, 2, [[0, 1]], [[1.0] * 4])
    with pytest.raises(ValueError, match="made for \\(L, E, K\\) = \\(1, 4, 2\\)"):
        moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, device="cpu", profile=profile)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"keep": [[0, 0]]}, "distinct expert ids"),
        ({"keep": [[0, 9]]}, "in \\[0, 4\\)"),
        ({"keep": [[1]]}, "fewer than top_k = 2"),
        ({"scores": [[1.0] * 3]}, "'scores' must be \\[L, E\\]"),
        ({"task": ""}, "'task' must be a non-empty string"),
        ({"top_k": 5}, "0 < top_k <= num_experts"),
    ],
)
def test_profile_schema_errors_name_the_field(tmp_path, change, message):
    data = {"task": "t", "num_experts": 4, "top_k": 2, "keep": [[0, 1]], "scores": [[1.0] * 4], **change}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_profile(path)
    del data["scores"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lacks the field 'scores'"):
        load_profile(path)


def _synthetic_task(experts: list[int], sequences: int, seed: int) -> Trace:
    """Tokens route among `experts` only (3 layers, E = 12, K = 2)."""
    rng = np.random.default_rng(seed)
    ids = np.stack([[rng.choice(experts, 2, replace=False) for _ in range(3)] for _ in range(sequences * 20)])
    return _trace(ids, np.full(ids.shape, 0.4), np.arange(0, sequences * 20 + 1, 20), 12)


def test_retrieval_finds_the_task_of_synthetic_queries(tmp_path):
    tasks = {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7], "c": [8, 9, 10, 11]}
    profiles = [make_profile(_synthetic_task(experts, 4, seed), name, 0.5) for seed, (name, experts) in enumerate(tasks.items())]
    for offset, (name, experts) in enumerate(tasks.items()):
        queries = _synthetic_task(experts, 3, seed=100 + offset)
        assert {m["task"] for m in match_trace(profiles, queries, tokens=4)} == {name}
        assert profile_figures(profiles[offset], queries)["retained_gate_mass"] == pytest.approx(1.0)


def test_shipped_profiles_load_and_fit_their_traces(trace_paths):
    profiles = load_profiles(PROFILES_DIR / "esft-vanilla-lite")
    assert sorted(p.task for p in profiles) == ["intent", "law", "summary", "translation"]
    for profile in profiles:
        assert profile.kept_share() == pytest.approx(0.5) and profile.num_layers == 26
    assert sorted(p.task for p in load_profiles(PROFILES_DIR / "embedded")) == ["code", "legal", "manual", "translation"]


def test_auto_profile_picks_the_task_of_the_first_request():
    from moe_runtime.embedded import DEMO_PROMPTS, embedded_model_dir

    model = moe_runtime.from_pretrained(embedded_model_dir(), budget=0.5, device="cpu", profile="auto", profiles_dir=PROFILES_DIR / "embedded")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    assert moe_runtime.stats(model)["profile"] == "auto (not chosen yet)"
    prompt = tokenizer(DEMO_PROMPTS[0], return_tensors="pt").input_ids  # a Python function
    model.generate(prompt, max_new_tokens=4, do_sample=False)
    stats = moe_runtime.stats(model)
    assert stats["profile"] == "code" and stats["pruned_experts"] == 96
