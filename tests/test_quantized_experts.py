"""Quantized experts: the int8 and int4 formats, their CPU and Triton compute, and wrap /
from_pretrained holding, moving and computing them end to end for every family."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import moe_runtime
from moe_runtime.expert_format import (
    ExpertFormat, ExpertSpec, dequantize, expert_format, linear, pack_nibbles, pack_tiles, quantize_int4, quantize_int8, unpack_int4_cpu,
    unpack_nibbles, unpack_tiles,
)
from moe_runtime.kernels import QuantizedBank, cpu_gemv, grouped_moe
from moe_runtime.kernels.grouped_moe import _launch
from moe_runtime.tiny_models import TINY_FAMILIES, expert_fields, tiny_model

FORMATS = ("int8", "int4-g32", "int4")


def _wide(family: str, **extra):
    """A tiny model whose expert width (64) every int4 group size divides."""
    return tiny_model(family, **expert_fields(family, num_experts=8, intermediate_size=64, top_k=2), **extra)


def test_int8_round_trip_is_within_half_a_step_per_row():
    weight = torch.randn(96, 128) * torch.rand(96, 1) * 3
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (96,) and scale.dtype == torch.bfloat16
    error = (dequantize({"w.int8": q, "w.scale": scale}, "w", torch.float32) - weight).abs()
    assert (error <= scale.float()[:, None] * 0.5 + 1e-6).all()


@pytest.mark.parametrize("group", (32, 64, 128))
def test_int4_round_trip_is_within_half_a_step_per_group(group):
    weight = torch.randn(64, 256) + torch.linspace(-2, 2, 256)  # groups with offsets: zero points matter
    q, scales_zeros = quantize_int4(weight, group)
    assert q.max() <= 15 and scales_zeros.shape == (256 // group, 64, 2)
    packed = pack_nibbles(q)
    assert packed.shape == (64, 128) and torch.equal(unpack_nibbles(packed), q)
    restored = dequantize({"w.int4": packed, "w.scales_zeros": scales_zeros}, "w", torch.float32)
    step = scales_zeros[..., 0].float().t().repeat_interleave(group, dim=1)
    assert ((restored - weight).abs() <= step * 0.5 + 1e-2 * step + 1e-6).all()


@pytest.mark.parametrize("group", (64, 128))
def test_cpu_tiles_hold_the_same_nibbles_and_scales(group):
    """pack_tiles is a permutation of the plain nibbles and scales (read back exactly), tile by
    tile: a tile's first 64 bytes are its 16 rows' (s, z) of the first group, then 4 bytes of
    each row in turn."""
    weight = torch.randn(48, 256) + torch.linspace(-2, 2, 256)
    q, scales_zeros = quantize_int4(weight, group)
    tiles = pack_tiles(q, scales_zeros)
    assert tiles.shape == (3, 256 // group, 64 + 8 * group) and tiles.dtype == torch.uint8
    assert torch.equal(tiles[1, 0, :64], scales_zeros[0, 16:32].contiguous().view(torch.uint8).reshape(-1))
    assert torch.equal(tiles[1, 0, 64:68], pack_nibbles(q)[16, :4]) and torch.equal(tiles[1, 0, 68:72], pack_nibbles(q)[17, :4])
    back, back_scales = unpack_tiles(tiles)
    assert torch.equal(back, q) and torch.equal(back_scales, scales_zeros)
    plain = dequantize({"w.int4": pack_nibbles(q), "w.scales_zeros": scales_zeros}, "w", torch.float32)
    assert torch.equal(dequantize({"w.int4_tiles": tiles}, "w", torch.float32), plain)
    fmt = ExpertFormat("int4", group, cpu_tiles=True)
    assert fmt.specs({"w": (48, 256), "odd": (40, 256)}, torch.float32, False) == {  # 40 rows: not whole tiles, plain nibbles
        "w.int4_tiles": ((3, 256 // group, 64 + 8 * group), torch.uint8),
        "odd.int4": ((40, 128), torch.uint8), "odd.scales_zeros": ((256 // group, 40, 2), torch.bfloat16),
    }
    assert fmt.describe(fmt.specs({"w": (48, 256)}, torch.float32, False))["packing"] == "tiles"


def test_torch_cpu_tile_order_is_read_back_exactly():
    q = torch.randint(0, 16, (96, 128), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    assert torch.equal(unpack_int4_cpu(packed, 96, 128), q.to(torch.uint8))


@pytest.mark.parametrize("quantize", FORMATS)
@pytest.mark.parametrize("transposed", (False, True))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_linear_reads_each_format_as_its_dequantized_matrix(quantize, transposed, dtype):
    generator = torch.Generator().manual_seed(7)  # x's int8 copy moves outputs by up to ~3%: a fixed draw
    weight = torch.randn(128, 64, generator=generator) / 8  # [out, in]
    stored = weight.t().contiguous() if transposed else weight
    x = torch.randn(3, 64, generator=generator).to(dtype)
    for on_cpu in (True, False):
        spec = ExpertSpec({"down_proj": tuple(stored.shape)}, dtype, transposed, expert_format(quantize, on_cpu=on_cpu))
        tensors = spec.encode({"down_proj": stored.to(dtype)})
        assert {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()} == spec.specs
        want = F.linear(x.float(), dequantize(tensors, "down_proj", torch.float32))
        got = linear(x, tensors, "down_proj", transposed)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=0.03 * want.abs().max().item(), rtol=0)
        matrix = dequantize(tensors, "down_proj", dtype)
        assert torch.equal(spec.decode(tensors)["down_proj"], matrix.t() if transposed else matrix)  # the model's layout again


def test_bytes_per_expert_against_bf16_at_a_real_shape():
    shapes = {"gate_up_proj": (2816, 2048), "down_proj": (2048, 1408)}  # DeepSeek-V2-Lite's experts
    full = ExpertSpec(shapes, torch.bfloat16).nbytes
    int8 = ExpertSpec(shapes, torch.bfloat16, format=ExpertFormat("int8")).nbytes
    int4 = ExpertSpec(shapes, torch.bfloat16, format=ExpertFormat("int4", 64, cpu_packing=True)).nbytes
    assert int8 / full <= 0.53 and int4 / full <= 0.30


def test_bad_formats_and_shapes_are_refused_by_name():
    with pytest.raises(ValueError, match="quantize must be one of"):
        moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, quantize="int3")
    model = tiny_model("olmoe")  # expert width 48: no int4 group of 64 divides it
    with pytest.raises(ValueError, match="int4 experts need input features divisible by the group size 64.*quantize='int8'"):
        moe_runtime.wrap(model, budget=0.5, quantize="int4")
    assert not hasattr(model, "_moe_runtime") and not any(p.is_meta for p in model.parameters())  # left whole
    with pytest.raises(ValueError, match="quantize='int8' needs store_dir"):
        moe_runtime.from_pretrained("unused", budget=0.5, quantize="int8")


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("quantize", FORMATS)
def test_wrapped_quantized_model_computes_its_dequantized_weights(family, quantize):
    """What the runtime computes from packed bytes equals the plain model holding the
    dequantized weights (which unwrap gives back), at a budget that forces loads."""
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    model = moe_runtime.wrap(_wide(family).eval(), budget=0.3, quantize=quantize)
    with torch.no_grad():
        quantized = model(ids).logits
    stats = moe_runtime.stats(model)
    assert stats["expert_format"] == ExpertFormat(*((quantize.split("-g")[0], int(quantize.split("-g")[1])) if "-g" in quantize else (quantize,))).name
    assert stats["misses"] > 0 and stats["bytes_per_expert"] < 0.55 * _full_expert_bytes(model)
    assert all(p.is_meta for block in moe_runtime.runtime.assembly.runtime_of(model).blocks for p in block.experts.parameters())
    moe_runtime.unwrap(model)
    with torch.no_grad():
        dequantized = model(ids).logits
    torch.testing.assert_close(quantized, dequantized, atol=0.02 * dequantized.abs().max().item(), rtol=0)


def _full_expert_bytes(model) -> int:
    block = moe_runtime.runtime.assembly.runtime_of(model).blocks[0]
    return ExpertSpec(block.expert_shapes(), torch.float32).nbytes


def test_triton_kernels_dequantize_int8_and_int4_tiles_like_the_reference():
    generator = torch.Generator().manual_seed(0)
    slots, hidden, inter, experts, top_k, tokens = 5, 128, 64, 4, 2, 7
    gate_up, down = torch.randn(slots, 2 * inter, hidden, generator=generator), torch.randn(slots, hidden, inter, generator=generator)
    x = torch.randn(tokens, hidden, generator=generator)
    routing = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=generator)
    table = torch.tensor([3, 0, 4, 1], dtype=torch.int32)
    for scheme in ("int8", "int4"):
        banks = [_bank(w, scheme) for w in (gate_up, down)]
        for dtype in (torch.float32, torch.bfloat16):
            want = grouped_moe(x.to(dtype), *banks, table, routing, weights, kernel="torch").float()
            for path in ("pairs", "grouped"):
                got = _launch(x.to(dtype), *banks, table, routing, weights, path).float()
                torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=0)


def _bank(weights: torch.Tensor, scheme: str) -> QuantizedBank:
    if scheme == "int8":
        pairs = [quantize_int8(w) for w in weights]
        return QuantizedBank(torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs]))
    pairs = [quantize_int4(w, 32) for w in weights]
    return QuantizedBank(torch.stack([pack_nibbles(q) for q, _ in pairs]), torch.stack([s for _, s in pairs]))


@pytest.mark.parametrize("quantize", ("int8", "int4"))
def test_runtime_runs_quantized_experts_through_the_triton_kernels(quantize):
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(2))
    loop = moe_runtime.wrap(_wide("qwen3_moe").eval(), budget=0.5, quantize=quantize, device="cpu", execution="device", kernel="torch")
    triton = moe_runtime.wrap(_wide("qwen3_moe").eval(), budget=0.5, quantize=quantize, device="cpu", execution="device", kernel="triton")
    with torch.no_grad():
        want, got = loop(ids).logits, triton(ids).logits
    stats = moe_runtime.stats(triton)
    assert stats["compute_calls"].get("triton", 0) > 0 and stats["expert_format"].startswith(quantize)
    torch.testing.assert_close(got, want, atol=0.02 * want.abs().max().item(), rtol=0)


def test_from_pretrained_writes_reads_and_counts_quantized_bytes(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    _wide("mixtral").save_pretrained(checkpoint)
    store = tmp_path / "store"
    model = moe_runtime.from_pretrained(checkpoint, budget=0.25, host_budget=0, store_dir=store, quantize="int4")
    manifest = json.loads((store / "manifest.json").read_text())["description"]
    assert manifest["format"]["scheme"] == "int4" and manifest["format"]["group"] == 64
    assert manifest["format"]["packing"] == expert_format("int4", on_cpu=True).describe({})["packing"]  # computed on this CPU
    assert manifest["format"]["packing"] == "tiles" or not cpu_gemv.reads_tiles()
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids)
    stats = moe_runtime.stats(model)
    assert stats["bytes_loaded"] == stats["loads"] * stats["bytes_per_expert"] > 0  # read from disk: quantized bytes moved
    written = (store / "manifest.json").stat().st_mtime_ns
    moe_runtime.unwrap(model)
    again = moe_runtime.from_pretrained(checkpoint, budget=0.25, host_budget=0, store_dir=store, quantize="int4")
    assert (store / "manifest.json").stat().st_mtime_ns == written  # the same format: reused
    moe_runtime.unwrap(again)
    other = moe_runtime.from_pretrained(checkpoint, budget=0.25, host_budget=0, store_dir=store, quantize="int8")
    assert json.loads((store / "manifest.json").read_text())["description"]["format"]["scheme"] == "int8"  # rebuilt
    with torch.no_grad():
        other(ids)
    moe_runtime.unwrap(other)


def test_save_pretrained_of_a_quantized_model_writes_its_dequantized_weights(tmp_path):
    model = moe_runtime.wrap(_wide("olmoe").eval(), budget=0.5, quantize="int8")
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "saved")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, want, atol=0.02 * want.abs().max().item(), rtol=0)


@pytest.mark.parametrize("family", ("olmoe", "qwen2_moe", "deepseek_v2"))
def test_quantize_rest_computes_the_dense_layers_from_int8_and_gives_them_back(family, tmp_path):
    from moe_runtime.kernel_linears import KernelLinear

    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(6))
    model = moe_runtime.wrap(_wide(family, tie_word_embeddings=True).eval(), budget=0.5, quantize="int8", quantize_rest="int8")
    runtime = moe_runtime.runtime.assembly.runtime_of(model)
    quantized = [m for m in model.modules() if isinstance(m, KernelLinear)]
    assert len(quantized) == moe_runtime.stats(model)["kernel_linears"] > 0
    assert not any(isinstance(m, KernelLinear) for block in runtime.blocks for m in block.router.modules())  # routing untouched
    with torch.no_grad():
        got = model(ids).logits
    model.save_pretrained(tmp_path / "saved")
    moe_runtime.unwrap(model)
    assert not any(isinstance(m, KernelLinear) for m in model.modules())
    assert model.lm_head.weight is model.get_input_embeddings().weight  # a tied head is given back tied
    with torch.no_grad():
        want = model(ids).logits  # the dequantized weights
    torch.testing.assert_close(got, want, atol=0.03 * want.abs().max().item(), rtol=0)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()(ids).logits
    torch.testing.assert_close(saved, want, atol=0.03 * want.abs().max().item(), rtol=0)


def test_quantize_rest_is_refused_by_name_when_unknown():
    with pytest.raises(ValueError, match="quantize_rest must be one of"):
        moe_runtime.wrap(tiny_model("olmoe"), budget=0.5, quantize_rest="fp8")


def test_miss_precision_serves_every_miss_from_its_low_bit_copy_and_admits_the_full_one(tmp_path):
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(7))
    reference = _wide("qwen3_moe").eval()
    with torch.no_grad():
        want = reference(ids).logits
    reference.save_pretrained(tmp_path / "checkpoint")
    model = moe_runtime.from_pretrained(tmp_path / "checkpoint", budget=0.3, host_budget=0, store_dir=tmp_path / "store", miss_precision="int4")
    with torch.no_grad():
        got = model(ids).logits
        model.generate(ids, max_new_tokens=8, do_sample=False)
    stats = moe_runtime.stats(model)
    assert stats["miss_precision"] == "int4-g64" and stats["expert_format"] == "none"  # resident experts keep full precision
    assert stats["host_computes"] == stats["misses"] > 0  # no miss waited for a load
    assert stats["loads"] == stats["admissions"] > 0  # every load is a background upgrade
    assert stats["bytes_loaded"] == stats["loads"] * stats["bytes_per_expert"]
    torch.testing.assert_close(got, want, atol=0.02 * want.abs().max().item(), rtol=0)
    moe_runtime.unwrap(model)
    with pytest.raises(ValueError, match="miss_precision decides where misses are computed"):
        moe_runtime.wrap(_wide("qwen3_moe"), budget=0.3, miss_precision="int8", execution="hybrid")


def test_unwrap_refuses_to_read_back_more_experts_than_ram_holds_and_changes_nothing(tmp_path, monkeypatch):
    import collections

    import moe_runtime.runtime.executor as runtime_module

    _wide("olmoe").save_pretrained(tmp_path / "checkpoint")
    model = moe_runtime.from_pretrained(tmp_path / "checkpoint", budget=0.5, store_dir=tmp_path / "store", quantize="int8")
    ids = torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(8))
    real = runtime_module.psutil.virtual_memory
    monkeypatch.setattr(runtime_module.psutil, "virtual_memory", lambda: collections.namedtuple("Memory", "available")(1024))
    with pytest.raises(MemoryError, match="unwrap reads every expert back into RAM .*del model"):
        moe_runtime.unwrap(model)
    with torch.no_grad():
        model(ids)  # still wrapped and running
    monkeypatch.setattr(runtime_module.psutil, "virtual_memory", real)
    moe_runtime.unwrap(model)
    assert not any(p.is_meta for p in model.parameters())
