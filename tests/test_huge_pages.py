"""Weights moved into memory backed by huge pages (huge_pages.py): the same values, in one
arena that lives as long as they do, each with a storage of its own (safetensors saves them);
the kernel linears and the experts of a model on a CPU moved with outputs unchanged, a tied
output head left shared, and nothing moved where the platform cannot or the user opts out."""

from __future__ import annotations

import gc
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import moe_runtime
from moe_runtime import huge_pages
from moe_runtime.kernel_linears import KernelLinear
from moe_runtime.kernels import cpu_gemv
from moe_runtime.tiny_models import expert_fields, tiny_model

from decoding import greedy_logits  # tests/decoding.py

needs_huge_pages = pytest.mark.skipif(not huge_pages.available(), reason="no transparent huge pages here (not Linux, or THP `never`)")
PROMPT = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(7))


@needs_huge_pages
def test_copies_hold_the_same_values_aligned_in_one_arena_that_outlives_its_creator():
    originals = [torch.randn(3, 5).bfloat16(), torch.arange(7, dtype=torch.int8), torch.randn(1000, 33)]
    gc.collect()  # earlier tests' arenas
    arenas = len(huge_pages._LIVE)
    copies = huge_pages.moved(originals)
    gc.collect()
    assert len(huge_pages._LIVE) == arenas + 1
    for original, copy in zip(originals, copies):
        assert torch.equal(original, copy) and copy.dtype == original.dtype and copy.is_contiguous()
        assert copy.data_ptr() % huge_pages.ALIGN == 0 and copy.data_ptr() != original.data_ptr()
    assert [copy.data_ptr() - copies[0].data_ptr() for copy in copies] == [0, 64, 64 + 64]  # one mapping, in order
    assert [copy.untyped_storage().nbytes() for copy in copies] == [30, 7, 132000]  # a storage each, no more
    assert copies[0].data_ptr() % huge_pages.PAGE == 0  # the arena starts on a huge page
    assert huge_pages.arena_bytes(copies + originals) == advised_bytes(copies) == 30 + 7 + 132000
    copies[2].mul_(2)
    assert torch.equal(copies[2], originals[2] * 2) and torch.equal(copies[0], originals[0])
    del copies, copy
    gc.collect()
    assert len(huge_pages._LIVE) == arenas  # unmapped with its last tensor, and no longer counted


@needs_huge_pages
def test_an_arena_refuses_more_than_it_holds():
    arena = huge_pages.Arena(128)
    arena.copy_of(torch.zeros(16))
    with pytest.raises(ValueError, match="bytes left"):
        arena.copy_of(torch.zeros(32))


@needs_huge_pages
@pytest.mark.parametrize("formats", [{"quantize": "int4-g32", "quantize_rest": "int4-g32"}, {"exact": False}], ids=["int4", "exact-false"])
def test_the_kernel_linears_move_and_decode_the_same(formats, monkeypatch):
    if not cpu_gemv.available():
        pytest.skip("the CPU decode kernel is not built here")

    def model():
        return tiny_model("qwen3_moe", **expert_fields("qwen3_moe", num_experts=8, intermediate_size=64, top_k=2)).to(torch.bfloat16)

    moved = moe_runtime.wrap(model(), budget=1.0, device="cpu", **formats)
    weights = kernel_weights(moved) + expert_weights(moved)
    assert moe_runtime.stats(moved)["huge_page_bytes"] == huge_pages.arena_bytes(weights) == advised_bytes(weights) == nbytes(weights)
    monkeypatch.setenv(huge_pages.OPT_OUT, "0")
    kept = moe_runtime.wrap(model(), budget=1.0, device="cpu", **formats)
    assert kernel_weights(kept) and moe_runtime.stats(kept)["huge_page_bytes"] == huge_pages.arena_bytes(kernel_weights(kept) + expert_weights(kept)) == 0
    assert torch.equal(greedy_logits(moved, PROMPT), greedy_logits(kept, PROMPT))


@needs_huge_pages
def test_a_wrapped_models_experts_move_and_save_as_they_were(tmp_path, monkeypatch):
    """At full precision the experts are the model's own parameters: moved, they decode as the
    unmoved ones do, and after unwrap the model is the one it was, save_pretrained included (no
    storage shared)."""
    reference = greedy_logits(tiny_model("olmoe").to(torch.bfloat16), PROMPT)
    model = moe_runtime.wrap(tiny_model("olmoe").to(torch.bfloat16), budget=0.5, device="cpu")
    experts = expert_weights(model)
    assert advised_bytes(experts) == nbytes(experts) == moe_runtime.stats(model)["huge_page_bytes"] > 0
    got = greedy_logits(model, PROMPT)
    monkeypatch.setenv(huge_pages.OPT_OUT, "0")
    kept = moe_runtime.wrap(tiny_model("olmoe").to(torch.bfloat16), budget=0.5, device="cpu")
    assert huge_pages.arena_bytes(expert_weights(kept)) == 0 and torch.equal(greedy_logits(kept, PROMPT), got)
    moe_runtime.unwrap(model)
    assert torch.equal(greedy_logits(model, PROMPT), reference)
    model.save_pretrained(tmp_path)
    saved = type(model).from_pretrained(tmp_path, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(saved[name], tensor) for name, tensor in model.state_dict().items())


@needs_huge_pages
def test_a_tied_output_head_stays_shared_with_the_embedding():
    model = tiny_model("qwen3_moe", tie_word_embeddings=True).to(torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    moe_runtime.wrap(model, budget=1.0, device="cpu", exact=False)
    assert isinstance(model.lm_head, KernelLinear)
    assert model.lm_head.tensors["weight"].data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_no_memory_for_the_arena_leaves_the_weights_where_they_are(monkeypatch):
    """An injected failure to map the arena: wrap still succeeds, warns, and nothing moved."""
    if not cpu_gemv.available():
        pytest.skip("the CPU decode kernel is not built here")

    def no_memory(nbytes):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(huge_pages, "Arena", no_memory)
    monkeypatch.setattr(huge_pages, "available", lambda: True)
    with pytest.warns(RuntimeWarning, match="stay in 4 KB pages"):
        model = moe_runtime.wrap(tiny_model("olmoe").to(torch.bfloat16), budget=1.0, device="cpu", quantize="int8", quantize_rest="int8")
    assert kernel_weights(model) and moe_runtime.stats(model)["huge_page_bytes"] == 0
    assert greedy_logits(model, PROMPT).isfinite().all()


@needs_huge_pages
def test_too_little_memory_available_keeps_every_weight_where_it_is(monkeypatch):
    """An injected shortage (1 GiB available of 8): no copy is made that would leave less than
    the headroom (1 GiB), quantized copies still go into huge pages (made there, not copied), and
    wrap succeeds with a warning."""
    if not cpu_gemv.available():
        pytest.skip("the CPU decode kernel is not built here")
    monkeypatch.setattr(huge_pages.psutil, "virtual_memory", lambda: SimpleNamespace(total=8 << 30, available=1 << 30))
    with pytest.warns(RuntimeWarning, match="would leave less than 1.0 GiB of the 1.0 available"):
        model = moe_runtime.wrap(tiny_model("olmoe").to(torch.bfloat16), budget=1.0, device="cpu", exact=False)
    assert kernel_weights(model) and huge_pages.arena_bytes(kernel_weights(model) + expert_weights(model)) == 0
    with pytest.warns(RuntimeWarning, match="would leave less"):
        quantized = moe_runtime.wrap(tiny_model("olmoe").to(torch.bfloat16), budget=1.0, device="cpu", quantize="int8", quantize_rest="int8")
    assert huge_pages.arena_bytes(kernel_weights(quantized)) == 0
    assert huge_pages.arena_bytes(expert_weights(quantized)) == nbytes(expert_weights(quantized)) > 0


def advised_bytes(tensors: list[torch.Tensor]) -> int:
    """How many bytes of `tensors` lie in mappings advised MADV_HUGEPAGE, as the kernel says
    (VmFlags `hg` in /proc/self/smaps): the arenas, and whatever else was so advised (numpy
    advises its large arrays and malloc reuses that memory, so a tensor we did not move may
    count too: the tests only ask it about tensors that were moved)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    advised, start, end = [], 0, 0
    for line in lines:
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):  # a mapping's address range
            start, end = (int(address, 16) for address in head.split("-"))
        elif head == "VmFlags:" and "hg" in line.split()[1:]:
            advised.append((start, end))
    return sum(t.numel() * t.element_size() for t in tensors if any(s <= t.data_ptr() < e for s, e in advised))


def kernel_weights(model) -> list[torch.Tensor]:
    """The tensors of every KernelLinear of `model`."""
    return [tensor for module in model.modules() if isinstance(module, KernelLinear) for tensor in module.tensors.values()]


def expert_weights(model) -> list[torch.Tensor]:
    """The tensors the wrapped `model`'s runtime holds its experts in."""
    return moe_runtime.runtime_of(model).source.ram_tensors()


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
