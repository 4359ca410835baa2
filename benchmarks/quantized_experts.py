"""Quantized experts on this machine: which CPU kernel each format uses (measured), what each
format costs in quality on every tiny family, and bytes per expert against bf16.

    python benchmarks/quantized_experts.py kernels [--json OUT]   # weight-only GEMV per format
    python benchmarks/quantized_experts.py quality [--json OUT] [--plot OUT.png]

kernels: one decode row (x [1, K]) times each expert matrix of a bank too large for the caches
(>= 400 MB, as a decode step streams experts from RAM), per candidate: bf16 and fp16 F.linear,
torch._weight_int8pack_mm (bf16 and fp32 activations), torch._weight_int4pack_mm_for_cpu
(bf16 and fp16 scales), a whole-matrix dequantize then F.linear, and our CPU decode kernel
(kernels/cpu_gemv.py: bf16, int8, int4; int8 and int4 also 8 matrices per call, as a decode
step's experts go; "us" is then per call of 8); GB/s counts the bytes the candidate reads,
beside the memory-read bandwidth measured in the same run. quality: every tiny family (hidden and
expert widths 128, so every int4 group applies; random weights) saved as a checkpoint and scored
with evaluate_checkpoint on 512 tokens of README.md (the tiny models' byte-level tokenizer; the
trained model's figures: benchmarks/embedded_quality.py): perplexity, KL to the unquantized
model and top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from peer_llamacpp import read_bandwidth_gbps  # noqa: E402

from moe_runtime.atomic import check_writable, write_text_atomically  # noqa: E402
from moe_runtime.errors import run_script  # noqa: E402
from moe_runtime.expert_format import format_size_ratio, pack_nibbles, quantize_int4, quantize_int8  # noqa: E402
from moe_runtime.kernels import cpu_gemv  # noqa: E402

SHAPES = {  # (out, in); the first two: live_decode.py's OLMoE-shaped expert, the peer benchmark's small shape
    "live-decode gate_up": (1024, 1024), "live-decode down": (1024, 512),
    "olmoe-1b-7b gate_up": (2048, 2048), "deepseek-v2-lite gate_up": (2816, 2048), "deepseek-v2-lite down": (2048, 1408),
}
FORMATS = ("int8", "int4-g32", "int4", "int4-g128")


def cold_microseconds(calls: list, repeats: int = 3) -> float:
    """Mean µs per call over a list of calls on different matrices (caches never hold them)."""
    for call in calls[:4]:
        call()
    started = time.perf_counter()
    for _ in range(repeats):
        for call in calls:
            call()
    return (time.perf_counter() - started) / repeats / len(calls) * 1e6


def kernel_rows(threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for label, (n, k) in SHAPES.items():
        count = max(8, int(400e6 // (n * k * 2)))
        x = torch.randn(1, k, dtype=torch.bfloat16)
        weights = [torch.randn(n, k) / k**0.5 for _ in range(count)]
        candidates = _candidates(x, weights, n, k)
        for name, (calls, bytes_read) in candidates.items():
            micros = cold_microseconds(calls)
            rows.append({"shape": label, "n": n, "k": k, "kernel": name, "us": micros, "gbps": bytes_read / micros / 1e3})
            print(f"{label:<26}{name:<28}{micros:>9.1f} us{bytes_read / micros / 1e3:>8.1f} GB/s", flush=True)
        del candidates, weights
    return rows


def _candidates(x: torch.Tensor, weights: list[torch.Tensor], n: int, k: int) -> dict:
    bf16 = [w.to(torch.bfloat16) for w in weights]
    fp16 = [w.half() for w in weights]
    int8 = [quantize_int8(w) for w in weights]
    int4 = [quantize_int4(w, 64) for w in weights]
    packed = [(torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2), sz) for q, sz in int4]
    nibbles = [(pack_nibbles(q), sz) for q, sz in int4]
    xh, xf = x.half(), x.float()
    scales4 = (k // 64) * n * 2 * 2
    ours = {}
    if cpu_gemv.available():  # the CPU decode kernel: one matrix per call, and a decode step's 8 experts per call
        rows = xf[None]
        eights = range(0, len(weights) - 7, 8)
        ours = {
            "cpu_gemv bf16": ([lambda w=w: cpu_gemv.products(rows, [w]) for w in bf16], 2 * n * k),
            "cpu_gemv int8": ([lambda q=q, s=s: cpu_gemv.products(rows, [q], [s]) for q, s in int8], n * k + 2 * n),
            "cpu_gemv int4": ([lambda p=p, sz=sz: cpu_gemv.products(rows, [p], [sz], 64) for p, sz in nibbles], n * k // 2 + scales4),
            "cpu_gemv int8, 8 per call": (
                [lambda i=i: cpu_gemv.products(rows, [q for q, _ in int8[i : i + 8]], [s for _, s in int8[i : i + 8]]) for i in eights],
                8 * (n * k + 2 * n),
            ),
            "cpu_gemv int4, 8 per call": (
                [lambda i=i: cpu_gemv.products(rows, [p for p, _ in nibbles[i : i + 8]], [sz for _, sz in nibbles[i : i + 8]], 64) for i in eights],
                8 * (n * k // 2 + scales4),
            ),
        }
    return ours | {
        "bf16 F.linear": ([lambda w=w: F.linear(x, w) for w in bf16], 2 * n * k),
        "fp16 F.linear": ([lambda w=w: F.linear(xh, w) for w in fp16], 2 * n * k),
        "int8 _weight_int8pack_mm": ([lambda q=q, s=s: torch._weight_int8pack_mm(x, q, s) for q, s in int8], n * k + 2 * n),
        "int8pack, fp32 activations": ([lambda q=q, s=s: torch._weight_int8pack_mm(xf, q, s.float()) for q, s in int8], n * k + 4 * n),
        "int8 dequantize + F.linear": ([lambda q=q, s=s: F.linear(x, q.to(torch.bfloat16) * s[:, None]) for q, s in int8], n * k + 2 * n),
        "int4 _weight_int4pack_mm_cpu": ([lambda p=p, sz=sz: torch._weight_int4pack_mm_for_cpu(x, p, 64, sz) for p, sz in packed], n * k // 2 + scales4),
        "int4pack, fp16 scales": ([lambda p=p, sz=sz.half(): torch._weight_int4pack_mm_for_cpu(xh, p, 64, sz) for p, sz in packed[: max(4, len(packed) // 8)]], n * k // 2 + scales4),
        "int4 dequantize + F.linear": ([lambda p=p, sz=sz: F.linear(x, _dequantize_nibbles(p, sz)) for p, sz in nibbles[: max(4, len(nibbles) // 8)]], n * k // 2 + scales4),
    }


def _dequantize_nibbles(packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    from moe_runtime.expert_format import dequantize

    return dequantize({"w.int4": packed, "w.scales_zeros": scales_zeros}, "w", torch.bfloat16)


def quality_rows(tokens: int) -> list[dict]:
    from moe_runtime.tiny_models import byte_tokenizer
    from moe_runtime.evaluation import evaluate_checkpoint
    from moe_runtime.tiny_models import TINY_FAMILIES, expert_fields, tiny_model

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    ids = byte_tokenizer()(text, add_special_tokens=False)["input_ids"][:tokens]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for family in TINY_FAMILIES:
            checkpoint = Path(scratch) / family
            tiny_model(family, hidden_size=128, **expert_fields(family, num_experts=8, intermediate_size=128, top_k=2)).save_pretrained(checkpoint)
            base = evaluate_checkpoint(checkpoint, ids, reference=False)
            for quantize in FORMATS:
                result = evaluate_checkpoint(checkpoint, ids, budget=0.5, quantize=quantize)
                change = result.perplexity / base.perplexity - 1
                rows.append({"family": family, "format": quantize, "tokens": result.tokens, "perplexity": result.perplexity,
                             "perplexity_change": change, "kl": result.kl_to_reference, "top1": result.top1_agreement})
                print(f"{family:<12}{quantize:<10}{result.perplexity:>9.2f}{change:>+9.3%}{result.kl_to_reference:>11.2e}{result.top1_agreement:>8.3f}", flush=True)
    return rows


def bytes_rows() -> list[dict]:
    return [{"format": q, "bytes_vs_bf16": format_size_ratio(q)} for q in ("none", *FORMATS)]


def plot_quality(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(row["family"] for row in rows))
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(FORMATS)
    for index, quantize in enumerate(FORMATS):
        values = [max(1e-12, next(r["kl"] for r in rows if r["family"] == f and r["format"] == quantize)) for f in families]
        axis.bar([i + index * width for i in range(len(families))], values, width, label=quantize)
    axis.set_yscale("log")
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(families))], families, rotation=20)
    axis.set_ylabel("KL to unquantized (nats / token)")
    axis.set_title("Quantized experts: next-token KL, tiny random-weight families, 512 tokens")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("kernels", "quality"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--plot", help="quality: a PNG of KL per family and format")
    args = parser.parse_args()
    for output in (args.json, args.plot):
        if output:
            check_writable(output, "output")
    report = {"bytes": bytes_rows()}
    if args.what == "kernels":
        report["kernels"] = kernel_rows(args.threads)
        report["memory_gbps"] = read_bandwidth_gbps()
        print(f"memory read bandwidth {report['memory_gbps']:.1f} GB/s, {args.threads} threads")
    else:
        report["quality"] = quality_rows(args.tokens)
        if args.plot:
            plot_quality(report["quality"], args.plot)
    for row in report["bytes"]:
        print(f"{row['format']:<10} {row['bytes_vs_bf16']:.3f}x bf16 bytes per expert")
    if args.json:
        write_text_atomically(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    run_script(main)
