"""The CPU decode kernel (kernels/cpu_gemv.cpp): every format against its dequantized matrix at
shapes with tails, shared and per-matrix rows, refused input, a decode step's experts in one
call against the expert-by-expert path, the opt-out, and a build that a killed one cannot block."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from moe_runtime.compute import experts_in_one_call, one_expert
from moe_runtime.expert_format import dequantize, expert_format, linear_many, pack_nibbles, pack_tiles, quantize_int4, quantize_int8, tiles_fit
from moe_runtime.adapters import ExpertLayout
from moe_runtime.kernels import cpu_gemv
from moe_runtime.kernels.cpu_build import build_folder_of

QBLOCK = 64  # inputs per scale of x's int8 copy (cpu_gemv.cpp)
needs_kernel = pytest.mark.skipif(not cpu_gemv.available(), reason="the CPU decode kernel cannot be built here (no C++ compiler)")


def test_the_kernel_builds_where_a_compiler_is():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert cpu_gemv.available()


def _encode(fmt: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int, dict]:
    """(matrix, scales, group, tensors for dequantize) of an [N, K] weight in `fmt`."""
    if fmt == "int8":
        q, scale = quantize_int8(weight)
        return q, scale, 0, {"w.int8": q, "w.scale": scale}
    if "int4" in fmt:
        group = int(fmt.split("-g")[1])
        q, scales_zeros = quantize_int4(weight, group)
        if fmt.startswith("tiles"):
            tiles = pack_tiles(q, scales_zeros)
            return tiles, None, group, {"w.int4_tiles": tiles}
        packed = pack_nibbles(q)
        return packed, scales_zeros, group, {"w.int4": packed, "w.scales_zeros": scales_zeros}
    dtype = getattr(torch, fmt)
    return weight.to(dtype), None, 0, {"w": weight.to(dtype)}


def _x_rounding_bound(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """[A, R, N]: how far x's int8 copy (64-input blocks, max|x|/127 each) can move each output:
    half a step per input times |w|."""
    a, r, k = x.shape
    step = x.reshape(a, r, k // QBLOCK, QBLOCK).abs().amax(-1) / 127  # [A, R, K/64]
    half = (step / 2).repeat_interleave(QBLOCK, dim=-1)  # [A, R, K]
    return half @ matrix.abs().t()


# [N, K]: tails of rows, of 128-input pairs, of 64-input blocks; 48 x 320: three tiles, five blocks
SHAPES = ((37, 192), (16, 1408), (21, 2880), (5, 100), (48, 320))
FORMATS = ("float32", "float16", "bfloat16", "int8", "int4-g32", "int4-g64", "int4-g128", "tiles-int4-g64", "tiles-int4-g128")


def _fits(fmt: str, n: int, k: int) -> bool:
    if "int4" not in fmt:
        return True
    group = int(fmt.split("-g")[1])
    return tiles_fit(n, k, group) if fmt.startswith("tiles") else k % group == 0


CASES = [(fmt, shape) for fmt in FORMATS for shape in SHAPES if _fits(fmt, *shape)]


@needs_kernel
@pytest.mark.parametrize("fmt, shape", CASES)
@pytest.mark.parametrize("shared", (True, False))
def test_products_equal_the_dequantized_matrices(fmt, shape, shared):
    if fmt.startswith("tiles") and not cpu_gemv.reads_tiles():
        pytest.skip("int4 tiles are computed by AVX-512 builds only")
    n, k = shape
    torch.manual_seed(n + k)
    weights = [torch.randn(n, k) * torch.rand(n, 1) for _ in range(3)]
    x = torch.randn(1 if shared else 3, 2, k) + torch.linspace(-1, 1, k)  # 2 rows each
    encoded = [_encode(fmt, w) for w in weights]
    matrices = [e[0] for e in encoded]
    scales = [e[1] for e in encoded] if encoded[0][1] is not None else None
    got = cpu_gemv.products(x, matrices, scales, encoded[0][2])
    assert got.shape == (3, 2, n) and got.dtype == torch.float32
    for m, (_, _, _, tensors) in enumerate(encoded):
        matrix = tensors["w"].float() if "w" in tensors else dequantize(tensors, "w", torch.float32)
        rows = x[0 if shared else m]
        want = rows @ matrix.t()
        tolerance = 1e-4 * (rows.abs() @ matrix.abs().t()) + 1e-5
        quantized_x = fmt.endswith(("int8", "int4-g64", "int4-g128")) and k % QBLOCK == 0  # the integer path (AVX512-VNNI)
        if quantized_x and cpu_gemv.extension().uses_avx512():
            tolerance = tolerance + _x_rounding_bound(rows[None], matrix)[0]
        assert ((got[m] - want).abs() <= tolerance).all(), f"matrix {m}: worst {(got[m] - want).abs().max():.3g}"


@needs_kernel
def test_mismatched_matrices_and_rows_are_refused():
    x = torch.randn(1, 1, 64)
    with pytest.raises(RuntimeError, match="matrix 1 is not a contiguous CPU"):
        cpu_gemv.products(x, [torch.randn(8, 64), torch.randn(9, 64)])
    with pytest.raises(RuntimeError, match="holds 2 blocks of rows for 3 matrices"):
        cpu_gemv.products(torch.randn(2, 1, 64), [torch.randn(8, 64)] * 3)
    q, _ = quantize_int8(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="needs its bf16 scales"):
        cpu_gemv.products(x, [q], [torch.ones(7, dtype=torch.bfloat16)])
    if cpu_gemv.reads_tiles():  # tiles of another group than the call's
        tiles = pack_tiles(*quantize_int4(torch.randn(16, 128), 64))
        with pytest.raises(RuntimeError, match=r"matrix 0 is not a contiguous CPU \[1, 1, 1088\] tensor"):
            cpu_gemv.products(torch.randn(1, 1, 128), [tiles], [], 128)


@needs_kernel
@pytest.mark.parametrize("fmt", ("bfloat16", "int8", "int4-g64"))
def test_rows_in_the_models_dtype_and_a_weighted_sum_of_the_products(fmt):
    """bf16 rows give bf16 products (those of the same rows in fp32, rounded once); `combine`
    sums the products weighted, in fp32; a weight per matrix is required."""
    torch.manual_seed(3)
    encoded = [_encode(fmt, torch.randn(48, 256)) for _ in range(4)]
    matrices, group = [e[0] for e in encoded], encoded[0][2]
    scales = [e[1] for e in encoded] if encoded[0][1] is not None else None
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    apart = cpu_gemv.products(x.float(), matrices, scales, group)
    got = cpu_gemv.products(x, matrices, scales, group)
    assert got.dtype == torch.bfloat16 and torch.equal(got, apart.to(torch.bfloat16))
    weights = torch.rand(4)
    summed = cpu_gemv.products(x.float(), matrices, scales, group, combine=weights)
    assert summed.shape == (1, 1, 48)
    torch.testing.assert_close(summed, (apart * weights[:, None, None]).sum(0, keepdim=True), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="combine needs one weight per matrix"):
        cpu_gemv.products(x, matrices, scales, group, combine=torch.rand(3))


@needs_kernel
@pytest.mark.parametrize("quantize", ("int8", "int4"))
@pytest.mark.parametrize("has_bias", (False, True))
def test_a_decode_steps_experts_in_one_call_match_expert_by_expert(quantize, has_bias):
    hidden, inner = 128, 64
    layout = ExpertLayout(is_transposed=False, is_concatenated=True, has_bias=has_bias, has_gate=True)
    fmt = expert_format(quantize, on_cpu=True)
    assert not fmt.cpu_packing and fmt.cpu_tiles == (quantize == "int4" and cpu_gemv.reads_tiles())  # what the kernel reads
    torch.manual_seed(0)
    biases = {"gate_up_proj_bias": torch.randn(2 * inner) / 8, "down_proj_bias": torch.randn(hidden) / 8} if has_bias else {}
    experts = [
        fmt.encode({"gate_up_proj": torch.randn(2 * inner, hidden) / 8, "down_proj": torch.randn(hidden, inner) / 8, **biases}, False)
        for _ in range(4)
    ]

    def gate(h: torch.Tensor) -> torch.Tensor:
        g, u = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u

    x = torch.randn(1, hidden)
    weights = torch.rand(4)
    together = experts_in_one_call(x, experts, layout, gate, weights)
    apart = (torch.cat([one_expert(x, tensors, layout, gate) for tensors in experts]) * weights[:, None]).sum(0, keepdim=True)
    assert together.shape == (1, hidden)
    torch.testing.assert_close(together, apart, atol=0.03 * apart.abs().max().item(), rtol=0)
    assert linear_many(x[None], experts, "gate_up_proj").shape == (4, 1, 2 * inner)


@needs_kernel
@pytest.mark.parametrize("fmt", ("float32", "bfloat16", "int8", "int4-g32"))
def test_swiglu_experts_in_one_call_equal_their_products_with_the_gate_between(fmt):
    """silu_experts: the same products as `products` gives, the gate and the weighted sum in
    fp32 between and after them (bf16 rows: only the final result is rounded); a count of
    down matrices other than gate_up's, or an odd gate_up width, is refused."""
    torch.manual_seed(4)
    hidden, inner, count = 128, 96, 3
    gate_up = [_encode(fmt, torch.randn(2 * inner, hidden) / 8) for _ in range(count)]
    down = [_encode(fmt, torch.randn(hidden, inner) / 8) for _ in range(count)]
    operands = [([e[0] for e in encoded], [e[1] for e in encoded] if encoded[0][1] is not None else [], encoded[0][2]) for encoded in (gate_up, down)]
    x = torch.randn(1, 1, hidden)
    weights = torch.rand(count)
    h = cpu_gemv.products(x, *operands[0])  # [M, 1, 2I] fp32
    gated = torch.nn.functional.silu(h[..., :inner]) * h[..., inner:]
    want = cpu_gemv.products(gated, *operands[1], combine=weights)
    got = cpu_gemv.silu_experts(x, operands[0], operands[1], weights)
    assert got.shape == (1, 1, hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    rounded = cpu_gemv.silu_experts(x.bfloat16(), operands[0], operands[1], weights)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, cpu_gemv.silu_experts(x.bfloat16().float(), operands[0], operands[1], weights).bfloat16())
    with pytest.raises(RuntimeError, match="as many down as gate_up"):
        cpu_gemv.silu_experts(x, operands[0], (operands[1][0][:2], operands[1][1][:2], operands[1][2]), weights)
    odd = [_encode("float32", torch.randn(2 * inner + 1, hidden))[0] for _ in range(count)]
    with pytest.raises(RuntimeError, match="width 193 is odd"):
        cpu_gemv.silu_experts(x, (odd, [], 0), operands[1], weights)


def _run(code: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout)


def test_opting_out_keeps_torchs_kernels_and_their_int4_order():
    env = {**os.environ, cpu_gemv.OPT_OUT: "torch"}
    done = _run(
        """
        from moe_runtime.expert_format import expert_format, int4_cpu_kernel_available
        from moe_runtime.kernels import cpu_decode_ops, cpu_gemv
        print(cpu_gemv.available(), cpu_decode_ops.available(), expert_format("int4", on_cpu=True).cpu_packing == int4_cpu_kernel_available())
        """,
        env,
        120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False", "True"]


def test_a_change_to_a_source_compiled_in_is_a_new_build(tmp_path, monkeypatch):
    """cpu_decode.cpp compiles cpu_gemv.cpp, cpu_decode_ops.cpp and cpu_decode_layer.cpp in: its
    build folder is keyed on all of them, so an edit to any never reuses a stale module."""
    monkeypatch.setenv("MOE_RUNTIME_CACHE", str(tmp_path / "cache"))
    inner, outer = tmp_path / "inner.cpp", tmp_path / "outer.cpp"
    inner.write_text("int inner() { return 1; }\n")
    outer.write_text('#include <vector>\n#include "inner.cpp"\nint outer() { return inner(); }\n')
    before = build_folder_of(outer)
    inner.write_text("int inner() { return 2; }\n")
    assert build_folder_of(outer) != before
    assert build_folder_of(outer) == build_folder_of(outer)


@needs_kernel
def test_a_lock_left_by_a_killed_build_does_not_block_the_next(tmp_path):
    """torch's build lock is a file: a build killed midway leaves it, and torch alone would wait
    on it forever. Our flock proves it stale; the built module is reused (copied, mtimes kept)."""
    cache = tmp_path / "cache"
    env = {**os.environ, "MOE_RUNTIME_CACHE": str(cache)}
    folder = _run("from moe_runtime.kernels import cpu_gemv; print(cpu_gemv.build_folder())", env, 120).stdout.strip()
    shutil.copytree(cpu_gemv.build_folder(), folder)
    (cache / "cpu-kernel" / os.path.basename(folder) / "lock").touch()
    done = _run("from moe_runtime.kernels import cpu_gemv; print(cpu_gemv.available())", env, 240)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]


def test_scoring_one_token_at_a_time_takes_the_decode_path_and_keeps_quality():
    """The trained embedded model on a held-out piece: scoring token by token through the KV
    cache gives the window's perplexity, and int8 / int4 experts computed by the decode kernel
    stay within the quantized-experts targets (+0.5% / +3%) of it."""
    from transformers import AutoTokenizer

    from moe_runtime.embedded import embedded_model_dir, heldout_pieces
    from moe_runtime.evaluation import evaluate_checkpoint

    model_dir = embedded_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = tokenizer(heldout_pieces("manual")[0], add_special_tokens=False)["input_ids"][:128]
    window = evaluate_checkpoint(model_dir, ids, reference=False).perplexity
    stepwise = evaluate_checkpoint(model_dir, ids, reference=False, one_at_a_time=True).perplexity
    assert abs(stepwise / window - 1) < 0.01
    for quantize, limit in (("int8", 0.005), ("int4", 0.03)):
        quantized = evaluate_checkpoint(model_dir, ids, reference=False, quantize=quantize, budget=0.5, one_at_a_time=True).perplexity
        assert quantized / stepwise - 1 < limit, f"{quantize}: perplexity {quantized:.3f} against {stepwise:.3f}"
