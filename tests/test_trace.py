"""Trace files: the shared ESFT files load, our files round-trip, malformed files fail clearly."""

from __future__ import annotations

import numpy as np
import pytest

from moe_runtime.trace import Trace, load_trace, load_traces, merge_traces
from moe_runtime.trace_stats import gini, reuse_rate, trace_summary


def test_shared_traces_load(trace_paths):
    for task, path in trace_paths.items():
        trace = load_trace(path)
        assert (trace.num_layers, trace.num_experts, trace.top_k) == (26, 64, 6), task
        assert trace.expert_ids.dtype == np.int16 and trace.gate_weights.dtype == np.float16
        assert 3000 < trace.num_tokens < 6000 and 7 <= trace.num_sequences <= 64


def test_round_trip_keeps_arrays_and_metadata(trace_paths, tmp_path):
    trace = load_traces([trace_paths["law"]])
    assert trace.task == "law"
    path = trace.save(tmp_path / "law_copy.npz")
    again = load_trace(path)
    assert np.array_equal(again.expert_ids, trace.expert_ids)
    assert np.array_equal(again.gate_weights, trace.gate_weights)
    assert np.array_equal(again.seq_offsets, trace.seq_offsets)
    assert (again.num_experts, again.top_k, again.task) == (trace.num_experts, trace.top_k, "law")


def test_merge_keeps_each_sequences_task(trace_paths):
    merged = load_traces([trace_paths["intent"], trace_paths["summary"]])
    intent, summary = load_trace(trace_paths["intent"]), load_trace(trace_paths["summary"])
    assert merged.num_tokens == intent.num_tokens + summary.num_tokens
    assert merged.tasks() == ("intent",) * intent.num_sequences + ("summary",) * summary.num_sequences
    tail = merged.select_sequences([merged.num_sequences - 1])
    assert np.array_equal(tail.expert_ids, summary.select_sequences([summary.num_sequences - 1]).expert_ids)


def test_split_is_by_sequence(trace_paths):
    trace = load_trace(trace_paths["translation"])
    fit, held_out = trace.split(0.5)
    assert fit.num_sequences + held_out.num_sequences == trace.num_sequences
    assert fit.num_tokens + held_out.num_tokens == trace.num_tokens
    assert np.array_equal(np.concatenate([fit.expert_ids, held_out.expert_ids]), trace.expert_ids)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def _good_arrays():
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(8)[:2] for _ in range(10 * 3)]).reshape(10, 3, 2).astype(np.int16)
    return dict(
        expert_ids=ids,
        gate_weights=np.full((10, 3, 2), 0.5, dtype=np.float16),
        seq_offsets=np.array([0, 4, 10]),
        num_experts=np.int64(8),
        top_k=np.int64(2),
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(expert_ids=np.zeros((10, 6), dtype=np.int16)), "expert_ids must be \\[T, L, K\\]"),
        (dict(expert_ids=np.full((10, 3, 2), 8, dtype=np.int16)), "expert_ids must lie in \\[0, num_experts = 8\\)"),
        (dict(seq_offsets=np.array([0, 6, 4, 10])), "seq_offsets must be strictly increasing"),
        (dict(seq_offsets=np.array([0, 4, 9])), "seq_offsets must start at 0 and end at T = 10"),
        (dict(gate_weights=np.zeros((10, 3, 3), dtype=np.float16)), "gate_weights must have the shape"),
        (dict(top_k=np.int64(3)), "top_k = 3 but expert_ids has 2"),
        (dict(expert_ids=np.zeros((10, 3, 2), dtype=np.float32)), "expert_ids must be an integer array"),
    ],
)
def test_malformed_traces_name_the_bad_array(tmp_path, change, message):
    path = _write(tmp_path / "bad.npz", **{**_good_arrays(), **change})
    with pytest.raises(ValueError, match=message) as info:
        load_trace(path)
    assert str(path) in str(info.value)


def test_missing_array_is_named(tmp_path):
    arrays = _good_arrays()
    del arrays["seq_offsets"]
    with pytest.raises(ValueError, match="lacks the array\\(s\\) seq_offsets"):
        load_trace(_write(tmp_path / "bad.npz", **arrays))


def test_not_a_trace_file(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a .npz trace file"):
        load_trace(path)
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "absent.npz")


def test_merge_refuses_other_shapes(trace_paths):
    small = Trace(**{k: v for k, v in _good_arrays().items() if k not in ("num_experts", "top_k")}, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="different model shapes"):
        merge_traces([load_trace(trace_paths["law"]), small])


def test_reuse_rate_and_gini_on_hand_made_traces():
    # Sequence 0: tokens repeat experts {0,1} -> full reuse; sequence 1 alternates {2,3}/{4,5} -> none.
    ids = np.array([[[0, 1]], [[1, 0]], [[0, 1]], [[2, 3]], [[4, 5]], [[2, 3]]], dtype=np.int16)
    trace = Trace(ids, np.ones_like(ids, dtype=np.float16), np.array([0, 3, 6]), num_experts=8, top_k=2)
    assert reuse_rate(trace) == pytest.approx(2 / 4)  # pairs: 1, 1 | 0, 0 (boundary pair excluded)
    assert gini(np.array([5, 5, 5, 5])) == 0.0
    assert gini(np.array([0, 0, 0, 8])) == pytest.approx(0.75)
    summary = trace_summary(trace)
    assert summary["tokens"] == 6 and summary["sequences"] == 2
