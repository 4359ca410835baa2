"""Train the embedded model: a small OLMoE on the four-domain corpus, seeded and resumable, on a CPU.

corpus (build_corpus.py) -> byte-level BPE tokenizer (tokenizers, 4096 ids, training split only)
-> token arrays per domain -> OlmoeForCausalLM (config below) trained with AdamW on domain-pure
windows, loss = next-token cross-entropy + OLMoE's own load-balancing loss (router_aux_loss_coef)
-> RUN/checkpoint.pt every --save-every steps (resumes from it), RUN/log.jsonl, RUN/loss.png
-> --export DIR: bf16 safetensors + tokenizer, the shipped embedded model.

    python training/train_embedded.py --run ~/.cache/moe-runtime/train-embedded --steps 3200
    python training/train_embedded.py --run ~/.cache/moe-runtime/train-embedded --export moe_runtime/data/embedded/model

Measured on the 2-core EPYC VM: about 0.9 s per step of 16 x 256 tokens alone on the machine;
the shipped run (3,200 steps, 13.1 M tokens) took 68 minutes.
Every batch is drawn from numpy's generator seeded with (seed, step), so a resumed run sees the
same batches as an uninterrupted one and ends at its weights (up to the order of multi-threaded
float sums: 1e-7 seen).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_runtime.atomic import write_atomically  # noqa: E402
from moe_runtime.embedded import cache_root  # noqa: E402

DOMAINS = ("code", "manual", "legal", "translation")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
VOCAB_SIZE = 4096
MODEL_SHAPE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=192,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=6,
    num_key_value_heads=2,
    num_experts=32,
    num_experts_per_tok=4,
    max_position_embeddings=1024,
    router_aux_loss_coef=0.01,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
SEQUENCE = 256
BATCH = 16
PEAK_LR = 2e-3
WARMUP = 200
EVAL_WINDOWS = 8


def read_documents(corpus: Path, domain: str, split: str) -> list[tuple[str, str]]:
    """(name, text) of every document of one domain and split of the corpus."""
    with open(corpus / domain / f"{split}.jsonl") as handle:
        return [(row["name"], row["text"]) for row in map(json.loads, handle)]


def train_tokenizer(corpus: Path, out: Path):
    """A byte-level BPE tokenizer of VOCAB_SIZE ids learnt from the training split of every domain."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    core.train_from_iterator((text for domain in DOMAINS for _, text in read_documents(corpus, domain, "train")), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", model_max_length=1024)
    with tempfile.TemporaryDirectory(dir=out) as scratch:  # tokenizer.json, whose presence a resume trusts, lands last and whole
        tokenizer.save_pretrained(scratch)
        os.replace(Path(scratch) / "tokenizer_config.json", out / "tokenizer_config.json")
        os.replace(Path(scratch) / "tokenizer.json", out / "tokenizer.json")
    return tokenizer


def token_arrays(corpus: Path, tokenizer, split: str) -> dict[str, np.ndarray]:
    """Each domain's documents as one uint16 array, each document followed by </s>."""
    arrays = {}
    for domain in DOMAINS:
        encoded = tokenizer([text for _, text in read_documents(corpus, domain, split)], add_special_tokens=False)["input_ids"]
        arrays[domain] = np.fromiter((t for ids in encoded for t in (*ids, 2)), dtype=np.uint16)
    return arrays


def batch(arrays: dict[str, np.ndarray], rng: np.random.Generator, rows: int) -> torch.Tensor:
    """[rows, SEQUENCE + 1] windows, each from one domain (chosen in proportion to its tokens)."""
    sizes = np.array([len(arrays[d]) for d in DOMAINS], dtype=np.float64)
    domains = rng.choice(len(DOMAINS), size=rows, p=sizes / sizes.sum())
    windows = []
    for d in domains:
        tokens = arrays[DOMAINS[d]]
        start = rng.integers(0, len(tokens) - SEQUENCE - 1)
        windows.append(tokens[start : start + SEQUENCE + 1].astype(np.int64))
    return torch.from_numpy(np.stack(windows))


def learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def new_model(seed: int):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    return OlmoeForCausalLM(OlmoeConfig(**MODEL_SHAPE))


@torch.no_grad()
def heldout_loss(model, heldout: dict[str, np.ndarray], seed: int) -> dict[str, float]:
    """Mean next-token loss on EVAL_WINDOWS fixed windows of each domain's held-out text."""
    model.eval()
    losses = {}
    for domain in DOMAINS:
        rng = np.random.default_rng([seed, 999, DOMAINS.index(domain)])
        tokens = heldout[domain]
        starts = rng.integers(0, len(tokens) - SEQUENCE - 1, size=EVAL_WINDOWS)
        x = torch.from_numpy(np.stack([tokens[s : s + SEQUENCE + 1].astype(np.int64) for s in starts]))
        losses[domain] = float(model(input_ids=x[:, :-1], labels=x[:, :-1]).loss)
    model.train()
    return losses


def plot(log: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    steps = [row["step"] for row in log if "loss" in row]
    axis.plot(steps, [row["loss"] for row in log if "loss" in row], lw=0.6, alpha=0.6, label="training batch")
    evals = [row for row in log if "heldout" in row]
    for domain in DOMAINS:
        axis.plot([row["step"] for row in evals], [row["heldout"][domain] for row in evals], marker="o", ms=3, label=f"held-out {domain}")
    axis.set(xlabel="step (16 x 256 tokens)", ylabel="next-token loss (nats)", title="embedded OLMoE training", ylim=(0, 8.5))
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    write_atomically(out, lambda handle: figure.savefig(handle, format="png", dpi=110))
    plt.close(figure)


def save_checkpoint(run: Path, model, optimizer, step: int, seed: int, log: list[dict], elapsed: float) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed, "seed": seed}
    write_atomically(run / "checkpoint.pt", lambda handle: torch.save(state, handle))
    write_atomically(run / "log.jsonl", lambda handle: handle.write("".join(json.dumps(r) + "\n" for r in log).encode()))
    plot(log, run / "loss.png")


def train(corpus: Path, run: Path, steps: int, seed: int, save_every: int, eval_every: int) -> None:
    from transformers import AutoTokenizer

    run.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(run) if (run / "tokenizer.json").is_file() else train_tokenizer(corpus, run)
    arrays, heldout = token_arrays(corpus, tokenizer, "train"), token_arrays(corpus, tokenizer, "heldout")
    model = new_model(seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    start, log, elapsed = 0, [], 0.0
    if (run / "checkpoint.pt").is_file():
        state = torch.load(run / "checkpoint.pt", weights_only=False)
        if state.get("seed", seed) != seed:
            raise ValueError(f"{run} holds a run with seed {state['seed']}; resume it with --seed {state['seed']}, or choose another --run")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed = state["step"], state["elapsed"]
        log = [row for row in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if row["step"] < start]
    else:
        log.append({"step": 0, "heldout": heldout_loss(model, heldout, seed), "tokens_per_domain": {d: len(a) for d, a in arrays.items()}})
    began = time.perf_counter() - elapsed
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="training", unit="step"):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        x = batch(arrays, np.random.default_rng([seed, step]), BATCH)
        target = x[:, 1:].contiguous()
        out = model(input_ids=x[:, :-1], labels=target, shift_labels=target, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            log.append({"step": step, "loss": (out.loss - model.config.router_aux_loss_coef * out.aux_loss).item(), "aux": out.aux_loss.item(),
                        "seconds": time.perf_counter() - began})
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            log.append({"step": step + 1, "heldout": heldout_loss(model, heldout, seed), "seconds": time.perf_counter() - began})
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save_checkpoint(run, model, optimizer, step + 1, seed, log, time.perf_counter() - began)


def export(run: Path, out: Path, seed: int) -> None:
    """The trained weights in bf16 with the tokenizer, written atomically as a checkpoint folder
    (`seed` is recorded where the checkpoint predates storing its own)."""
    from transformers import AutoTokenizer

    from moe_runtime.atomic import staging_directory

    state = torch.load(run / "checkpoint.pt", weights_only=False)
    model = new_model(0)
    model.load_state_dict(state["model"])
    model = model.to(torch.bfloat16).eval()
    model.config.max_position_embeddings = SEQUENCE  # the context it was trained on; evaluate's windows follow it
    model.generation_config.pad_token_id = 0
    with staging_directory(out, "embedded model folder") as staging:
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(run).save_pretrained(staging)
        shutil.copyfile(run / "loss.png", staging / "loss.png")
        (staging / "training.json").write_text(json.dumps({"steps": state["step"], "seconds": state["elapsed"], "sequence": SEQUENCE, "batch": BATCH,
                                                          "tokens_seen": state["step"] * SEQUENCE * BATCH, "seed": state.get("seed", seed),
                                                          "parameters": sum(p.numel() for p in model.parameters())}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=cache_root() / "corpus")
    parser.add_argument("--run", type=Path, default=cache_root() / "train-embedded", help="run folder: tokenizer, checkpoint, log, plot")
    parser.add_argument("--steps", type=int, default=3200, help="the shipped model's run: %(default)s")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=400)
    parser.add_argument("--export", type=Path, help="write the trained model (bf16) and tokenizer to this folder and stop")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.export:
        export(args.run, args.export, args.seed)
    else:
        train(args.corpus, args.run, args.steps, args.seed, args.save_every, args.eval_every)


if __name__ == "__main__":
    main()
