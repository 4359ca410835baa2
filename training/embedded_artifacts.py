"""What ships beside the trained embedded model: held-out text, held-out routing traces and
pruning profiles per domain.

corpus (build_corpus.py) + exported model (train_embedded.py --export)
  -> held-out pieces (PIECE_TOKENS tokens each, cut at line ends, from documents never trained on)
     -> moe_runtime/data/embedded/heldout/DOMAIN.txt (pieces separated by a form-feed line)
     -> moe_runtime/data/embedded/traces/DOMAIN.npz (routing + router inputs, one sequence per piece)
  -> training-split pieces (seeded sample) -> routing -> profiles/embedded/DOMAIN.json (keep 50%)

    python training/embedded_artifacts.py [--corpus ~/.cache/moe-runtime/corpus]

Profiles come from training text only, so every quality figure on the held-out pieces is a
held-out figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moe_runtime  # noqa: E402
from moe_runtime.atomic import write_text_atomically  # noqa: E402
from moe_runtime.embedded import (  # noqa: E402
    EMBEDDED_DOMAINS,
    HELDOUT_DIR,
    PACKAGED_MODEL_DIR,
    PIECE_SEPARATOR,
    TRACES_DIR,
    cache_root,
    load_embedded_model,
)
from moe_runtime.pruning import make_profile  # noqa: E402
from train_embedded import SEQUENCE, read_documents  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PIECE_TOKENS = SEQUENCE  # one piece fills the context the model was trained on
HELDOUT_PIECES = 12  # about 3,000 tokens per domain
PROFILE_PIECES = 64
SEED = 1234


def pieces(text: str, tokenizer, limit: int = PIECE_TOKENS) -> list[str]:
    """`text` cut at line ends into pieces of at most `limit` tokens (a longer line is cut where its tokens run out)."""
    starts = np.array([begin for begin, _ in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]])
    line_ends = [i + 1 for i, char in enumerate(text) if char == "\n"] + [len(text)]
    out, begin = [], 0
    while begin < len(text):
        first = np.searchsorted(starts, begin)
        budget_end = starts[first + limit] if first + limit < len(starts) else len(text)
        fitting = [end for end in line_ends if begin < end <= budget_end]
        end = fitting[-1] if fitting else budget_end
        out.append(text[begin:end])
        begin = end
    return [piece for piece in out if piece.strip()]


def sample_pieces(named: list[tuple[str, str]], tokenizer, count: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """`count` (document name, piece) of about PIECE_TOKENS tokens, round-robin over documents in
    a seeded order (one document never dominates); pieces under half the length are skipped."""
    order = rng.permutation(len(named))[:count]
    per_document = [
        [(named[i][0], p) for p in pieces(named[i][1][: PIECE_TOKENS * 40], tokenizer) if len(tokenizer(p)["input_ids"]) > PIECE_TOKENS // 2]
        for i in order
    ]
    chosen = [p for rank in range(max(map(len, per_document))) for p in (d[rank] for d in per_document if rank < len(d))]
    return chosen[:count]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=cache_root() / "corpus")
    parser.add_argument("--profiles", type=Path, default=REPO / "profiles" / "embedded")
    args = parser.parse_args(argv)
    model, tokenizer = load_embedded_model()
    sources = {}
    encode = lambda texts: [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # noqa: E731
    for domain in EMBEDDED_DOMAINS:
        rng = np.random.default_rng([SEED, EMBEDDED_DOMAINS.index(domain)])
        named = sample_pieces(read_documents(args.corpus, domain, "heldout"), tokenizer, HELDOUT_PIECES, rng)
        held = [piece for _, piece in named]
        write_text_atomically(HELDOUT_DIR / f"{domain}.txt", PIECE_SEPARATOR.join(held))
        sources[domain] = sorted({name for name, _ in named})
        held_trace = moe_runtime.record_trace(model, encode(held), router_inputs=True, task=domain)
        held_trace.save(TRACES_DIR / f"{domain}.npz")
        fit = [piece for _, piece in sample_pieces(read_documents(args.corpus, domain, "train"), tokenizer, PROFILE_PIECES, rng)]
        trace = moe_runtime.record_trace(model, encode(fit), task=domain)
        source = [f"{PROFILE_PIECES} pieces of {PIECE_TOKENS} tokens of the training split of the {domain} corpus"]
        make_profile(trace, domain, 0.5, source_names=source).save(args.profiles / f"{domain}.json")
        print(f"{domain}: {len(held)} held-out pieces ({held_trace.num_tokens} tokens); profile from {trace.num_tokens} tokens")
    write_sources(sources, json.loads((args.corpus / "manifest.json").read_text()))
    print(f"model: {PACKAGED_MODEL_DIR}")


def write_sources(sources: dict[str, list[str]], manifest: dict) -> None:
    """heldout/SOURCES.md: the documents each domain's pieces were cut from, their packages and licences."""
    lines = ["# Sources of the held-out text", "",
             "Excerpts (pieces of about 256 tokens, separated by a form-feed line) of documents held out of",
             "the embedded model's training, from Debian bookworm packages (`training/build_corpus.py`).", ""]
    for domain, names in sources.items():
        info = manifest["domains"][domain]
        packages = ", ".join(f"{p} {v}" for p, v in info["packages"].items())
        lines += [f"## {domain}.txt", f"Packages: {packages}. Licence: {info['licence']}.", "", *[f"- `{name}`" for name in names], ""]
    write_text_atomically(HELDOUT_DIR / "SOURCES.md", "\n".join(lines))


if __name__ == "__main__":
    main()
