"""Routing predictors: known answers on synthetic traces, files, held-out checks, live prefetching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moe_runtime
from moe_runtime.predictor import (
    PREDICTORS,
    CrossLayerGatePredictor,
    LiveForecaster,
    evaluate,
    load_predictor,
    make_predictor,
    save_predictor,
)
from moe_runtime.trace import Trace

E, L = 8, 5


def chain_trace(sequences: int, length: int, seed: int) -> Trace:
    """Deterministic routing chain: K = 1, expert at layer l + 1 = (expert at l + 3) mod E, and
    each token's first expert = (previous token's + 1) mod E (a random start per sequence)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(sequences):
        first = rng.integers(E)
        for t in range(length):
            start = (first + t) % E
            rows.append([(start + 3 * layer) % E for layer in range(L)])
    ids = np.array(rows, dtype=np.int16)[:, :, None]
    offsets = np.arange(0, sequences * length + 1, length)
    return Trace(ids, np.ones_like(ids, dtype=np.float16), offsets, num_experts=E, top_k=1)


@pytest.mark.parametrize("kind", ["affinity", "learned", "previous-token"])
def test_a_deterministic_chain_is_predicted_perfectly(kind):
    fit, held_out = chain_trace(12, 20, seed=0), chain_trace(4, 21, seed=1)  # other lengths: other sequences
    predictor = make_predictor(kind).fit(fit)
    for row in evaluate(predictor, held_out, (1, 2), (1,)):
        if kind == "previous-token":  # the previous token used (e - 1) at the target layer: never right at m = 1
            assert row["recall"] < 0.1
        else:
            assert row["recall"] == pytest.approx(1.0), row


def test_popularity_finds_the_one_popular_expert():
    ids = np.zeros((30, L, 1), dtype=np.int16)
    ids[:15:3, :, 0] = 5  # sequence 0: every third token uses expert 5, the rest expert 0
    ids[16::3, :, 0] = 5  # sequence 1: the same, shifted (another sequence)
    trace = Trace(ids, np.ones_like(ids, dtype=np.float16), np.array([0, 15, 30]), num_experts=E, top_k=1)
    fit, held_out = trace.split(0.5)
    assert evaluate(make_predictor("popularity").fit(fit), held_out, (1,), (1,))[0]["recall"] == pytest.approx(2 / 3, abs=0.01)


@pytest.mark.parametrize("kind", sorted(PREDICTORS))
def test_save_load_round_trip_gives_identical_forecasts(kind, trace_paths, tmp_path):
    from moe_runtime.trace import load_trace

    from moe_runtime.predictor.learned import LearnedPredictor

    fit, held_out = load_trace(trace_paths["translation"]).select_sequences(range(6)).split(0.5)  # every array, fewer rows
    predictor = (LearnedPredictor(lookaheads=(1, 3)) if kind == "learned" else make_predictor(kind)).fit(fit)  # d = 2 unfitted: 2/3 of the solves
    loaded = load_predictor(save_predictor(predictor, tmp_path / f"{kind}.npz"))
    for d in (1, 3):
        assert np.array_equal(predictor.forecast_trace(held_out, d), loaded.forecast_trace(held_out, d))
    assert loaded.fitted_on == predictor.fitted_on


def test_evaluation_refuses_fitting_sequences():
    from moe_runtime.trace import merge_traces

    trace = merge_traces([chain_trace(3, 10, seed=2), chain_trace(3, 11, seed=2)])  # halves differ
    predictor = make_predictor("affinity").fit(trace)
    with pytest.raises(ValueError, match="used to fit this predictor"):
        evaluate(predictor, trace, (1,), (1,))
    fit, held_out = trace.split(0.5)
    evaluate(make_predictor("affinity").fit(fit), held_out, (1,), (1,))


def test_predictor_of_another_shape_is_refused(trace_paths, tmp_path):
    predictor = make_predictor("popularity").fit(chain_trace(3, 5, seed=3))
    with pytest.raises(ValueError, match="fitted on \\(L, E\\) = \\(5, 8\\)"):
        moe_runtime.wrap(moe_runtime.tiny_models.tiny_model("olmoe"), budget=0.5, device="cpu", predictor=predictor)


def test_live_forecaster_follows_rows_across_steps():
    predictor = make_predictor("previous-token").fit(chain_trace(3, 5, seed=4))
    live = LiveForecaster(predictor, L, E)
    prefill = torch.tensor([[1], [2], [3], [4], [5], [6]])  # two rows of three prompt tokens
    for layer in range(L):
        live.observe(layer, prefill, torch.ones(6, 1), None)
    decode = torch.tensor([[0], [0]])
    live.observe(0, decode, torch.ones(2, 1), None)
    previous = live.context.previous[0, :, 0]  # the prompt's last token of each row, at layer 0
    assert previous[0].argmax() == 3 and previous[1].argmax() == 6
    assert live.forecast(0, 1).shape == (E,)


def test_unfitted_predictor_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="must be fitted on traces of this model first: moe-runtime predictor fit"):
        moe_runtime.wrap(moe_runtime.tiny_models.tiny_model("olmoe"), budget=0.5, device="cpu", predictor="learned")


@pytest.fixture(scope="module")
def embedded():
    from moe_runtime.embedded import DEMO_PROMPTS, embedded_model_dir, load_embedded_model

    model, tokenizer = load_embedded_model()
    sequences = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in DEMO_PROMPTS]
    return embedded_model_dir(), model, tokenizer, sequences


def test_cross_layer_gate_recall_on_the_embedded_model(embedded):
    _, model, _, sequences = embedded
    trace = moe_runtime.record_trace(model, sequences, router_inputs=True)
    rows = evaluate(CrossLayerGatePredictor(model), trace, (1,), (trace.top_k,))
    assert rows[0]["recall"] > 3 * trace.top_k / trace.num_experts  # random guessing: K / E = 0.125
    assert len(rows[0]["per_layer_recall"]) == trace.num_layers - 1


def test_prefetching_raises_the_hit_rate_of_the_embedded_model(embedded):
    path, model, tokenizer, _ = embedded
    ids = tokenizer("Summarise: the committee met on Tuesday.", return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    rates = {}
    for predictor in (None, "cross-layer-gate"):
        offloaded = moe_runtime.from_pretrained(path, budget=0.5, device="cpu", dtype=torch.float32, predictor=predictor, prefetch_width=8)
        assert torch.equal(offloaded.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False), want)
        stats = moe_runtime.stats(offloaded)
        rates[predictor] = stats["hit_rate"]
        if predictor:
            assert stats["prefetches_issued"] > 0 and 0 < stats["prefetches_used"] <= stats["prefetches_issued"]
            assert stats["predictor"] == "cross-layer-gate"
    assert rates["cross-layer-gate"] > rates[None]


def test_a_learned_file_from_another_feature_layout_is_refused(tmp_path):
    predictor = make_predictor("learned").fit(chain_trace(3, 5, seed=5))
    path = save_predictor(predictor, tmp_path / "learned.npz")
    arrays = dict(np.load(path))
    arrays["weights_1"] = arrays["weights_1"][:, 1:]  # one feature fewer than this version computes
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="fitted by another version; refit it"):
        load_predictor(path)


def pair_routing(tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One-hot routing [N, 4] at a source and a target layer, K = 2, where the target pair is a
    function of the source pair that no single source expert determines."""
    follows = {(0, 1): (0, 1), (2, 3): (0, 1), (0, 2): (2, 3), (1, 3): (2, 3), (0, 3): (1, 2), (1, 2): (0, 3)}
    pairs = list(follows)
    source, target = np.zeros((tokens, 4), np.float32), np.zeros((tokens, 4), np.float32)
    for row, choice in enumerate(np.random.default_rng(seed).integers(len(pairs), size=tokens)):
        source[row, list(pairs[choice])] = 1
        target[row, list(follows[pairs[choice]])] = 1
    return source, target


def test_pair_table_follows_its_formula_and_falls_back_to_popularity():
    from moe_runtime.predictor.pair_affinity import ALPHA, fit_pair_table

    source, target = pair_routing(60, seed=0)
    table = fit_pair_table([source], target, top_k=2)
    with_01 = (source[:, 0] > 0) & (source[:, 1] > 0)
    expected = (target[with_01].sum(axis=0) / 2 + ALPHA * target.mean(axis=0)) / (with_01.sum() + ALPHA)
    for ids in ([0, 1], [1, 0]):  # either order
        np.testing.assert_allclose(table.forecast(np.array([[ids]]))[0, 0], expected, rtol=2e-3)
    rare = fit_pair_table([source], target, top_k=2, max_pairs=1)  # keeps only the most frequent pair
    assert len(rare.codes) == 1
    kept = divmod(int(rare.codes[0]), 4)
    others = np.array([[[a, b]] for a in range(4) for b in range(a + 1, 4) if (a, b) != kept])
    np.testing.assert_allclose(rare.forecast(others)[:, 0], np.tile(target.mean(axis=0), (5, 1)), rtol=2e-3)
    assert not np.allclose(rare.forecast(np.array([[kept]]))[0, 0], target.mean(axis=0), rtol=0.05)


def test_pairs_predict_what_single_experts_cannot():
    from moe_runtime.predictor.pair_affinity import fit_pair_table, top_ids

    source, target = pair_routing(600, seed=1)
    held_source, held_target = pair_routing(200, seed=2)
    forecast = fit_pair_table([source], target, top_k=2).forecast(top_ids(held_source, 2)[:, None])[:, 0]
    top = np.argsort(-forecast, axis=1)[:, :2]
    assert np.take_along_axis(held_target, top, axis=1).sum() / (2 * len(top)) == 1.0
    single = (source.T @ target) / source.sum(axis=0)[:, None]  # P(j | i), the affinity table
    top = np.argsort(-(held_source @ single), axis=1)[:, :2]
    assert np.take_along_axis(held_target, top, axis=1).sum() / (2 * len(top)) < 0.9
