"""Concurrent requests on one offloaded model: N threads generating at once against one at a time.

The runtime runs one MoE layer at a time per model (a lock held across each layer), so threads
interleave layer by layer; this measures what that costs or gains (attention and the rest of the
model run outside the lock) and what the uncontended lock itself costs per layer.

    python benchmarks/concurrent_requests.py --threads 1,2,4 --budget 0.25 --json out.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import torch

import moe_runtime
from moe_runtime.atomic import check_writable, write_text_atomically
from moe_runtime.embedded import embedded_model_dir
from moe_runtime.errors import run_script

NEW_TOKENS = 32


def prompts(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 250, (1, 8), generator=generator) for _ in range(count)]


def generate_all(model, inputs: list[torch.Tensor], threads: int) -> float:
    """Seconds to generate NEW_TOKENS for every input, `threads` requests at a time."""
    queue = list(inputs)
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                ids = queue.pop()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

    start = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return time.perf_counter() - start


def lock_cost_us(rounds: int = 200_000) -> float:
    """Microseconds for one uncontended acquire + release of the runtime's lock type."""
    lock = threading.RLock()
    start = time.perf_counter()
    for _ in range(rounds):
        with lock:
            pass
    return (time.perf_counter() - start) / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2,4", help="comma list of concurrent requests")
    parser.add_argument("--requests", type=int, default=8, help="requests per measurement")
    parser.add_argument("--budget", type=float, default=0.25, help="share of the experts in the slot pool")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.json:
        check_writable(args.json)
    model = moe_runtime.from_pretrained(embedded_model_dir(), budget=args.budget, device="cpu")
    inputs = prompts(args.requests)
    generate_all(model, inputs[:1], 1)  # warm-up
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        moe_runtime.reset_stats(model)
        seconds = generate_all(model, inputs, threads)
        hit_rate = moe_runtime.stats(model)["hit_rate"]
        rows.append({"threads": threads, "seconds": seconds, "tokens_per_second": len(inputs) * NEW_TOKENS / seconds, "hit_rate": hit_rate})
    figures = {"budget": args.budget, "requests": len(inputs), "new_tokens": NEW_TOKENS, "lock_us": lock_cost_us(), "rows": rows}
    print(f"uncontended lock: {figures['lock_us']:.3f} us per MoE layer")
    print(f"{'threads':>8} {'seconds':>9} {'tok/s':>8} {'vs 1':>6} {'hit rate':>9}")
    for row in rows:
        ratio = row["tokens_per_second"] / rows[0]["tokens_per_second"]
        print(f"{row['threads']:>8} {row['seconds']:>9.2f} {row['tokens_per_second']:>8.1f} {ratio:>6.2f} {row['hit_rate']:>9.3f}")
    if args.json:
        write_text_atomically(args.json, json.dumps(figures, indent=1))


if __name__ == "__main__":
    run_script(main)
