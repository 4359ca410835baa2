"""The out-of-core headline: a model larger than RAM decoding real routing, against HF
Accelerate's disk offload given the same memory, with the physical bound measured in the same run.

The full-width DeepSeek-V2-Lite shape (random bf16 weights, 28 GB, written a layer at a time by
the live bench) decodes the first --tokens tokens of a shipped ESFT task one at a time with its
real routing replayed (routing_replay.py), on the CPU; `--arch gpt-oss-20b` does the same with
GPT-OSS-20B's full shape (38 GB of bf16 experts) on its shipped traces:

- moe-runtime: from_pretrained at each expert budget with --host-budget of RAM for cold experts
  (the rest read from the checkpoint's shards on a miss), once as the OS leaves it (the page
  cache keeps what fits) and once with every read dropped from the page cache (`--uncached`:
  every miss from the disk);
- HF Accelerate: transformers' from_pretrained with device_map="auto" and max_memory = the
  non-expert bytes + the same expert budget + the same host budget; the rest is disk-offloaded;
- the bound of the uncached run: its bytes read from disk per token over the disk's read
  bandwidth (a 2 GiB span of a shard read cold, 16 MiB reads from 4 threads) plus the bytes a decode step
  computes (non-expert weights and K experts per layer) over the memory bandwidth (a 1 GiB
  tensor summed with 2 threads), both measured in the same run.

    python benchmarks/out_of_core.py --tokens 8 --budgets 0.25,0.5 --host-budget 2GiB --json out.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from peer_llamacpp import read_bandwidth_gbps  # noqa: E402

from moe_runtime.atomic import check_writable, write_text_atomically  # noqa: E402
from moe_runtime.budget import parse_budget  # noqa: E402
from moe_runtime.errors import run_script  # noqa: E402
from moe_runtime.inspection import describe_model_dir  # noqa: E402
from moe_runtime.live_bench import checkpoint_for, decode, decode_row, first_tokens, with_model  # noqa: E402
from moe_runtime.trace import load_trace  # noqa: E402

ROUTING = Path(__file__).resolve().parent.parent / "moe_runtime" / "data" / "routing"
TRACES = {"deepseek-v2-lite": (ROUTING / "esft-vanilla-lite", "law"), "gpt-oss-20b": (ROUTING / "gpt-oss-20b", "gpqa")}  # --arch -> its traces, default task


def disk_read_gbps(path: Path, span: int = 2**31, chunk: int = 16 * 2**20, threads: int = 4) -> float:
    """GB/s of reading `span` bytes of `path` cold (dropped from the page cache first) in `chunk`
    reads from `threads` threads at once: the most the disk gives, whatever reads it."""
    os.sync()
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        span = min(span, os.fstat(descriptor).st_size) // chunk * chunk
        buffers = [bytearray(chunk) for _ in range(threads)]

        def read(worker: int) -> int:
            return sum(os.preadv(descriptor, [buffers[worker]], offset) for offset in range(worker * chunk, span, threads * chunk))

        started = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            done = sum(pool.map(read, range(threads)))
        seconds = time.perf_counter() - started
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)
    return done / seconds / 1e9


def accelerate_ms(path: Path, part, memory: int) -> float:
    """ms/token of transformers' own disk offload given `memory` bytes of RAM, the same routing
    replayed (decode)."""
    with tempfile.TemporaryDirectory(dir=path.parent) as offload:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": memory}, offload_folder=offload,
        ).eval()
        seconds = decode(model, part)
        del model
        gc.collect()
    return seconds / part.num_tokens * 1e3


def physical_memory() -> int:
    """Bytes of RAM on this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def tasks_of(arch: str, names: str | None) -> list[Path]:
    """The trace files of `names` (comma-separated task names, or "all"; None: the arch's default
    task), refused by name before any work."""
    folder, default_task = TRACES[arch]
    shipped = {p.stem: p for p in sorted(folder.glob("*.npz"))}
    wanted = list(shipped) if names == "all" else (names or default_task).split(",")
    unknown = [name for name in wanted if name not in shipped]
    if unknown:
        raise SystemExit(f"no task {', '.join(unknown)} for {arch}; choose from {', '.join(shipped)} or all")
    return [shipped[name] for name in wanted]


def runtime_rows(path: Path, part, shape: dict, budget: float, host_bytes: int, bandwidths: tuple[float, float]) -> list[dict]:
    """moe-runtime at one expert budget, as the OS leaves the page cache and uncached; the uncached
    row carries the bound (its disk bytes over the disk bandwidth, plus the bytes a step computes
    over the memory bandwidth)."""
    disk_gbps, memory_gbps = bandwidths
    computed = shape["non_expert_bytes"] + shape["num_moe_layers"] * shape["top_k"] * shape["bytes_per_expert"]
    rows = []
    for uncached in (False, True):
        seconds, counters, _, disk_reads, _ = with_model(
            path, functools.partial(decode_row, part, uncached), budget=budget, host_budget=host_bytes, policy="lru",
        )
        n = part.num_tokens
        disk_bytes = disk_reads * shape["bytes_per_expert"] / n
        row = {"contender": "moe-runtime" + (", uncached" if uncached else ""), "budget": budget, "ms_per_token": seconds / n * 1e3,
               "disk_mb_per_token": disk_bytes / 1e6, "hit_rate": counters["hit_rate"]}
        if uncached:
            row["bound_ms_per_token"] = (disk_bytes / disk_gbps + computed / memory_gbps) / 1e6
        rows.append(row)
    return rows


def accelerate_row(path: Path, part, shape: dict, budget: float, host_bytes: int) -> dict:
    """HF Accelerate given the same memory as moe-runtime (non-expert bytes + the expert budget +
    the host budget); not run, and said so, where that is more than 90% of this machine's RAM (at
    50% of DeepSeek-V2-Lite's experts it was killed by the OOM killer at 24.3 GB)."""
    memory = int(shape["non_expert_bytes"] + budget * shape["total_expert_bytes"] + host_bytes)
    row = {"contender": "HF Accelerate disk offload", "budget": budget}
    if memory > 0.9 * physical_memory():
        return row | {"ms_per_token": None, "not_run": f"needs {memory / 1e9:.1f} GB, over 90% of this machine's {physical_memory() / 1e9:.1f} GB"}
    return row | {"ms_per_token": accelerate_ms(path, part, memory)}


def print_table(report: dict) -> None:
    """The rows as a table of 80 columns."""
    print(f"{'task':<12}{'contender':<28}{'budget':>7}{'ms/token':>10}{'disk MB':>9}{'bound ms':>10}")
    for row in report["rows"]:
        bound = f"{row['bound_ms_per_token']:>10.1f}" if "bound_ms_per_token" in row else f"{'':>10}"
        disk = f"{row['disk_mb_per_token']:>9.0f}" if "disk_mb_per_token" in row else f"{'':>9}"
        ms = f"{row['ms_per_token']:>10.1f}" if row["ms_per_token"] is not None else f"{'not run':>10}"
        print(f"{row['task']:<12}{row['contender']:<28}{row['budget']:>7}{ms}{disk}{bound}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=TRACES, default="deepseek-v2-lite", help="the full-width shape, decoded on its own model's routing")
    parser.add_argument("--task", help="tasks of that model's shipped traces, comma-separated, or all (default: law for ESFT, gpqa for GPT-OSS)")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--budgets", default="0.25,0.5")
    parser.add_argument("--host-budget", default="2GiB")
    parser.add_argument("--no-accelerate", action="store_true")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.json:
        check_writable(args.json, "output")
    traces = tasks_of(args.arch, args.task)
    path = checkpoint_for(args.arch, 1)
    shape = describe_model_dir(path)
    shards = sorted(path.glob("model-*.safetensors"), key=lambda shard: shard.stat().st_size)
    # This VM's virtual disk serves a span's first read at about 0.6 GB/s and later ones at 2.5-2.8
    # GB/s (the host caches it); the runs read the same files again and again, so the bound takes
    # the better of two passes.
    bandwidths = max(disk_read_gbps(shards[-1]) for _ in range(2)), read_bandwidth_gbps()
    print(f"disk {bandwidths[0]:.2f} GB/s, memory {bandwidths[1]:.1f} GB/s", flush=True)
    host_bytes = parse_budget(args.host_budget, shape["total_expert_bytes"], name="--host-budget", allow_zero=True)
    rows = []
    for trace_file in tqdm(traces, desc="tasks", unit="task"):
        part = first_tokens(load_trace(trace_file), args.tokens)
        for budget in (float(b) for b in args.budgets.split(",")):
            task_rows = runtime_rows(path, part, shape, budget, host_bytes, bandwidths)
            if not args.no_accelerate:
                task_rows.append(accelerate_row(path, part, shape, budget, host_bytes))
            for row in task_rows:
                rows.append({"task": trace_file.stem} | row)
                print(rows[-1], flush=True)
    report = {"shape": f"{args.arch} full width, bf16", "tokens": args.tokens, "host_budget": args.host_budget,
              "disk_gbps": bandwidths[0], "memory_gbps": bandwidths[1], "rows": rows}
    print_table(report)
    if args.json:
        write_text_atomically(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    run_script(main)
