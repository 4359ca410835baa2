"""The live runtime and the trace simulator share one cache core: same routing, same decisions.

A tiny model decodes one token at a time through the real runtime (real loader threads, real
slot pool); the routing its layers saw becomes a trace, which the simulator replays with a
fresh policy of the same kind. After every token the cumulative hits, misses, loads and
prefetches must be equal: for every policy, with and without prefetching, with pinned and
transient (host-tier) experts from a placement plan, on three families; and a prompt served in
one forward (a prefill, in waves) against the simulator's prefill step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_runtime
from moe_runtime.hf_cache import cache_keyword, returned_cache
from moe_runtime.policies import NextUsePolicy, make_policy
from moe_runtime.predictor import make_predictor
from moe_runtime.runtime.executor import RUNTIME_ATTR
from moe_runtime.simulator import Prefetch, replay
from moe_runtime.tiny_models import tiny_model
from moe_runtime.trace import Trace

TOKENS = 14
PROMPT = 12  # tokens of the prefill in test_a_live_prefill_decides_as_the_simulators_prompt_step
SLOTS = 7  # of 3 x 8 experts: room for top-2 plus pinned ones, small enough to evict often
POLICY_NAMES = ("lru", "lfu", "arc", "pinned", "next-use")


def policy_of(name: str, num_layers: int, num_experts: int, fit: Trace):
    if name == "adaptive":  # the default from the generic table, as wrap runs it given nothing (here asked for by instance)
        return make_policy(name, num_layers=num_layers, num_experts=num_experts, capacity=SLOTS, top_k=2)
    if name == "next-use":  # the fitted model: a trace-based policy with state of its own
        return NextUsePolicy.fitted(fit)
    return make_policy(name, num_layers=num_layers, num_experts=num_experts, capacity=SLOTS, top_k=2, fit=fit)


def decode_live(model, ids: torch.Tensor) -> tuple[Trace, list[tuple[int, int, int, int]]]:
    """Feed `ids` one token at a time; returns the routing the runtime saw and the counters after each token."""
    runtime = getattr(model, RUNTIME_ATTR)
    seen: list[list[int]] = []
    run_layer = runtime._run_layer

    def recording(layer, hidden, top_k_index, top_k_weights):
        seen.append(top_k_index[0].tolist())
        out = run_layer(layer, hidden, top_k_index, top_k_weights)
        runtime.drain()  # prefetches land before the next layer: the simulator's copies are instant too
        return out

    runtime._run_layer = recording
    after_each: list[tuple[int, int, int, int]] = []
    past = None
    with torch.no_grad():
        for position in range(ids.shape[1]):
            output = model(input_ids=ids[:, position : position + 1], **{cache_keyword(model): past}, use_cache=True)
            past = returned_cache(output)
            stats = moe_runtime.stats(model)
            after_each.append((stats["hits"], stats["misses"], stats["loads"], stats["prefetches_issued"]))
    runtime._run_layer = run_layer
    layers = len(runtime.blocks)
    expert_ids = np.array(seen, dtype=np.int16).reshape(ids.shape[1], layers, -1)
    trace = Trace(expert_ids, np.full(expert_ids.shape, 0.5, np.float16), np.array([0, ids.shape[1]]), runtime.num_experts, runtime.top_k)
    return trace, after_each


def tiering_plan(model, layers: int, experts: int) -> dict:
    tiers = [["dynamic"] * experts for _ in range(layers)]
    tiers[0][1] = tiers[1][4] = "pinned"
    tiers[0][5] = tiers[2][0] = tiers[2][3] = "host"
    return {"kind": "tiering", "tier_of": tiers, "dynamic_slots": SLOTS - 2, "shape": {"num_layers": layers, "num_experts": experts, "top_k": 2}}


def keys_of(plan: dict, tier: str, experts: int) -> frozenset[int]:
    return frozenset(layer * experts + e for layer, row in enumerate(plan["tier_of"]) for e, name in enumerate(row) if name == tier)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen3_moe"])
@pytest.mark.parametrize("prefetching", [None, "popularity", "affinity"])
@pytest.mark.parametrize("with_plan", [False, True], ids=["no-plan", "pinned+transient"])
def test_live_and_simulated_decisions_agree_token_by_token(family, prefetching, with_plan):
    reference = tiny_model(family)
    layers, experts = 3, 8
    per_expert = sum(p[0].numel() for p in (reference.model.layers[0].mlp.experts.gate_up_proj, reference.model.layers[0].mlp.experts.down_proj)) * 4
    generator = torch.Generator().manual_seed(7)
    fit_ids = [torch.randint(3, 250, (1, 24), generator=generator) for _ in range(4)]
    fit = moe_runtime.record_trace(reference, fit_ids)
    ids = torch.randint(3, 250, (1, TOKENS), generator=generator)
    predictor = make_predictor(prefetching).fit(fit) if prefetching else None
    plan = tiering_plan(reference, layers, experts) if with_plan else None
    for name in POLICY_NAMES:
        model = moe_runtime.wrap(
            tiny_model(family), budget=SLOTS * per_expert, device="cpu", policy=policy_of(name, layers, experts, fit),
            predictor=predictor, placement=plan, prefetch_width=2,
        )
        trace, live = decode_live(model, ids)
        moe_runtime.unwrap(model)
        assert (live[-1][3] > 0) == (predictor is not None), "prefetching ran exactly when asked"
        for tokens in range(1, TOKENS + 1):
            part = _prefix(trace, tokens)
            prefetch = None
            if predictor is not None:
                prefetch = Prefetch(  # in place from RAM a load is a pointer move: the runtime does not gate it
                    predictor.forecast_trace(part, 1), width=2, lookahead=1, min_score=np.nextafter(0, 1), gated=False,
                )
            policy = policy_of(name, layers, experts, fit)
            simulated = replay(
                part, policy, SLOTS, prefetch=prefetch,
                pinned=getattr(policy, "pinned", frozenset()) | (keys_of(plan, "pinned", experts) if plan else frozenset()),
                transient=keys_of(plan, "host", experts) if plan else frozenset(),
            )
            expected = (simulated.hits, simulated.misses, simulated.loads, simulated.prefetch_loads)
            assert live[tokens - 1] == expected, f"{family} {name} prefetch={prefetching} plan={with_plan}: token {tokens}"


def _prefix(trace: Trace, tokens: int) -> Trace:
    return Trace(trace.expert_ids[:tokens], trace.gate_weights[:tokens], np.array([0, tokens]), trace.num_experts, trace.top_k)


def test_the_default_started_from_a_fit_decides_live_as_in_the_simulator():
    """wrap(policy_fit=...) runs the adaptive default from the fitted reuse model: the same hits,
    misses and loads token by token as the simulator's make_policy("adaptive", fit=...)."""
    reference = tiny_model("olmoe")
    per_expert = sum(p[0].numel() for p in (reference.model.layers[0].mlp.experts.gate_up_proj, reference.model.layers[0].mlp.experts.down_proj)) * 4
    generator = torch.Generator().manual_seed(11)
    fit = moe_runtime.record_trace(reference, [torch.randint(3, 250, (1, 24), generator=generator) for _ in range(4)])
    ids = torch.randint(3, 250, (1, TOKENS), generator=generator)
    model = moe_runtime.wrap(tiny_model("olmoe"), budget=SLOTS * per_expert, device="cpu", policy_fit=fit)
    assert moe_runtime.stats(model)["policy"] == "adaptive"
    trace, live = decode_live(model, ids)
    moe_runtime.unwrap(model)
    for tokens in range(1, TOKENS + 1):
        simulated = replay(_prefix(trace, tokens), make_policy("adaptive", num_layers=3, num_experts=8, capacity=SLOTS, top_k=2, fit=fit), SLOTS)
        assert live[tokens - 1] == (simulated.hits, simulated.misses, simulated.loads, 0), f"token {tokens}"
    unfitted = replay(trace, make_policy("adaptive", num_layers=3, num_experts=8, capacity=SLOTS, top_k=2), SLOTS)
    assert live[-1][1] != unfitted.misses  # without the fit it decides otherwise (52 misses against 51)


@pytest.mark.parametrize("name", ["lru", "next-use", "adaptive"])
def test_a_live_prefill_decides_as_the_simulators_prompt_step(name):
    """A prompt of PROMPT tokens in one forward (each layer's union, more experts than the pool
    holds: waves), then one token at a time: the live hits, misses and loads equal the
    simulator's with the prompt replayed as one prefill step (replay's prompts), after the
    prefill and after every decode token; the policy heard the prompt's tokens (on_prompt) alike."""
    reference = tiny_model("olmoe")
    per_expert = sum(p[0].numel() for p in (reference.model.layers[0].mlp.experts.gate_up_proj, reference.model.layers[0].mlp.experts.down_proj)) * 4
    generator = torch.Generator().manual_seed(5)
    fit = moe_runtime.record_trace(reference, [torch.randint(3, 250, (1, 24), generator=generator) for _ in range(4)])
    ids = torch.randint(3, 250, (1, PROMPT + TOKENS), generator=generator)
    model = moe_runtime.wrap(tiny_model("olmoe"), budget=SLOTS * per_expert, device="cpu", policy=policy_of(name, 3, 8, fit))
    runtime = getattr(model, RUNTIME_ATTR)
    seen: list[np.ndarray] = []
    run_layer = runtime._run_layer

    def recording(layer, hidden, top_k_index, top_k_weights):
        seen.append(top_k_index.numpy().copy())
        return run_layer(layer, hidden, top_k_index, top_k_weights)

    runtime._run_layer = recording
    live = []
    with torch.no_grad():
        past = returned_cache(model(input_ids=ids[:, :PROMPT], use_cache=True))
        live.append(_counters(model))
        for position in range(PROMPT, ids.shape[1]):
            past = returned_cache(model(input_ids=ids[:, position : position + 1], **{cache_keyword(model): past}, use_cache=True))
            live.append(_counters(model))
    runtime._run_layer = run_layer
    moe_runtime.unwrap(model)
    prompt = np.stack(seen[:3], axis=1)  # [PROMPT, 3, 2]
    decoded = np.stack(seen[3:]).reshape(TOKENS, 3, 2)
    assert max(len(np.unique(prompt[:, layer])) for layer in range(3)) > SLOTS  # a layer took more than one wave
    expert_ids = np.concatenate([prompt, decoded]).astype(np.int16)
    for tokens in range(PROMPT, PROMPT + TOKENS + 1):
        part = Trace(expert_ids[:tokens], np.full(expert_ids[:tokens].shape, 0.5, np.float16), np.array([0, tokens]), 8, 2)
        simulated = replay(part, policy_of(name, 3, 8, fit), SLOTS, prompts=np.array([PROMPT]))
        assert live[tokens - PROMPT] == (simulated.hits, simulated.misses, simulated.loads), f"{name}: token {tokens}"


def _counters(model) -> tuple[int, int, int]:
    stats = moe_runtime.stats(model)
    return stats["hits"], stats["misses"], stats["loads"]
