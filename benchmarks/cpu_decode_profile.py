"""Where a CPU decode step's time goes: the decode kernel's calls (kernels/cpu_gemv.py) by what
they multiply, and everything else (attention, norms, routing, the runtime's and transformers'
Python), for the peer benchmark's checkpoint wrapped with int8 or int4 throughout, or at full
precision (bf16, fp16) with exact=False.

    python benchmarks/cpu_decode_profile.py [--shape live-decode|olmoe-1b-7b] [--quantize int8|int4|bf16|fp16] [--tokens 32] [--ablate ROUNDS] [--json OUT]

The checkpoint (peer_llamacpp.py's, built once) is wrapped at budget 1.0 with `quantize` and
`quantize_rest` (bf16, fp16: loaded in that dtype, wrapped with exact=False); a 16-token prompt is prefilled, then `tokens` greedy steps run one at a time
through the KV cache under torch.inference_mode (as time_generation runs them), each timed, and
every kernel call inside them timed too. GB/s counts the bytes of the matrices a call reads.
`--ablate R` then times the step as shipped against the step with one part of the decode path
undone (transformers' attention forward instead of decode_attention.py, and so the layers' own
forward, which calls it; transformers' RMS norms and rotary function instead of the native ops;
torch's router `linear` and SDPA instead of the decode kernel's logits and the native one-query
attention, which exact=False allows; no_grad instead of inference_mode; every op exact, as
exact=True would run them; the decoder layers' own forward instead of decode_layer.py),
alternating for R rounds, best of each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from peer_llamacpp import PROMPT, SHAPES, THREADS, checkpoint_of  # noqa: E402

from moe_runtime.atomic import check_writable, write_text_atomically  # noqa: E402
from moe_runtime.errors import run_script  # noqa: E402
from moe_runtime.expert_format import TILE_ROWS, tile_group  # noqa: E402
from moe_runtime.hf_cache import cache_keyword  # noqa: E402
from moe_runtime.kernels import cpu_gemv  # noqa: E402


class KernelClock:
    """Wraps cpu_gemv.products and cpu_gemv.silu_experts: time and bytes per (matrices per call,
    [N, K] stored) while on (a SwiGLU call: "M+M swiglu", its gate_up and down shapes)."""

    def __init__(self):
        self.on = False
        self.calls: dict[tuple, list] = defaultdict(lambda: [0, 0.0, 0])  # calls, seconds, bytes
        self._products, self._silu_experts = cpu_gemv.products, cpu_gemv.silu_experts

    def __enter__(self):
        cpu_gemv.products, cpu_gemv.silu_experts = self._timed, self._timed_experts
        return self

    def __exit__(self, *_):
        cpu_gemv.products, cpu_gemv.silu_experts = self._products, self._silu_experts

    def _timed(self, x, matrices, scales=None, group=0, combine=None):
        started = time.perf_counter()
        out = self._products(x, matrices, scales, group, combine)
        self._count((str(len(matrices)), stored_shape(matrices[0])), started, [*matrices, *(scales or [])])
        return out

    def _timed_experts(self, x, gate_up, down, combine):
        started = time.perf_counter()
        out = self._silu_experts(x, gate_up, down, combine)
        matrices = len(gate_up[0])
        shapes = (*stored_shape(gate_up[0][0]), *stored_shape(down[0][0]))
        self._count((f"{matrices}+{matrices} swiglu", shapes), started, [*gate_up[0], *gate_up[1], *down[0], *down[1]])
        return out

    def _count(self, key: tuple, started: float, tensors: list) -> None:
        if self.on:
            entry = self.calls[key]
            entry[0] += 1
            entry[1] += time.perf_counter() - started
            entry[2] += sum(t.numel() * t.element_size() for t in tensors)


def stored_shape(matrix: torch.Tensor) -> tuple[int, ...]:
    """The matrix's stored shape; int4 tiles [N/16, K/G, 64 + 8G] as the plain nibbles' [N, K/2]."""
    if matrix.dim() == 3:
        count, groups, _ = matrix.shape
        return TILE_ROWS * count, groups * tile_group(matrix) // 2
    return tuple(matrix.shape)


def profile(shape: str, quantize: str, tokens: int, ablate: int) -> dict:
    from transformers import AutoModelForCausalLM

    import moe_runtime

    torch.set_num_threads(THREADS)
    full_precision = quantize in FULL_PRECISION
    dtype = getattr(torch, FULL_PRECISION[quantize]) if full_precision else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(checkpoint_of(SHAPES[shape]), dtype=dtype).eval()
    formats = {"exact": False} if full_precision else {"quantize": quantize, "quantize_rest": quantize}
    moe_runtime.wrap(model, budget=1.0, device="cpu", **formats)
    ids = torch.randint(3, 50000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with KernelClock() as clock, torch.inference_mode():  # as time_generation runs
        decode_steps(model, ids, tokens)  # a warm-up pass
        steps = decode_steps(model, ids, tokens, clock)
    step_ms = 1e3 * sum(steps) / len(steps)
    rows = [
        {"matrices_per_call": m, "stored_shape": list(s), "calls_per_step": c / len(steps), "ms_per_step": 1e3 * t / len(steps), "gbps": b / t / 1e9}
        for (m, s), (c, t, b) in sorted(clock.calls.items())
    ]
    kernel_ms = sum(row["ms_per_step"] for row in rows)
    report = {"shape": shape, "quantize": quantize, "tokens": tokens, "step_ms": step_ms, "kernel_ms": kernel_ms, "other_ms": step_ms - kernel_ms, "kernels": rows}
    if ablate:
        report["ablation"] = ablation(model, ids, tokens, ablate)
    return report


def decode_steps(model, ids: torch.Tensor, tokens: int, clock: KernelClock | None = None) -> list[float]:
    """Seconds of each of `tokens` greedy steps through a fresh KV cache after prefilling `ids`
    (`clock`, if given, times the kernel calls of the steps, not the prefill's)."""
    from transformers import DynamicCache

    cache = {cache_keyword(model): DynamicCache(config=model.config)}  # named once: not inside the timed steps
    next_id = model(input_ids=ids, **cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
    if clock is not None:
        clock.on = True
    steps = []
    for _ in range(tokens):
        started = time.perf_counter()
        next_id = model(input_ids=next_id, **cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        steps.append(time.perf_counter() - started)
    return steps


FULL_PRECISION = {"bf16": "bfloat16", "fp16": "float16"}  # --quantize values that keep the model's weights
VARIANTS = (
    "as shipped", "transformers' attention", "transformers' norms and rotary", "no_grad, not inference_mode", "torch's router linear and SDPA",
    "exact: torch's ops throughout", "transformers' decoder layers",
)


def ablation(model, ids: torch.Tensor, tokens: int, rounds: int) -> list[dict]:
    """Best ms per step of the decode path as shipped and with one of its parts undone, the
    variants alternating for `rounds` rounds (the VM's speed drifts between minutes)."""
    best = dict.fromkeys(VARIANTS, float("inf"))
    for _ in range(rounds):
        for variant in VARIANTS:
            with undone(model, variant), torch.no_grad() if variant == VARIANTS[3] else torch.inference_mode():
                steps = decode_steps(model, ids, tokens)
            best[variant] = min(best[variant], 1e3 * sum(steps) / len(steps))
    return [{"variant": variant, "best_ms_per_step": ms, "vs_shipped": ms / best[VARIANTS[0]]} for variant, ms in best.items()]


@contextmanager
def undone(model, variant: str):
    """The wrapped model with one part of its decode path put back to torch's or transformers' own
    code (decode_attention.py's forward; native_norms.py's norms and the native rotary embedding;
    kernel_routers.py's routers and the native attention; those and, at full precision, the
    decode kernel's products of experts and dense layers)."""
    import moe_runtime
    from moe_runtime.decode_attention import _sdpa
    from moe_runtime.kernel_linears import KernelLinear

    runtime = moe_runtime.runtime_of(model)
    attention = runtime.decode_attention if variant == VARIANTS[1] else runtime.decode_layers if variant == VARIANTS[6] else []
    norms = runtime.native_norms if variant == VARIANTS[2] else []
    routers = runtime.kernel_routers if variant in VARIANTS[4:6] else []
    swapped = {"rotate": "family_rotate"} if variant == VARIANTS[2] else {"attend": _sdpa} if variant in VARIANTS[4:6] else {}
    linears = [module for module in model.modules() if isinstance(module, KernelLinear)] if variant == VARIANTS[5] else []
    exact = [(holder, holder.exact) for holder in [runtime, *runtime.native_norms, *linears]] if variant == VARIANTS[5] else []
    kept = [{name: getattr(layer, name) for name in swapped} for layer in runtime.decode_attention]
    for replaced in [*attention, *norms, *routers]:
        replaced.remove()
    for layer in runtime.decode_attention:
        for name, replacement in swapped.items():
            setattr(layer, name, getattr(layer, replacement) if isinstance(replacement, str) else replacement)
    for holder, _ in exact:  # the runtime's experts and the dense layers: torch's kernels at full precision
        holder.exact = True
    try:
        yield
    finally:
        for holder, was in exact:
            holder.exact = was
        for replaced in [*attention, *norms, *routers]:
            replaced.install()
        for layer, originals in zip(runtime.decode_attention, kept):
            for name, original in originals.items():
                setattr(layer, name, original)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="live-decode")
    parser.add_argument("--quantize", choices=("int8", "int4", *FULL_PRECISION), default="int8", help="bf16, fp16: full precision, exact=False")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--ablate", type=int, default=0, metavar="ROUNDS", help="also time the step with each decode-path part undone")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    if args.json:
        check_writable(args.json, "output")
    if not cpu_gemv.available():
        raise SystemExit("the CPU decode kernel is not built here (no C++ compiler?): nothing to profile")
    report = profile(args.shape, args.quantize, args.tokens, args.ablate)
    print(f"{args.shape}, {args.quantize} throughout{', exact=False' if args.quantize in FULL_PRECISION else ''}, {args.tokens} decode steps: {report['step_ms']:.2f} ms per step")
    print(f"{'matrices/call':>13}  {'stored [N, K]':<16}{'calls/step':>11}{'ms/step':>9}{'GB/s':>7}")
    for row in report["kernels"]:
        print(f"{row['matrices_per_call']:>13}  {str(row['stored_shape']):<16}{row['calls_per_step']:>11.1f}{row['ms_per_step']:>9.2f}{row['gbps']:>7.1f}")
    print(f"{'kernel calls':<29}{'':>11}{report['kernel_ms']:>9.2f}")
    print(f"{'everything else':<29}{'':>11}{report['other_ms']:>9.2f}")
    for row in report.get("ablation", []):
        print(f"{row['variant']:<40}{row['best_ms_per_step']:>9.2f} ms per step, {row['vs_shipped']:.3f}x")
    if args.json:
        write_text_atomically(args.json, json.dumps(report, indent=1))


if __name__ == "__main__":
    run_script(main)
