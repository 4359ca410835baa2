"""Live decode benchmark: moe-runtime against a fully resident model and HF Accelerate offload.

A random-weight model of a real architecture (OLMoE-shaped by default) is saved once as a real
checkpoint; then each contender generates greedily from the same prompt and we report decode
tokens/s, the hit rate and, on CUDA, the PCIe lower bound from the pinned host-to-device
bandwidth measured in the same run. "Same memory": Accelerate gets max_memory = non-expert bytes
+ the expert budget on the compute device; on a CPU-only machine the rest of its weights go to
its offload folder on disk, and moe-runtime gets host_budget=0 (misses read from disk) to match.

    python benchmarks/live_decode.py --budgets 0.25,0.5 --json results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import moe_runtime
from moe_runtime.atomic import check_writable, write_text_atomically
from moe_runtime.embedded import cache_root
from moe_runtime.errors import run_script
from moe_runtime.generation import time_generation
from moe_runtime.inspection import describe_model_dir
from moe_runtime.tiny_models import expert_fields, tiny_model


@dataclass(frozen=True)
class Shape:
    family: str = "olmoe"
    hidden_size: int = 1024
    intermediate_size: int = 512
    num_experts: int = 64
    top_k: int = 8
    num_layers: int = 8
    dtype: str = "bfloat16"

    @property
    def name(self) -> str:
        return f"{self.family}-h{self.hidden_size}-i{self.intermediate_size}-e{self.num_experts}-k{self.top_k}-l{self.num_layers}-{self.dtype}"

    def overrides(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            **expert_fields(self.family, num_experts=self.num_experts, intermediate_size=self.intermediate_size, top_k=self.top_k),
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "vocab_size": 50304,
        }


@dataclass
class Row:
    contender: str
    budget: float | None
    decode_tokens_per_second: float
    ms_per_token: float
    hit_rate: float | None = None
    loads_per_token: float | None = None
    pcie_bound_ms_per_token: float | None = None


def build_checkpoint(shape: Shape) -> Path:
    path = cache_root() / "bench" / shape.name
    if not (path / "config.json").is_file():
        print(f"building {path} ...", flush=True)
        model = tiny_model(shape.family, dtype=getattr(torch, shape.dtype), **shape.overrides())
        model.save_pretrained(path)
        del model
        gc.collect()
    return path


def h2d_gigabytes_per_second(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Pinned host-to-device copy bandwidth, best of 5."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        target.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9


def measure(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    time_generation(model, ids, 4)  # warm-up
    timing = time_generation(model, ids, new_tokens)
    return timing.decode_tokens_per_second, 1e3 / timing.decode_tokens_per_second


def run(shape: Shape, budgets: list[float], new_tokens: int, device: torch.device, accelerate: bool) -> list[Row]:
    path = build_checkpoint(shape)
    info = describe_model_dir(path)
    dtype = getattr(torch, shape.dtype)
    ids = torch.randint(3, 50000, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    resident = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    speed, ms = measure(resident, ids, new_tokens)
    rows.append(Row("fully resident", 1.0, speed, ms))
    del resident
    gc.collect()
    bandwidth = h2d_gigabytes_per_second(device) if device.type == "cuda" else None
    for budget in budgets:
        host_budget = 0 if device.type == "cpu" else None
        model = moe_runtime.from_pretrained(path, budget=budget, device=device, dtype=dtype, host_budget=host_budget)
        speed, ms = measure(model, ids, new_tokens)
        counters = moe_runtime.stats(model)
        tokens = new_tokens  # stats cover the timed generation: prefill + new_tokens - 1 decode steps
        loads = counters["loads"] / tokens
        bound = loads * info["bytes_per_expert"] / (bandwidth * 1e9) * 1e3 if bandwidth else None
        rows.append(Row("moe-runtime", budget, speed, ms, counters["hit_rate"], loads, bound))
        moe_runtime.unwrap(model)
        del model
        gc.collect()
        if accelerate:
            rows.append(run_accelerate(path, info, budget, dtype, device, ids, new_tokens))
    return rows


def run_accelerate(path: Path, info: dict, budget: float, dtype, device, ids, new_tokens: int) -> Row:
    memory = int(info["non_expert_bytes"] + budget * info["total_expert_bytes"])
    with tempfile.TemporaryDirectory() as offload:
        if device.type == "cuda":
            max_memory = {device.index or 0: memory, "cpu": 10**12}
        else:
            max_memory = {"cpu": memory}
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, device_map="auto", max_memory=max_memory, offload_folder=offload
        ).eval()
        speed, ms = measure(model, ids, new_tokens)
        del model
        gc.collect()
    return Row("accelerate offload", budget, speed, ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="olmoe")
    parser.add_argument("--hidden", type=int, default=Shape.hidden_size)
    parser.add_argument("--intermediate", type=int, default=Shape.intermediate_size)
    parser.add_argument("--experts", type=int, default=Shape.num_experts)
    parser.add_argument("--top-k", type=int, default=Shape.top_k)
    parser.add_argument("--layers", type=int, default=Shape.num_layers)
    parser.add_argument("--dtype", default=Shape.dtype)
    parser.add_argument("--budgets", default="0.25,0.5")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-accelerate", action="store_true")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.json:
        check_writable(args.json)  # before the runs, not after
    shape = Shape(args.family, args.hidden, args.intermediate, args.experts, args.top_k, args.layers, args.dtype)
    device = torch.device(args.device)
    rows = run(shape, [float(b) for b in args.budgets.split(",")], args.new_tokens, device, not args.no_accelerate)
    print(f"{shape.name} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), {args.new_tokens} new tokens")
    print(f"{'contender':<20}{'budget':>8}{'tok/s':>10}{'ms/tok':>10}{'hit rate':>10}{'loads/tok':>11}{'PCIe bound ms':>15}")
    for row in rows:
        cells = [row.hit_rate, row.loads_per_token, row.pcie_bound_ms_per_token]
        extra = "".join(f"{c:>11.3f}" if c is not None else f"{'-':>11}" for c in cells)
        print(f"{row.contender:<20}{row.budget if row.budget is not None else '-':>8}{row.decode_tokens_per_second:>10.2f}{row.ms_per_token:>10.1f}{extra}")
    if args.json:
        write_text_atomically(args.json, json.dumps({"shape": asdict(shape), "device": str(device), "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    run_script(main)
