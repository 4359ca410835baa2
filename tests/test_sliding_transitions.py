"""The routing history's transitions, counted as tokens enter and leave, against a full count."""

from pathlib import Path

import numpy as np

from moe_runtime.policies import make_policy
from moe_runtime.policies.next_use import ReuseModel, expert_transitions, used_matrix
from moe_runtime.policies.routing_history import FIRST_REFIT_TOKENS, REFIT_EVERY_TOKENS, RoutingHistory
from moe_runtime.policies.sliding_transitions import SlidingTransitions
from moe_runtime.trace import Trace, load_trace

SHIPPED = Path(__file__).resolve().parent.parent / "moe_runtime" / "data" / "routing"


def full_count(history: RoutingHistory) -> np.ndarray:
    """What a refit fits from the kept tokens (as one sequence)."""
    ids = history.kept_tokens()
    trace = Trace(ids, np.zeros(ids.shape, dtype=np.float16), np.array([0, len(ids)]), history.num_experts, history.top_k)
    return expert_transitions(trace, used_matrix(trace))


def decode(history: RoutingHistory, tokens: np.ndarray) -> None:
    for token in tokens:  # [L, K]
        for layer, experts in enumerate(token):
            history.record(layer, (experts + layer * history.num_experts).tolist())


def prefill(history: RoutingHistory, routing: np.ndarray) -> None:  # [B, T, L, K]
    for layer in range(routing.shape[2]):
        history.record_prompt(layer, routing[:, :, layer])


def test_transitions_kept_current_equal_a_full_count_as_tokens_enter_and_leave_the_ring():
    rng = np.random.default_rng(0)
    history = RoutingHistory(num_layers=3, num_experts=6, top_k=2)
    routing = rng.integers(0, 6, (history.capacity + 300, 3, 2))  # repeats within rows included
    assert (routing[..., 0] == routing[..., 1]).any()
    decode(history, routing[:40])
    history.record(0, [0, 1])  # closes the 40th token
    assert np.array_equal(history.transitions.table(), full_count(history))
    prefill(history, rng.integers(0, 6, (2, 30, 3, 2)))  # a prompt's tokens join in order
    decode(history, routing[40:])
    history.record(0, [0, 1])  # the ring has wrapped: the oldest tokens' pairs left it
    assert history.kept > history.capacity
    assert np.array_equal(history.transitions.table(), full_count(history))
    prefill(history, rng.integers(0, 6, (1, history.capacity + 5, 3, 2)))  # longer than the ring
    assert np.array_equal(history.transitions.table(), full_count(history))
    assert history.transitions.pairs.sum() == (history.capacity - 1) * 3 * 2 * 2 - _repeats(history)


def _repeats(history: RoutingHistory) -> int:
    """Pair cells a repeat within a row does not count (it names its expert once)."""
    ids = history.kept_tokens()
    distinct = np.array([[len(set(row)) for row in token] for token in ids])  # [T, L]
    return int((2 * 2 - distinct[:-1] * distinct[1:]).sum())


def test_removing_pairs_undoes_adding_them():
    rng = np.random.default_rng(1)
    counts = SlidingTransitions(num_layers=2, num_experts=5, top_k=3)
    older, newer = rng.integers(0, 5, (7, 2, 3)), rng.integers(0, 5, (7, 2, 3))
    counts.add(older, newer)
    counts.flush()
    assert counts.pairs.sum() > 0 and counts.seen.sum() > 0
    counts.add(older[:3], newer[:3], sign=-1)
    counts.add(older[3:], newer[3:], sign=-1)
    counts.flush()
    assert not counts.pairs.any() and not counts.seen.any()


def test_refreshes_come_between_full_refits_and_hand_the_learner_current_transitions():
    history = RoutingHistory(num_layers=2, num_experts=4, top_k=2)
    rng = np.random.default_rng(2)
    decode(history, rng.integers(0, 4, (FIRST_REFIT_TOKENS, 2, 2)))
    history.record(0, [0, 1])
    assert history.refit_due and not history.refresh_due  # no refresh before the first refit
    history.as_trace()
    decode(history, rng.integers(0, 4, (REFIT_EVERY_TOKENS - 1, 2, 2)))
    assert not history.refresh_due
    decode(history, rng.integers(0, 4, (1, 2, 2)))
    history.record(0, [0, 1])
    assert history.refresh_due and not history.refit_due
    assert np.array_equal(history.transitions.table(), full_count(history))
    history.refreshed()
    assert not history.refresh_due and history.since_refresh == 0


def test_the_default_hands_its_learner_the_transitions_of_the_tokens_kept_at_each_refresh():
    trace = load_trace(SHIPPED / "gpt-oss-20b" / "gpqa.npz")
    num_layers, num_experts = trace.num_layers, trace.num_experts
    policy = make_policy("adaptive", num_layers=num_layers, num_experts=num_experts, capacity=num_layers * num_experts // 4, top_k=trace.top_k)
    checked = 0
    for token in trace.expert_ids[:400]:
        refreshes = policy.refreshes
        for layer, experts in enumerate(token):
            policy.on_layer_start(layer, (experts.astype(int) + layer * num_experts).tolist())
            if policy.refreshes > refreshes:  # just now, as layer 0 closed the token before
                assert np.array_equal(policy.learner_model.transitions, full_count(policy.history))
                checked += 1
    assert policy.refits >= 2 and checked >= 5


def test_a_refit_handed_the_historys_transitions_fits_the_model_counting_them_would():
    history = RoutingHistory(num_layers=3, num_experts=8, top_k=2)
    decode(history, np.random.default_rng(3).integers(0, 8, (300, 3, 2)))
    trace = history.as_trace()
    counted, _ = ReuseModel.fit_with_age_table(trace)
    handed, _ = ReuseModel.fit_with_age_table(trace, transitions=history.transitions.table())
    for field in ("bucket", "wait", "transitions", "forecast_edges"):
        assert np.array_equal(getattr(counted, field), getattr(handed, field))
