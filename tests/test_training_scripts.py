"""The embedded model's corpus split and training script: a stable held-out split that keeps a
catalogue's languages together, and a training run that resumes after an interrupt to exactly
the weights of an uninterrupted one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import build_corpus  # noqa: E402
import train_embedded  # noqa: E402

WORDS = {
    "code": "def f(x):\n    return x + {i}\n\nclass Item{i}:\n    pass\n",
    "manual": "NAME\n       tool{i} - do thing number {i}\nOPTIONS\n       -v  be verbose\n",
    "legal": "Permission is granted to copy clause {i}, provided this notice is kept.\n",
    "translation": "English: file {i} not found\nFrench: fichier {i} introuvable\n\n",
}


def test_the_heldout_split_is_stable_and_keeps_a_catalogues_languages_together():
    names = [f"catalogue:pkg{i}/{lang}" for i in range(40) for lang in ("fr", "de", "es")] + [f"doc{i}" for i in range(60)]
    groups = [build_corpus.group_of(name) for name in names]
    held = build_corpus.heldout_groups(groups)
    assert held == build_corpus.heldout_groups(list(reversed(groups)))  # order does not matter
    assert len(held) == round(build_corpus.HELDOUT_SHARE * len(set(groups)))
    for name in names:
        if name.startswith("catalogue:pkg1/"):
            assert (build_corpus.group_of(name) in held) == ("catalogue:pkg1" in held)
    assert len(build_corpus.heldout_groups(["a", "b"])) == 2  # at least MIN_HELDOUT, as far as there are documents


def test_long_documents_are_cut_at_blank_lines():
    text = "\n\n".join(f"paragraph {i} " + "x" * 5000 for i in range(30))
    pieces = list(build_corpus.chunks("big", text))
    assert len(pieces) > 1 and all(len(p) <= build_corpus.MAX_DOCUMENT_CHARS + 5100 for _, p in pieces)
    assert "\n\n".join(p for _, p in pieces) == text


def tiny_corpus(folder: Path) -> Path:
    for domain, template in WORDS.items():
        (folder / domain).mkdir(parents=True)
        for split, count in (("train", 120), ("heldout", 60)):
            with open(folder / domain / f"{split}.jsonl", "w") as handle:
                for doc in range(3):
                    text = "".join(template.format(i=i * 7 + doc) for i in range(count))
                    handle.write(json.dumps({"name": f"{domain}{doc}", "text": text}) + "\n")
    return folder


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    corpus = tiny_corpus(tmp_path / "corpus")
    train_embedded.train(corpus, tmp_path / "straight", steps=4, seed=7, save_every=2, eval_every=2)
    with pytest.raises(ValueError, match="resume it with --seed 7"):
        train_embedded.train(corpus, tmp_path / "straight", steps=6, seed=8, save_every=2, eval_every=2)
    real_batch, calls = train_embedded.batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # after step 2 was saved, as Ctrl-C would
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(train_embedded, "batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_embedded.train(corpus, tmp_path / "resumed", steps=4, seed=7, save_every=2, eval_every=2)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(train_embedded, "batch", real_batch)
    train_embedded.train(corpus, tmp_path / "resumed", steps=4, seed=7, save_every=2, eval_every=2)
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == straight["step"] == 4
    for name, tensor in straight["model"].items():  # equal up to the order of multi-threaded float sums (seen: 1e-7)
        torch.testing.assert_close(resumed["model"][name], tensor, atol=1e-6, rtol=1e-5, msg=name)
    logged = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "log.jsonl")]
    assert logged == sorted(logged)  # no step logged twice after the resume
    assert (tmp_path / "resumed" / "loss.png").stat().st_size > 0
