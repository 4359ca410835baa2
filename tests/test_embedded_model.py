"""The trained embedded model and what ships beside it: weights within limits, a card whose
figures recompute, held-out text and traces that agree, and the quality properties the
product promises on them (profile retrieval, cross-layer-gate recall)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import moe_runtime
from moe_runtime.embedded import EMBEDDED_DOMAINS, PACKAGED_MODEL_DIR, TRACES_DIR, embedded_model_dir, heldout_pieces, load_embedded_model
from moe_runtime.profiles import PROFILES_DIR
from moe_runtime.pruning import load_profiles, match_trace
from moe_runtime.trace import load_trace
from moe_runtime.predictor.cross_layer import CrossLayerGatePredictor
from moe_runtime.predictor.evaluation import evaluate as predictor_recall

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from model_card import model_nll, perplexity  # noqa: E402  the card's own scoring


@pytest.fixture(scope="module")
def embedded():
    return load_embedded_model()


@pytest.fixture(scope="module")
def traces():
    return {domain: load_trace(TRACES_DIR / f"{domain}.npz") for domain in EMBEDDED_DOMAINS}


def test_the_shipped_model_is_small_trained_and_tokenizes_with_bpe(embedded):
    model, tokenizer = embedded
    assert (PACKAGED_MODEL_DIR / "model.safetensors").stat().st_size <= 40 * 2**20
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.num_experts, config.num_experts_per_tok) == ("olmoe", 6, 32, 4)
    assert len(tokenizer) == config.vocab_size == 4096
    ids = tokenizer("def main(argv):\n    return 0\n", add_special_tokens=False)["input_ids"]
    assert len(ids) < 16  # merges learnt: far fewer tokens than the 26 bytes
    card = json.loads((PACKAGED_MODEL_DIR / "card.json").read_text())
    assert card["training"]["tokens_seen"] >= 10_000_000


def test_the_cards_perplexity_recomputes_and_beats_its_baselines(embedded):
    model, tokenizer = embedded
    card = json.loads((PACKAGED_MODEL_DIR / "card.json").read_text())["perplexity"]
    pieces = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in heldout_pieces("legal")]
    assert perplexity(lambda ids: model_nll(model, ids), pieces) == pytest.approx(card["legal"]["trained"], rel=0.01)
    for domain, row in card.items():
        assert row["trained"] < row["bigram"] < row["untrained"], domain


def test_heldout_text_and_traces_agree_per_domain(embedded, traces):
    _, tokenizer = embedded
    for domain, trace in traces.items():
        pieces = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in heldout_pieces(domain)]
        assert sum(map(len, pieces)) >= 2000, domain  # a few thousand tokens each
        assert trace.num_sequences == len(pieces) and trace.num_tokens == sum(map(len, pieces))
        assert trace.router_inputs is not None and trace.router_inputs.shape == (trace.num_tokens, 6, 192)
        assert (trace.num_layers, trace.num_experts, trace.top_k, trace.task) == (6, 32, 4, domain)


def test_the_runtime_routes_heldout_text_as_its_trace_says(embedded, traces):
    _, tokenizer = embedded
    model = moe_runtime.from_pretrained(embedded_model_dir(), budget=0.25, device="cpu", dtype=torch.float32)  # as traced
    ids = tokenizer(heldout_pieces("manual")[0], add_special_tokens=False)["input_ids"]
    live = moe_runtime.record_trace(model, [ids])
    shipped = traces["manual"].select_sequences([0])
    same = (live.expert_ids == shipped.expert_ids).all(axis=2).mean()
    assert same > 0.98  # the same weights through the offloaded path; a near-tie may flip a rare token


def test_auto_profile_picks_the_domain_of_nine_in_ten_heldout_pieces(traces):
    profiles = load_profiles(PROFILES_DIR / "embedded")
    picks = [(domain, m["task"]) for domain, trace in traces.items() for m in match_trace(profiles, trace, 16)]
    assert sum(domain == task for domain, task in picks) >= 0.9 * len(picks)


def test_cross_layer_gate_recall_on_heldout_traces(embedded, traces):
    model, _ = embedded
    for domain, trace in traces.items():
        row = predictor_recall(CrossLayerGatePredictor(model), trace, (1,), (trace.top_k,))[0]
        assert row["recall"] >= 0.7, domain
