"""grouped_moe against transformers' grouped_mm and batched_mm experts, in GB/s of expert weights.

For Mixtral-8x7B, Qwen3-30B-A3B and OLMoE-1B-7B expert shapes and T tokens in {1, 2, ..., 64},
bf16: all E experts sit in one slot pool (a permuted slot table; the pool is larger than L2),
each timed call routes its tokens at random (a different routing per call, so no expert is warm
in L2), L2 is flushed before every call, and each implementation runs as a captured CUDA graph.
Achieved GB/s = distinct routed experts' weight bytes / time, beside the HBM bandwidth measured
in the same run (a device-to-device copy: bytes read + written / time).

    python benchmarks/kernel_bandwidth.py [--tokens 1,2,4,8,16,32,64] [--json out.json] [--plot out.png]
    python benchmarks/kernel_bandwidth.py --smoke   # tiny shapes on CPU (Triton interpreter): checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

if "--smoke" in sys.argv:  # the interpreter must be chosen before Triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from moe_runtime.atomic import check_writable, write_text_atomically  # noqa: E402
from moe_runtime.errors import run_script  # noqa: E402
from moe_runtime.tiny_models import expert_fields, tiny_config  # noqa: E402


@dataclass(frozen=True)
class ExpertShape:
    name: str
    family: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int

    def expert_bytes(self, dtype: torch.dtype) -> int:
        return 3 * self.hidden * self.intermediate * torch.empty(0, dtype=dtype).element_size()


SHAPES = (
    ExpertShape("Mixtral-8x7B", "mixtral", 4096, 14336, 8, 2),
    ExpertShape("Qwen3-30B-A3B", "qwen3_moe", 2048, 768, 128, 8),
    ExpertShape("OLMoE-1B-7B", "olmoe", 2048, 1024, 64, 8),
)
SMOKE_SHAPES = (ExpertShape("smoke-mixtral", "mixtral", 64, 96, 8, 2), ExpertShape("smoke-qwen3", "qwen3_moe", 32, 48, 16, 4))
IMPLEMENTATIONS = ("moe-runtime triton", "transformers grouped_mm", "transformers batched_mm")
L2_FLUSH_BYTES = 256 * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64")
    parser.add_argument("--calls", type=int, default=50, help="timed calls per case (each with its own routing)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    if args.json:
        check_writable(args.json)  # before the runs, not after
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU; --smoke runs tiny shapes on CPU to check the script")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.bfloat16
    tokens_list = [int(t) for t in args.tokens.split(",")]
    hbm = None if args.smoke else measured_hbm_gbps(device)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (interpreter)'}; measured HBM copy bandwidth: {hbm and f'{hbm:.0f} GB/s'}")
    rows = []
    for shape in SMOKE_SHAPES if args.smoke else SHAPES:
        pool = Pool.random(shape, dtype, device)
        print(f"{shape.name}: triton vs transformers grouped_mm, max |difference| / max |out| = {agreement(pool, max(tokens_list)):.1e}")
        for tokens in tokens_list:
            row = {"shape": shape.name, "tokens": tokens}
            for name in IMPLEMENTATIONS:
                row[name] = bandwidth(name, pool, tokens, min(args.calls, 3) if args.smoke else args.calls)
            if hbm:
                row["triton_share_of_hbm"] = row["moe-runtime triton"] / hbm
            rows.append(row)
            print(_line(row))
        del pool
    if args.json:
        write_text_atomically(args.json, json.dumps({"device": str(device), "hbm_gbps": hbm, "results": rows}, indent=1))
    if args.plot:
        _plot(rows, hbm, args.plot)


@dataclass
class Pool:
    """All experts of one layer in a slot pool, plus a transformers experts module over the same memory."""

    shape: ExpertShape
    gate_up: torch.Tensor  # [S, 2I, H]
    down: torch.Tensor  # [S, H, I]
    slot_of_expert: torch.Tensor  # [E] int32, a permutation
    module: torch.nn.Module  # expert e = slot e: the transformers module reads the slots in table order

    @classmethod
    def random(cls, shape: ExpertShape, dtype: torch.dtype, device: torch.device) -> Pool:
        generator = torch.Generator(device=device).manual_seed(0)
        gate_up = torch.randn(shape.experts, 2 * shape.intermediate, shape.hidden, generator=generator, device=device, dtype=dtype) * shape.hidden**-0.5
        down = torch.randn(shape.experts, shape.hidden, shape.intermediate, generator=generator, device=device, dtype=dtype) * shape.intermediate**-0.5
        slot_of_expert = torch.randperm(shape.experts, generator=generator, device=device).to(torch.int32)
        return cls(shape, gate_up, down, slot_of_expert, _experts_module(shape, gate_up[slot_of_expert.long()], down[slot_of_expert.long()]))


def _experts_module(shape: ExpertShape, gate_up: torch.Tensor, down: torch.Tensor) -> torch.nn.Module:
    """The family's transformers experts module holding (a table-ordered copy of) the pool."""
    from moe_runtime.adapters import adapter_for
    from moe_runtime.checkpoint import build_skeleton

    fields = expert_fields(shape.family, num_experts=shape.experts, intermediate_size=shape.intermediate, top_k=shape.top_k)
    config = tiny_config(shape.family, hidden_size=shape.hidden, num_hidden_layers=1, **fields)
    skeleton = build_skeleton(config, gate_up.dtype)
    module = adapter_for(skeleton).blocks(skeleton)[0].experts
    module.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
    module.down_proj = torch.nn.Parameter(down, requires_grad=False)
    return module


def bandwidth(name: str, pool: Pool, tokens: int, calls: int) -> float | None:
    """GB/s of distinct routed expert weights for one implementation; None if it cannot run (OOM)."""
    device = pool.gate_up.device
    shape = pool.shape
    generator = torch.Generator().manual_seed(tokens)
    routings = [torch.stack([torch.randperm(shape.experts, generator=generator)[: shape.top_k] for _ in range(tokens)]) for _ in range(calls)]
    hidden = torch.randn(tokens, shape.hidden, dtype=pool.gate_up.dtype, device=device)
    index = routings[0].to(device)
    weights = torch.rand(tokens, shape.top_k, device=device)
    call = _implementation(name, pool, hidden, index, weights)
    try:
        seconds = _time_calls(call, index, routings, device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    moved = sum(len(torch.unique(r)) for r in routings) * shape.expert_bytes(pool.gate_up.dtype)
    return moved / sum(seconds) / 1e9


def agreement(pool: Pool, tokens: int) -> float:
    """Relative difference of our output and transformers' on one routing: the two read the same experts."""
    shape, device = pool.shape, pool.gate_up.device
    generator = torch.Generator().manual_seed(1)
    index = torch.stack([torch.randperm(shape.experts, generator=generator)[: shape.top_k] for _ in range(tokens)]).to(device)
    hidden = torch.randn(tokens, shape.hidden, generator=generator).to(device, pool.gate_up.dtype)
    weights = torch.rand(tokens, shape.top_k, generator=generator).to(device)
    ours = _implementation("moe-runtime triton", pool, hidden, index, weights)().float()
    theirs = _implementation("transformers grouped_mm", pool, hidden, index, weights)().float()
    difference = (ours - theirs).abs().max() / theirs.abs().max()
    if difference > 0.05:
        raise SystemExit(f"{shape.name}: our output differs from transformers' by {difference:.2e} of its largest value")
    return float(difference)


def _implementation(name: str, pool: Pool, hidden, index, weights):
    from moe_runtime.kernels import grouped_moe

    if name == "moe-runtime triton":
        return lambda: grouped_moe(hidden, pool.gate_up, pool.down, pool.slot_of_expert, index, weights, kernel="triton", check_values=False)
    pool.module.config._experts_implementation = name.rsplit(" ", 1)[1]
    return lambda: pool.module(hidden, index, weights)


def _time_calls(call, index: torch.Tensor, routings: list[torch.Tensor], device: torch.device) -> list[float]:
    """Seconds of each call, each after loading its routing into `index` and flushing L2."""
    if device.type != "cuda":
        seconds = []
        for routing in routings:
            index.copy_(routing)
            started = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - started)
        return seconds
    run = _graphed(call)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    seconds = []
    for routing in routings:
        index.copy_(routing)
        flush.zero_()
        start.record()
        run()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    return seconds


def _graphed(call):
    """`call` captured as a CUDA graph (replay), or `call` itself where capture is impossible."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: compiles the kernels, settles allocations
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            call()
    except RuntimeError as error:
        print(f"  (not capturable as a CUDA graph, timed eagerly: {str(error).splitlines()[0]})")
        return call
    return graph.replay


def measured_hbm_gbps(device: torch.device, gigabytes: float = 4.0) -> float:
    """Device-to-device copy bandwidth: (bytes read + bytes written) / time, best of 10."""
    source = torch.empty(int(gigabytes * 1e9) // 2, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(10):
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * source.numel() / best / 1e9


def _line(row: dict) -> str:
    cells = " | ".join(f"{name.split()[-1]} {row[name]:8.1f}" if row[name] is not None else f"{name.split()[-1]}      OOM" for name in IMPLEMENTATIONS)
    share = f" | {row['triton_share_of_hbm']:.0%} of HBM" if "triton_share_of_hbm" in row else ""
    return f"{row['shape']:<15} T={row['tokens']:<3} GB/s: {cells}{share}"


def _plot(rows: list[dict], hbm: float | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(row["shape"] for row in rows))
    figure, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for axis, shape in zip(axes[0], shapes):
        mine = [row for row in rows if row["shape"] == shape]
        for name in IMPLEMENTATIONS:
            axis.plot([r["tokens"] for r in mine], [r[name] or 0 for r in mine], marker="o", label=name)
        if hbm:
            axis.axhline(hbm, color="black", linestyle="--", label=f"measured HBM {hbm:.0f} GB/s")
        axis.set(xscale="log", xlabel="tokens T", ylabel="GB/s of distinct expert weights", title=shape)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot -> {path}")


if __name__ == "__main__":
    run_script(main)
