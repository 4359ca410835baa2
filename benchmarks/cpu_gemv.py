"""torch's CPU matrix-vector kernels at decode (one token), in the formats experts are computed in.

A decode step multiplies one activation row by every weight matrix it touches, each read once
from DRAM. This times torch's kernels for that: `F.linear` in bf16 and fp16, and the weight-only
kernels the runtime uses for quantized experts on a CPU (`_weight_int8pack_mm`, int8 per output
channel; `_weight_int4pack_mm_for_cpu`, int4 in groups of 64), at the matrix shapes of an
OLMoE-shaped expert (gate_up 1024 x 1024, down 1024 x 512) and larger, two ways:

- hot: the same matrix again and again (it stays in cache: the kernel's own speed);
- streaming: a ring of distinct matrices of 256 MB in all, larger than any cache here, each call
  taking the next one, as a decode step does;

in GB/s of the weight bytes read (packed bytes for int8 / int4), beside the memory-read bandwidth
measured in the same run (a 1 GiB tensor summed). Why it matters: llama.cpp reads its whole Q8_0
decode step at about 30 GB/s on this VM (BENCHMARKS.md), so a format whose streaming rate is
below that cannot reach 0.8x of it whatever the rest of the step costs.

    python benchmarks/cpu_gemv.py [--threads 2] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from peer_llamacpp import read_bandwidth_gbps  # noqa: E402

from moe_runtime.atomic import check_writable, write_atomically, write_text_atomically  # noqa: E402
from moe_runtime.expert_format import quantize_int4, quantize_int8  # noqa: E402

SHAPES = ((1024, 512), (1024, 1024), (2048, 2048), (4096, 4096))  # (out, in)
FORMATS = ("bf16", "fp16", "int8", "int4")
RING_BYTES = 256 * 2**20  # more than any last-level cache on the machines we run on
GROUP = 64


def operand(fmt: str, weight: torch.Tensor):
    """(call(x) -> [1, out], weight bytes the call reads) for one [out, in] bf16 matrix held in `fmt`."""
    if fmt in ("bf16", "fp16"):
        held = weight.to(torch.bfloat16 if fmt == "bf16" else torch.float16)
        return (lambda x: F.linear(x.to(held.dtype), held)), held.nbytes
    if fmt == "int8":
        q, scale = quantize_int8(weight)
        return (lambda x: torch._weight_int8pack_mm(x, q, scale)), q.nbytes + scale.nbytes
    q, scales_zeros = quantize_int4(weight, GROUP)
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)
    return (lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_zeros)), packed.nbytes + scales_zeros.nbytes


def gbps(calls: list, nbytes: int, x: torch.Tensor, seconds: float = 0.5) -> float:
    """Weight GB/s of calling `calls` in turn for about `seconds` (after a warm-up pass)."""
    for call in calls:
        call(x)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for call in calls:
            call(x)
        count += len(calls)
    return count * nbytes / (time.perf_counter() - started) / 1e9


def measure(fmt: str, shape: tuple[int, int]) -> dict:
    out_features, in_features = shape
    x = torch.randn(1, in_features, dtype=torch.bfloat16)
    hot, nbytes = operand(fmt, torch.randn(shape, dtype=torch.bfloat16) * 0.02)
    ring = [operand(fmt, torch.randn(shape, dtype=torch.bfloat16) * 0.02)[0] for _ in range(max(2, RING_BYTES // nbytes))]
    hot_gbps, streaming_gbps = gbps([hot], nbytes, x), gbps(ring, nbytes, x)
    return {"format": fmt, "shape": f"{out_features}x{in_features}", "weight_bytes": nbytes, "hot_gbps": hot_gbps,
            "streaming_gbps": streaming_gbps, "streaming_us_per_call": nbytes / streaming_gbps / 1e3}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.6), layout="constrained")
    shapes = [f"{o}x{i}" for o, i in SHAPES]
    for offset, fmt in zip((-0.3, -0.1, 0.1, 0.3), FORMATS):
        values = [next(r["streaming_gbps"] for r in report["rows"] if r["format"] == fmt and r["shape"] == s) for s in shapes]
        axis.bar([i + offset for i in range(len(shapes))], values, width=0.2, label=fmt)
    axis.axhline(report["memory_gbps"], color="k", linestyle="--", linewidth=1, label="memory read bandwidth")
    axis.set_xticks(range(len(shapes)), shapes)
    axis.set_xlabel("weight matrix (out x in)")
    axis.set_ylabel("GB/s of weights, streaming")
    axis.legend(fontsize=8)
    write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=120))
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--plot", help="write a PNG of the streaming rates here")
    args = parser.parse_args()
    for path in (args.json, args.plot):
        if path:
            check_writable(path, "output")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    report = {"threads": args.threads, "memory_gbps": read_bandwidth_gbps(), "rows": []}
    print(f"memory read bandwidth {report['memory_gbps']:.1f} GB/s, {args.threads} threads")
    print(f"{'format':<8}{'matrix':>11}{'MB':>7}{'hot GB/s':>10}{'stream GB/s':>13}{'us/call':>9}")
    with torch.no_grad():
        for shape in SHAPES:
            for fmt in FORMATS:
                row = measure(fmt, shape)
                report["rows"].append(row)
                print(f"{fmt:<8}{row['shape']:>11}{row['weight_bytes'] / 1e6:>7.2f}{row['hot_gbps']:>10.1f}"
                      f"{row['streaming_gbps']:>13.1f}{row['streaming_us_per_call']:>9.1f}", flush=True)
    if args.json:
        write_text_atomically(args.json, json.dumps(report, indent=1))
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    main()
