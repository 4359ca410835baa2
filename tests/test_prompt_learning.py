"""The default learns from a prompt's routing: the runtime tells the policy each prefill token's
experts (Runtime._tell_prompt, knowing each forward's batch size from runtime/forward_shape.py),
and the simulator replays a prompt as one prefill step (simulator.replay's prompts).

Live: what the history keeps is what a twin's routers chose (router hooks), a batch's rows each
in order, a batch's decode steps not taken for consecutive tokens, and the first refit comes
before the first decode token. Replayed: a prefill step loads its union in waves that fit the
pool, tells the policy, and leaves the rest of the replay as it was.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import moe_runtime
from moe_runtime.policies import AdaptivePolicy, LRUPolicy
from moe_runtime.policies.adaptive import starting_model
from moe_runtime.policies.routing_history import FIRST_REFIT_TOKENS
from moe_runtime.recording import RouterRecorder
from moe_runtime.simulator import replay
from moe_runtime.synthetic import flat_routing
from test_decode_attention import _model  # tests/test_decode_attention.py


def _wrapped_twins():
    model = _model("qwen3_moe")
    options = {"device": "cpu", "budget": 0.5, "execution": "device"}  # slots copied: the adaptive default
    return moe_runtime.wrap(copy.deepcopy(model), **options), moe_runtime.wrap(model, **options)


def _generate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    mask = torch.ones_like(ids)
    return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[], pad_token_id=0)


def _prefill_routing(model, ids: torch.Tensor) -> np.ndarray:
    """[B x T, L, K]: the experts the routers chose for the prompt `ids` [B, T], row by row."""
    recorder = RouterRecorder(model)
    try:
        with torch.no_grad():
            model(ids)
        found, _, _ = recorder.take()
    finally:
        recorder.close()
    return found


def test_a_prompts_routing_reaches_the_learner_before_the_first_decode_token():
    served, hooked = _wrapped_twins()
    prompt = torch.randint(3, 300, (1, FIRST_REFIT_TOKENS + 2), generator=torch.Generator().manual_seed(1))
    policy = moe_runtime.runtime_of(served).cache.policy
    assert isinstance(policy, AdaptivePolicy) and not policy.idle
    _generate(served, prompt, new_tokens=2)  # the prefill, then one decode step
    assert policy.refits == 1  # at the decode step's first layer, from the prompt's tokens
    kept = policy.history.as_trace().expert_ids
    assert np.array_equal(kept, _prefill_routing(hooked, prompt))


def test_a_batch_gives_each_rows_tokens_in_order_and_its_decode_steps_are_not_taken_for_a_sequence():
    served, hooked = _wrapped_twins()
    prompts = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    policy = moe_runtime.runtime_of(served).cache.policy
    _generate(served, prompts, new_tokens=4)  # the prefill, then three decode steps of two rows
    kept = policy.history.as_trace().expert_ids
    expected = _prefill_routing(hooked, prompts)  # row 0's 40 tokens, then row 1's
    assert kept.shape[0] >= 80 and np.array_equal(kept[:80], expected)
    assert policy.refits == 0  # 80 tokens: fewer than the first refit needs
    runtime = moe_runtime.runtime_of(served)
    assert runtime.forwards.current() is None  # known only while a forward runs


def test_a_layer_run_outside_the_models_forward_tells_the_policy_nothing():
    served, _ = _wrapped_twins()
    runtime = moe_runtime.runtime_of(served)
    hidden = torch.randn(6, served.config.hidden_size)
    runtime.run_layer(0, hidden, torch.tensor([[0, 1]] * 6), torch.full((6, 2), 0.5))  # six rows of what?
    assert runtime.cache.policy.history.prompts == {} and runtime.cache.policy.history.kept == 0


def test_a_replayed_prompt_is_one_prefill_step_in_waves_and_the_learner_is_told():
    trace = flat_routing(4, 16, 2, 400, reuse=0.3, sequences=2, seed=5)
    lengths = np.diff(trace.seq_offsets)
    capacity = 12  # below a layer's union of a long prompt's experts: waves
    shape = {"num_layers": 4, "num_experts": 16, "capacity": capacity, "top_k": 2}
    plain = replay(trace, AdaptivePolicy(starting_model(4, 16), **shape), capacity)
    none = replay(trace, AdaptivePolicy(starting_model(4, 16), **shape), capacity, prompts=np.zeros(len(lengths), dtype=int))
    assert (none.loads, none.prompt_loads, none.hits) == (plain.loads, 0, plain.hits)  # no prompt: the replay as it was

    learner = AdaptivePolicy(starting_model(4, 16), **shape)
    prompts = np.minimum(lengths, FIRST_REFIT_TOKENS + 10)
    prompts[1] = 1  # a one-token prompt is a decode step
    result = replay(trace, learner, capacity, prompts=prompts)
    unions = [len(set(trace.expert_ids[: prompts[0], layer].ravel().tolist())) for layer in range(4)]
    assert min(unions) > capacity  # each layer's union took more than one wave
    assert result.prompt_loads >= sum(unions)  # every expert of a union loaded at least once (a cold cache)
    assert learner.history.kept == trace.num_tokens - 1  # the prompt's tokens and every decode token but the open last
    assert learner.refits >= 1
    lru = replay(trace, LRUPolicy(), capacity, prompts=prompts)
    assert lru.prompt_loads == result.prompt_loads  # the first step of a cold cache: the same loads whatever the policy


@pytest.mark.parametrize(
    "prompts, execution", [(np.array([5]), "device"), (np.array([-1, 3]), "device"), (np.array([2, 3]), "hybrid")],
    ids=["one per sequence", "none negative", "device only"],
)
def test_replay_refuses_prompts_it_cannot_serve(prompts, execution):
    trace = flat_routing(2, 8, 2, 20, seed=0).select_sequences(range(2))
    with pytest.raises(ValueError, match="prompts"):
        replay(trace, LRUPolicy(), 4, prompts=prompts, execution=execution)
