"""Pruning quality on a live model: next-token loss and KL to the unpruned model, per keep share,
own-task profile against another task's, on prompts held out from the profile.

Each embedded task's prompts are split in half: a profile is made from the first half's routing,
the second half is scored (teacher-forced next-token loss over the prompt, and the mean KL
divergence of the pruned model's next-token distribution from the unpruned one's).

    python benchmarks/profile_quality.py [--write-profiles profiles/embedded-olmoe-v1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import moe_runtime
from moe_runtime.atomic import check_writable, write_text_atomically
from moe_runtime.embedded import EMBEDDED_TASKS, load_embedded_model
from moe_runtime.pruning import make_profile

KEEPS = (0.25, 0.5, 0.75)


def loss_and_logits(model, sequences):
    losses, logits = [], []
    with torch.no_grad():
        for ids in sequences:
            tokens = torch.tensor([ids])
            out = model(tokens, labels=tokens)
            losses.append(out.loss.item())
            logits.append(out.logits[0, :-1].float())
    return sum(losses) / len(losses), logits


def mean_kl(reference, pruned) -> float:
    total = count = 0.0
    for want, got in zip(reference, pruned):
        p = torch.log_softmax(want, -1)
        q = torch.log_softmax(got, -1)
        total += (p.exp() * (p - q)).sum().item()
        count += want.shape[0]
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-profiles", help="also write keep-0.5 profiles made from ALL prompts of each task here")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.json:
        check_writable(args.json)  # before the runs, not after
    model, tokenizer = load_embedded_model()
    encode = lambda prompts: [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]  # noqa: E731
    split = {task: (encode(p[: len(p) // 2]), encode(p[len(p) // 2 :])) for task, p in EMBEDDED_TASKS.items()}
    traces = {task: moe_runtime.record_trace(model, fit, task=task) for task, (fit, _) in split.items()}
    tasks = list(EMBEDDED_TASKS)
    rows = []
    for task in tasks:
        held_out = split[task][1]
        base_loss, base_logits = loss_and_logits(model, held_out)
        other = tasks[(tasks.index(task) + 1) % len(tasks)]
        for keep in KEEPS:
            for source in (task, other):
                profile = make_profile(traces[source], source, keep)
                pruned = moe_runtime.wrap(load_embedded_model()[0], budget=1.0, device="cpu", profile=profile)
                loss, logits = loss_and_logits(pruned, held_out)
                rows.append({"task": task, "profile": source, "keep": keep, "loss": loss, "delta_loss": loss - base_loss, "kl": mean_kl(base_logits, logits), "base_loss": base_loss})
    print(f"{'task':<10}{'keep':>6}{'own dloss':>11}{'own KL':>9}{'other':>11}{'other dloss':>13}{'other KL':>10}")
    for task in tasks:
        for keep in KEEPS:
            own = next(r for r in rows if r["task"] == task and r["keep"] == keep and r["profile"] == task)
            other = next(r for r in rows if r["task"] == task and r["keep"] == keep and r["profile"] != task)
            print(f"{task:<10}{keep:>6}{own['delta_loss']:>11.4f}{own['kl']:>9.4f}{other['profile']:>11}{other['delta_loss']:>13.4f}{other['kl']:>10.4f}")
    if args.json:
        write_text_atomically(args.json, json.dumps(rows, indent=1))
    if args.write_profiles:
        for task, prompts in EMBEDDED_TASKS.items():
            trace = moe_runtime.record_trace(model, encode(prompts), task=task)
            make_profile(trace, task, 0.5, source_names=[f"embedded prompts: {task}"]).save(Path(args.write_profiles) / f"{task}.json")


if __name__ == "__main__":
    main()
