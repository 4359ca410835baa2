"""Write the embedded model's card: data and licences, training, and held-out perplexity per
domain against a bigram model of the same training text and against the untrained model.

shipped held-out pieces (data/embedded/heldout) -> token ids -> next-token NLL of each piece alone
  - the trained model (the shipped bf16 weights, computed in fp32)
  - the same architecture at its seeded initialisation (what training started from)
  - a Witten-Bell bigram (interpolated with add-one unigrams) counted on the training split
-> perplexity per domain -> moe_runtime/data/embedded/model/README.md and card.json (the figures;
   tests recompute the trained model's)

    python training/model_card.py [--corpus ~/.cache/moe-runtime/corpus]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_runtime.atomic import write_text_atomically  # noqa: E402
from moe_runtime.embedded import EMBEDDED_DOMAINS, PACKAGED_MODEL_DIR, cache_root, heldout_pieces, load_embedded_model  # noqa: E402
from train_embedded import BATCH, MODEL_SHAPE, SEQUENCE, new_model, token_arrays  # noqa: E402


class Bigram:
    """P(b | a) = l(a) c(a, b) / c(a) + (1 - l(a)) P(b), l(a) = c(a) / (c(a) + distinct followers of a)."""

    def __init__(self, tokens: np.ndarray, vocab: int):
        pairs = tokens[:-1].astype(np.int64) * vocab + tokens[1:]
        keys, counts = np.unique(pairs, return_counts=True)
        self.pair_counts = dict(zip(keys.tolist(), counts.tolist()))
        self.context = np.bincount(tokens[:-1], minlength=vocab).astype(np.float64)
        self.followers = np.bincount(keys // vocab, minlength=vocab).astype(np.float64)
        self.unigram = (np.bincount(tokens, minlength=vocab) + 1.0) / (len(tokens) + vocab)
        self.vocab = vocab

    def nll(self, ids: list[int]) -> tuple[float, int]:
        total = 0.0
        for a, b in zip(ids[:-1], ids[1:]):
            seen = self.context[a]
            weight = seen / (seen + self.followers[a]) if seen else 0.0
            pair = self.pair_counts.get(a * self.vocab + b, 0) / seen if seen else 0.0
            total -= math.log(weight * pair + (1 - weight) * self.unigram[b])
        return total, len(ids) - 1


@torch.no_grad()
def model_nll(model, ids: list[int]) -> tuple[float, int]:
    x = torch.tensor([ids])
    return float(model(input_ids=x, labels=x).loss) * (len(ids) - 1), len(ids) - 1


def perplexity(score, pieces: list[list[int]]) -> float:
    totals = [score(ids) for ids in pieces]
    return math.exp(sum(t for t, _ in totals) / sum(n for _, n in totals))


def measure(corpus: Path, seed: int) -> dict:
    model, tokenizer = load_embedded_model(torch.float32)
    untrained = new_model(seed).eval()
    train = token_arrays(corpus, tokenizer, "train")
    bigram = Bigram(np.concatenate(list(train.values())), MODEL_SHAPE["vocab_size"])
    rows = {}
    for domain in EMBEDDED_DOMAINS:
        pieces = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in heldout_pieces(domain)]
        rows[domain] = {
            "heldout_tokens": sum(map(len, pieces)),
            "train_tokens": int(len(train[domain])),
            "trained": perplexity(lambda ids: model_nll(model, ids), pieces),
            "bigram": perplexity(bigram.nll, pieces),
            "untrained": perplexity(lambda ids: model_nll(untrained, ids), pieces),
        }
    return rows


def card(rows: dict, manifest: dict, training: dict) -> str:
    table = "\n".join(
        f"| {d} | {r['train_tokens']:,} | {r['heldout_tokens']:,} | **{r['trained']:.1f}** | {r['bigram']:.1f} | {r['untrained']:.0f} |"
        for d, r in rows.items()
    )
    sources = "\n".join(
        f"| {d} | {', '.join(f'{p} {v}' for p, v in m['packages'].items())} | {m['licence']} |" for d, m in manifest["domains"].items()
    )
    shape = ", ".join(f"{k}={v}" for k, v in MODEL_SHAPE.items() if k not in ("pad_token_id", "bos_token_id", "eos_token_id", "max_position_embeddings"))
    return f"""# embedded-olmoe-v2: the embedded default model of moe-runtime

A small OLMoE ({training['parameters'] / 1e6:.1f} M parameters, bf16 safetensors) trained on a
2-core CPU on four domains of real text, so that routing, text and quality figures are real on
every machine. Made by `training/build_corpus.py` then `training/train_embedded.py`
(seeded, resumable); this card by `training/model_card.py`.

## Architecture
`OlmoeForCausalLM`: {shape}; context {SEQUENCE} tokens (it was trained on windows of
{SEQUENCE}; `max_position_embeddings` says so). Tokenizer: byte-level BPE of 4,096 ids learnt
with `tokenizers` on the training split.

## Training
{training['steps']:,} steps of {BATCH} x {SEQUENCE} tokens ({training['tokens_seen']:,} tokens seen),
AdamW (peak learning rate 2e-3, warm-up 200 steps, cosine to 2e-4, weight decay 0.1), next-token
cross-entropy plus OLMoE's own load-balancing loss (coefficient 0.01), seed {training['seed']};
{training['seconds'] / 3600:.2f} hours of wall time on a 2-core AMD EPYC VM (torch CPU, fp32; about
0.9 s per step alone on the machine, the rest lost while other work shared its cores). Every window is
drawn from one domain, domains in proportion to their tokens. Loss curves: `loss.png`.

## Data
Debian bookworm packages fetched with `apt-get download` (the registry this machine reaches),
unpacked, one document per file; held out by a fixed hash of the document's name (a gettext
catalogue's languages held out together): {manifest['heldout_share']:.0%} of each domain's
documents, at least three, never trained on.

| domain | packages (version) | licence |
|---|---|---|
{sources}

## Held-out perplexity (lower is better)
Each held-out piece (about 256 tokens, `moe_runtime/data/embedded/heldout/DOMAIN.txt`) scored on
its own; the bigram is counted on the same training split (Witten-Bell interpolated with add-one
unigrams); "untrained" is this architecture at the seed training started from.

| domain | training tokens | held-out tokens | trained | bigram | untrained |
|---|---|---|---|---|---|
{table}

## Licence
The weights and tokenizer: Apache-2.0, as moe-runtime. The training text keeps its own licences
(above); the held-out excerpts shipped beside the model list their documents and licences in
`moe_runtime/data/embedded/heldout/SOURCES.md`.

## Intended use
A demonstration and test model for moe-runtime's offloading, routing, pruning and quantization
figures. It writes plausible-looking code, manual pages, licence text and message translations;
it knows nothing and must not be used for anything that matters.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=cache_root() / "corpus")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    training = json.loads((PACKAGED_MODEL_DIR / "training.json").read_text())
    rows = measure(args.corpus, training["seed"])
    manifest = json.loads((args.corpus / "manifest.json").read_text())
    write_text_atomically(PACKAGED_MODEL_DIR / "README.md", card(rows, manifest, training))
    print(f"{'domain':<12}{'trained':>9}{'bigram':>9}{'untrained':>11}")
    for domain, row in rows.items():
        print(f"{domain:<12}{row['trained']:>9.1f}{row['bigram']:>9.1f}{row['untrained']:>11.0f}")
    write_text_atomically(PACKAGED_MODEL_DIR / "card.json", json.dumps({"perplexity": rows, "training": training}, indent=1) + "\n")


if __name__ == "__main__":
    main()
