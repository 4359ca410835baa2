"""Synthetic routing: its knobs do what they are named for."""

import numpy as np
import pytest

from moe_runtime.synthetic import flat_routing


def _consecutive_popularity_correlations(trace) -> np.ndarray:
    """Correlation of the experts' use counts in each sequence with those in the next, every layer."""
    found = []
    for layer in range(trace.num_layers):
        counts = [np.bincount(trace.expert_ids[begin:end, layer].ravel(), minlength=trace.num_experts) for begin, end in zip(trace.seq_offsets[:-1], trace.seq_offsets[1:])]
        found += [np.corrcoef(before, after)[0, 1] for before, after in zip(counts[:-1], counts[1:])]
    return np.array(found)


def test_drift_changes_which_experts_are_popular_from_one_sequence_to_the_next():
    """Zipf 1.2 over 32 experts, 8 sequences of 200 tokens: with no drift every sequence favours the
    same experts; with the whole ranking redrawn per sequence, consecutive sequences' favourites are
    unrelated."""
    fixed, drifting = (flat_routing(4, 32, 2, 1600, reuse=0.0, skew=1.2, drift=drift, seed=1) for drift in (0.0, 1.0))
    assert _consecutive_popularity_correlations(fixed).min() > 0.9
    assert abs(_consecutive_popularity_correlations(drifting).mean()) < 0.2


def test_drift_without_a_skew_is_refused():
    with pytest.raises(ValueError, match="give skew > 0"):
        flat_routing(2, 8, 2, 10, drift=0.5)


@pytest.mark.parametrize("knobs", [{"reuse": 1.5}, {"skew": 0.7, "drift": 2.0}, {"skew": -0.5}])
def test_knobs_out_of_range_are_refused(knobs):
    with pytest.raises(ValueError, match="shares between 0 and 1"):
        flat_routing(2, 8, 2, 10, **knobs)
