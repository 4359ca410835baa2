"""grouped_moe: the Triton kernels (interpreter on CPU, CUDA when present) against the reference."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.adapters import adapter_for
from moe_runtime.kernels import grouped_moe, grouped_moe_reference
from moe_runtime.kernels.grouped_moe import _launch, tile_table
from moe_runtime.tiny_models import tiny_model

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}  # relative to max |out|
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(tokens, experts, top_k, hidden, inter, *, seed=0, dtype=torch.float32, permuted=True, spare=2, routing=None):
    generator = torch.Generator().manual_seed(seed)
    slots = experts + spare
    x = torch.randn(tokens, hidden, generator=generator)
    gate_up = torch.randn(slots, 2 * inter, hidden, generator=generator) / hidden**0.5
    down = torch.randn(slots, hidden, inter, generator=generator) / inter**0.5
    table = torch.randperm(slots, generator=generator)[:experts] if permuted else torch.arange(experts)
    free = sorted(set(range(slots)) - set(table.tolist()))
    gate_up[free], down[free] = float("nan"), float("nan")  # free slots must never be read
    if routing is None:
        routing = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=generator)
    tensors = (x.to(dtype), gate_up.to(dtype), down.to(dtype), table.to(torch.int32), routing, weights)
    return tuple(t.to(DEVICE) for t in tensors)


CASES = [
    # (T, E, K, H, I, reason)
    (1, 8, 2, 64, 48, "decode: one token"),
    (3, 7, 1, 33, 97, "prime E, K = 1, odd H and I"),
    (16, 8, 6, 32, 64, "many experts per token"),
    (33, 64, 6, 48, 32, "T above a tile, E = 64 (DeepSeek-like)"),
    (3, 7, 7, 16, 24, "K = E: every expert on every token"),
    (2, 8, 2, 97, 33, "H larger than a tile, not a power of two"),
]


@pytest.mark.parametrize("tokens, experts, top_k, hidden, inter, reason", CASES, ids=[c[-1] for c in CASES])
def test_fp32_matches_the_reference(tokens, experts, top_k, hidden, inter, reason):
    args = _case(tokens, experts, top_k, hidden, inter)
    out = grouped_moe(*args, kernel="triton")
    want = grouped_moe_reference(*args)
    assert torch.isfinite(out).all(), "a NaN in a free slot leaked"
    assert (out - want).abs().max() <= TOLERANCE[torch.float32] * want.abs().max()


@pytest.mark.parametrize("path", ["pairs", "grouped"])
@pytest.mark.parametrize("tokens, experts, top_k, hidden, inter, reason", CASES, ids=[c[-1] for c in CASES])
def test_each_triton_path_matches_the_reference(tokens, experts, top_k, hidden, inter, reason, path):
    """The launcher picks a path by rows per expert; each must be right on every case regardless."""
    args = _case(tokens, experts, top_k, hidden, inter, seed=1)
    out, want = _launch(*args, path=path), grouped_moe_reference(*args)
    assert torch.isfinite(out).all(), "a NaN in a free slot leaked"
    assert (out - want).abs().max() <= TOLERANCE[torch.float32] * want.abs().max()


@pytest.mark.parametrize("seed", range(5))
def test_tile_table_covers_every_pair_once_with_one_slot_per_tile(seed):
    generator = torch.Generator().manual_seed(seed)
    slots_count, block = int(torch.randint(1, 12, (1,), generator=generator)), 4
    slots = torch.randint(0, slots_count, (int(torch.randint(1, 60, (1,), generator=generator)),), generator=generator, dtype=torch.int32)
    order, tile_slot, tile_start, tile_rows = tile_table(slots, slots_count, block)
    assert len(tile_rows) == len(slots) // block + min(slots_count, len(slots))
    seen = []
    for slot, start, rows in zip(tile_slot.tolist(), tile_start.tolist(), tile_rows.tolist()):
        assert 0 <= rows <= block
        members = order[start : start + rows].long()
        assert (slots[members] == slot).all()
        seen += members.tolist()
    assert sorted(seen) == list(range(len(slots)))


@pytest.mark.parametrize("path", ["pairs", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_within_their_tolerance(dtype, path):
    args = _case(5, 8, 2, 48, 40, dtype=dtype)
    out, want = _launch(*args, path=path), grouped_moe_reference(*args)
    assert out.dtype == dtype
    assert (out.float() - want.float()).abs().max() <= TOLERANCE[dtype] * want.float().abs().max()
    exact = grouped_moe_reference(*(a.float() if a.is_floating_point() else a for a in args))
    assert (out.float() - exact).abs().max() <= 3 * TOLERANCE[dtype] * exact.abs().max()


def test_all_tokens_on_one_expert_and_experts_without_tokens():
    routing = torch.zeros(9, 1, dtype=torch.long)  # every token to expert 0; experts 1..7 idle
    args = _case(9, 8, 1, 32, 32, routing=routing)
    assert torch.allclose(grouped_moe(*args, kernel="triton"), grouped_moe_reference(*args), rtol=1e-5, atol=1e-6)


def test_identity_slot_table_and_torch_kernel_agree():
    args = _case(4, 8, 2, 32, 32, permuted=False, spare=0)
    assert torch.allclose(grouped_moe(*args, kernel="triton"), grouped_moe(*args, kernel="torch"), rtol=1e-5, atol=1e-6)
    assert torch.equal(grouped_moe(*args, kernel="auto"), grouped_moe(*args, kernel="triton" if DEVICE == "cuda" else "torch"))


def test_deterministic_reduction_over_k():
    args = _case(6, 8, 4, 32, 48)
    assert torch.equal(grouped_moe(*args, kernel="triton"), grouped_moe(*args, kernel="triton"))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"])
def test_equals_the_transformers_experts_module(family):
    model = tiny_model(family)
    block = adapter_for(model).blocks(model)[0]
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, weights, index = block.router(x)
        want = block.experts(x, index, weights)
        table = torch.arange(block.num_experts, dtype=torch.int32)
        got = grouped_moe(x, block.experts.gate_up_proj, block.experts.down_proj, table, index, weights, kernel="triton")
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_clear_errors():
    x, gate_up, down, table, routing, weights = _case(2, 8, 2, 16, 16)
    missing = table.clone()
    missing[int(routing[0, 0])] = -1
    with pytest.raises(ValueError, match=f"routed expert\\(s\\) \\[{int(routing[0, 0])}\\] are not resident"):
        grouped_moe(x, gate_up, down, missing, routing, weights)
    with pytest.raises(ValueError, match="do not fit hidden size"):
        grouped_moe(x, gate_up[:, :, :8], down, table, routing, weights)
    with pytest.raises(ValueError, match="must share a dtype"):
        grouped_moe(x.half(), gate_up, down, table, routing, weights)
    with pytest.raises(ValueError, match="kernel must be one of"):
        grouped_moe(x, gate_up, down, table, routing, weights, kernel="cuda")
    with pytest.raises(ValueError, match="outside \\[0, 8\\)"):
        grouped_moe(x, gate_up, down, table, routing + 8, weights)


def test_runtime_runs_the_triton_path_and_says_so():
    import moe_runtime

    reference = tiny_model("qwen3_moe")
    model = moe_runtime.wrap(tiny_model("qwen3_moe"), budget=0.5, device=DEVICE, kernel="triton")
    ids = torch.randint(3, 300, (1, 5), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want = reference.to(DEVICE).generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False), want)
    stats = moe_runtime.stats(model)
    assert stats["compute_path"] == "triton" and stats["compute_calls"].get("triton", 0) > 0
    with pytest.raises(ValueError, match="plain SwiGLU experts; this family's experts need kernel='torch'"):
        moe_runtime.wrap(tiny_model("gpt_oss"), budget=0.5, device="cpu", kernel="triton")


def test_bandwidth_benchmark_runs_end_to_end_on_cpu(tmp_path):
    """The GPU benchmark script, on tiny shapes through the interpreter: every contender runs and agrees."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_bandwidth.py"
    out = tmp_path / "bandwidth.json"
    subprocess.run([sys.executable, str(script), "--smoke", "--tokens", "1,16", "--calls", "2", "--json", str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 4 and all(row[name] > 0 for row in rows for name in ("moe-runtime triton", "transformers grouped_mm", "transformers batched_mm"))
