"""Weights moved into memory backed by huge pages (huge_pages.py): the same values, views of
one arena that lives as long as they do, the kernel linears' outputs unchanged, a tied output
head left shared, and nothing moved where the platform cannot or the user opts out."""

from __future__ import annotations

import gc

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
    copies = huge_pages.moved(originals)
    gc.collect()
    for original, copy in zip(originals, copies):
        assert torch.equal(original, copy) and copy.dtype == original.dtype and copy.is_contiguous()
        assert copy.data_ptr() % huge_pages.ALIGN == 0 and copy.data_ptr() != original.data_ptr()
    base = copies[0].untyped_storage().data_ptr()
    assert all(copy.untyped_storage().data_ptr() == base for copy in copies)  # one mapping
    assert copies[0].data_ptr() % huge_pages.PAGE == 0  # the arena starts on a huge page
    copies[2].mul_(2)
    assert torch.equal(copies[2], originals[2] * 2) and torch.equal(copies[0], originals[0])


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
    linears = [module for module in moved.modules() if isinstance(module, KernelLinear)]
    storages = {tensor.untyped_storage().data_ptr() for module in linears for tensor in module.tensors.values()}
    assert linears and len(storages) == 1  # every weight (and scale) in one arena
    assert moe_runtime.stats(moved)["huge_page_bytes"] == sum(t.numel() * t.element_size() for module in linears for t in module.tensors.values())
    monkeypatch.setenv(huge_pages.OPT_OUT, "0")
    kept = moe_runtime.wrap(model(), budget=1.0, device="cpu", **formats)
    assert len({tensor.untyped_storage().data_ptr() for module in kept.modules() if isinstance(module, KernelLinear) for tensor in module.tensors.values()}) > 1
    assert torch.equal(greedy_logits(moved, PROMPT), greedy_logits(kept, PROMPT))


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
    linears = [module for module in model.modules() if isinstance(module, KernelLinear)]
    assert linears and moe_runtime.stats(model)["huge_page_bytes"] == 0
    assert len({t.untyped_storage().data_ptr() for module in linears for t in module.tensors.values()}) > 1
    assert greedy_logits(model, PROMPT).isfinite().all()
