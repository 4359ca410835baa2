"""Disk layout on the shipped ESFT traces: contiguous reads per token and layer, and real cold reads.

The layout is fitted on the first half of every task's sequences (merged: one store serves all
tasks) and scored on the second halves. Then real stores are written to disk, one in expert id
order and one in the planned order, holding random experts of `--expert-mb` for the first
`--layers` layers; for a sample of held-out (token, layer) reads, the layer file's pages are
dropped from the page cache (posix_fadvise DONTNEED) and the token's K experts are read, in file
order, one read per expert, or one read per contiguous run (`ConvertedStore.runs` / `read_run`, the
runtime's own path).

    python benchmarks/disk_layout.py [--layers 4] [--expert-mb 4] [--reads 400] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_runtime.errors import run_script
from moe_runtime.placement import disk_layout, expert_id_order, routing_statistics, runs_per_read
from moe_runtime.disk_store import ConvertedStore
from moe_runtime.trace import load_trace, merge_traces
from moe_runtime.expert_format import ExpertSpec

DATA = Path(__file__).resolve().parent.parent / "moe_runtime" / "data" / "routing" / "esft-vanilla-lite"
TASKS = ("intent", "law", "summary", "translation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--expert-mb", type=float, default=4.0)
    parser.add_argument("--reads", type=int, default=400)
    parser.add_argument("--dir", default=None, help="where to write the two stores (default: a temporary folder)")
    args = parser.parse_args()

    halves = [load_trace(DATA / f"{task}.npz").split(0.5) for task in TASKS]
    fit, held_out = merge_traces([h[0] for h in halves]), merge_traces([h[1] for h in halves])
    started = time.perf_counter()
    layout = disk_layout(routing_statistics(fit).coactivation)
    print(f"layout of {fit.num_layers} layers x {fit.num_experts} experts in {time.perf_counter() - started:.2f} s")
    id_order = expert_id_order(fit.num_layers, fit.num_experts)
    for name, order in (("expert id order", id_order), ("planned layout", layout)):
        print(f"{name:>16}: {runs_per_read(order, held_out):.3f} contiguous reads per token and layer (held out)")

    rng = np.random.default_rng(0)
    sample = [(int(t), int(l)) for t, l in zip(rng.integers(0, held_out.num_tokens, args.reads), rng.integers(0, args.layers, args.reads))]
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for name, order in (("expert id order", id_order), ("planned layout", layout)):
            store = _random_store(Path(folder) / name.replace(" ", "-"), order[: args.layers], args.expert_mb)
            for coalesce in (False, True):
                seconds, reads = _cold_reads(store, held_out, sample, coalesce)
                how = "one preadv per run" if coalesce else "one pread per expert"
                mb = len(sample) * held_out.top_k * args.expert_mb
                print(f"{name:>16}, {how:<20}: {reads / len(sample):.2f} reads, {mb / seconds:7.0f} MB/s, {seconds / len(sample) * 1e3:.2f} ms per token-layer")
            store.close()


def _random_store(directory: Path, order: np.ndarray, expert_mb: float) -> ConvertedStore:
    columns = int(expert_mb * 1e6 / 2 / 1024)
    shapes = {"weight": (1024, columns)}
    generator = torch.Generator().manual_seed(0)
    experts = order.shape[1]
    return ConvertedStore.write(
        directory, ExpertSpec(shapes, torch.float16), len(order), experts,
        lambda layer, expert: {"weight": torch.randn(shapes["weight"], generator=generator).half()}, order=order.tolist(),
    )


def _cold_reads(store: ConvertedStore, trace, sample, coalesce: bool) -> tuple[float, int]:
    """Seconds spent reading the sampled token-layers' experts from a cold page cache, and reads issued."""
    seconds, reads = 0.0, 0
    shape = store.manifest["description"]["shapes"]["weight"]
    for token, layer in tqdm(sample, desc="cold reads", leave=False):
        _drop_from_page_cache(store.files[layer].path)
        experts = [int(e) for e in trace.expert_ids[token, layer]]
        runs = store.runs(layer, experts) if coalesce else [[expert] for expert in sorted(experts, key=store.position[layer].get)]
        outs = [[{"weight": torch.empty(shape, dtype=torch.float16)} for _ in run] for run in runs]
        started = time.perf_counter()
        for run, targets in zip(runs, outs):
            store.read_run(layer, run, targets)
        seconds += time.perf_counter() - started
        reads += len(runs)
    return seconds, reads


def _drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


if __name__ == "__main__":
    run_script(main)
