"""In-place execution on a CPU against the slot-pool copy, and against the unwrapped model.

Each row runs in a fresh process (so peak RSS is its own): the random-weight OLMoE-shaped
checkpoint of live_decode.py is loaded by transformers (or by from_pretrained, --from-disk),
wrapped at a budget with execution="device" (every miss copied into a slot pool in RAM: the
engine before in-place execution) or "host" (computed where the experts lie), then decodes
greedily; decode ms/token and the process's RSS after decoding and at its peak are reported.

    python benchmarks/cpu_in_place.py --budgets 0.1,0.25,0.5,1.0 --json cpu_in_place.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from live_decode import Shape, build_checkpoint  # noqa: E402

from moe_runtime.atomic import check_writable, write_text_atomically  # noqa: E402
from moe_runtime.errors import run_script  # noqa: E402


def one_row(path: Path, contender: str, budget: float, new_tokens: int, from_disk: bool) -> dict:
    """Runs in the child: load, wrap, decode; its figures."""
    import torch
    from transformers import AutoModelForCausalLM

    import moe_runtime
    from moe_runtime.generation import time_generation

    torch.manual_seed(0)
    ids = torch.randint(3, 50000, (1, 16), generator=torch.Generator().manual_seed(0))
    if from_disk and contender != "unwrapped":
        model = moe_runtime.from_pretrained(path, budget=budget, device="cpu", host_budget=0, execution=contender)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        if contender != "unwrapped":
            moe_runtime.wrap(model, budget=budget, device="cpu", execution=contender)
    time_generation(model, ids, 4)  # warm-up
    timing = time_generation(model, ids, new_tokens)
    row = {"contender": contender, "budget": budget, "ms_per_token": 1e3 / timing.decode_tokens_per_second}
    row["rss_mib"] = psutil.Process().memory_info().rss / 2**20
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if contender != "unwrapped":
        counters = moe_runtime.stats(model)
        row["hit_rate"], row["slot_pool_mib"] = counters["hit_rate"], counters["slot_pool_bytes"] / 2**20
    return row


def run_in_child(path: Path, contender: str, budget: float, new_tokens: int, from_disk: bool) -> dict:
    command = [sys.executable, __file__, "--child", str(path), contender, str(budget), str(new_tokens), str(int(from_disk))]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        path, contender, budget, new_tokens, from_disk = sys.argv[2:7]
        print(json.dumps(one_row(Path(path), contender, float(budget), int(new_tokens), bool(int(from_disk)))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="0.1,0.25,0.5,1.0")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="contenders alternate; each row keeps its best round")
    parser.add_argument("--from-disk", action="store_true", help="from_pretrained with host_budget=0: every miss read from disk")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.json:
        check_writable(args.json)  # before minutes of decoding, not after
    path = build_checkpoint(Shape())
    budgets = [float(b) for b in args.budgets.split(",")]
    best: dict[tuple, dict] = {}
    for _ in range(args.rounds):
        runs = [("unwrapped", 1.0)] + [(c, b) for b in budgets for c in ("device", "host")]
        for contender, budget in runs:
            row = run_in_child(path, contender, budget, args.new_tokens, args.from_disk)
            key = (contender, budget)
            if key not in best or row["ms_per_token"] < best[key]["ms_per_token"]:
                best[key] = row
            print(f"  {contender:<10} {budget:>5}: {row['ms_per_token']:.1f} ms/token", flush=True)
    rows = list(best.values())
    print(f"{Shape().name}, CPU, {args.new_tokens} new tokens, {'from disk' if args.from_disk else 'wrapped in RAM'}, best of {args.rounds}")
    print(f"{'execution':<11}{'budget':>7}{'ms/token':>10}{'RSS MiB':>9}{'peak MiB':>10}{'pool MiB':>10}{'hit rate':>10}")
    for row in rows:
        pool = f"{row['slot_pool_mib']:>10.0f}{row['hit_rate']:>10.3f}" if "hit_rate" in row else f"{'-':>10}{'-':>10}"
        print(f"{row['contender']:<11}{row['budget']:>7}{row['ms_per_token']:>10.1f}{row['rss_mib']:>9.0f}{row['peak_rss_mib']:>10.0f}{pool}")
    if args.json:
        write_text_atomically(args.json, json.dumps({"shape": Shape().name, "rows": rows}, indent=1))


if __name__ == "__main__":
    run_script(main)
