"""A CPU decode step's decoder layer as one native call (kernels/cpu_decode_layer.cpp, compiled
into the CPU decode extension: kernels/cpu_build.decode_extension).

hidden [1, 1, H] -> input norm -> q, k, v -> attend_step -> o_proj -> + residual -> post norm
                 -> router logits -> top k -> [the experts where they lie -> + residual]
                 -> the runtime's cache accounts for the experts (Runtime.account_in_place)

decode_layer.py's path for a step that need not be exact already runs each of these parts
natively (NativeNorm, KernelLinear's decode kernel, attend_step, a KernelRouter and the native
top-k rule, cpu_gemv.silu_experts), but calls them one by one with Python between: about 270 us
a layer outside the kernels on the peer benchmark's small model (int4 throughout, 2-core EPYC
of BENCHMARKS.md), and another 125 around the experts' call. A LayerFront calls the same native
functions on the same values in the same order, so its outputs are that path's bit for bit,
and so are the cache's hits, misses and loads (tests/test_layer_front.py, per family and format).

The experts are in the call only where what is computed does not depend on the cache (a CPU
computing in place from every expert in RAM: Runtime.experts_where_they_lie); the cache then
accounts for them after, with the same calls in the same order as run_layer. Elsewhere (low-bit
copies for misses, a forecaster's prefetches, a disk-backed tier) the call ends at the top k
and the runtime's run_layer computes the experts.

It serves one token of one sequence where every part is native for the step's dtype; anything
else (a batch, a prefill, a hook, a part someone replaced or that `to()` remade) takes the
op-by-op path. Its parts are checked by identity on every step (`parts_of`: a dozen objects),
and a front whose parts changed is built again.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch

from .compute import compute_dtype
from .decode_attention import NativeRotation, group_operands
from .expert_format import kernel_operands_many
from .kernel_linears import KernelLinear
from .kv_append import room_for
from .native_norms import NATIVE_ELEMENTS, NativeNorm
from .kernels import cpu_decode_ops
from .kernels.cpu_build import decode_extension

if TYPE_CHECKING:
    from .decode_layer import DecodeLayer


class LayerFront:
    """One decoder layer's native front (`step`) for activations of `dtype`."""

    def __init__(self, owner: DecodeLayer, dtype: torch.dtype, parts: tuple, native, experts):
        """native, experts: the extension's LayerFront and Experts (None: the runtime computes
        the experts, `_experts`)."""
        attention = owner.attention
        self.owner = owner
        self.dtype = dtype
        self.parts = parts
        self.native = native
        self.experts = experts
        self.layer_idx = attention.attention.layer_idx
        dim = attention.attention.head_dim
        key_heads = attention.attention.k_proj.out_features // dim
        self.rotary_shape = torch.Size((1, 1, dim))
        # room_for's shape check takes a key and a value [1, Hk, 1, D]: empty ones of the step's.
        self.key = torch.empty(1, key_heads, 1, dim, dtype=dtype)
        self.value = torch.empty(1, key_heads, 1, attention.attention.v_proj.out_features // key_heads, dtype=dtype)

    def step(self, hidden: torch.Tensor, position_embeddings, cache) -> tuple[torch.Tensor, ...] | None:
        """For a step decode_layer.py would take op by op with the same result, its key and value
        written into the cache: with `experts`, (the layer's output [1, 1, H], the router's top-k
        weights and experts [1, k]), the experts accounted for in the runtime's cache; without,
        (hidden after the attention's residual [1, 1, H], the post-norm rows [1, H], the top-k
        weights and experts [1, k]) for the runtime's experts. None for any other step."""
        cos, sin = position_embeddings
        if cos.dtype != self.dtype or cos.shape != self.rotary_shape or sin.shape != self.rotary_shape or sin.dtype != self.dtype:
            return None
        found = room_for(cache, self.layer_idx, self.key, self.value)
        if found is None:
            return None
        layer, room = found
        if self.experts is None:
            out = self.native.front(hidden, cos, sin, room.keys, room.values, room.length)
        else:
            out = self.native.layer(hidden, cos, sin, room.keys, room.values, room.length, self.experts)
        layer.keys, layer.values = room.advance()  # only once the new key and value are written
        self.owner.attention.steps += 1
        self.owner.kernel_router.view.weight.seen += 1
        if self.experts is not None:
            self.owner.experts.runtime.account_in_place(self.owner.experts.layer, out[2], out[1])
        return out


def front_for(owner: DecodeLayer, hidden: torch.Tensor) -> LayerFront | None:
    """The owner's front for this step's `hidden`, built again where its parts changed; None
    where a front cannot serve it (remembered until the parts change)."""
    if hidden.shape[0] != 1 or hidden.numel() > NATIVE_ELEMENTS:
        return None
    parts = parts_of(owner, hidden.dtype)
    cached = owner.front
    if cached is None or len(cached[0]) != len(parts) or not all(map(operator.is_, cached[0], parts)):
        owner.front = cached = (parts, _build(owner, hidden.dtype, parts))
    return cached[1]


def parts_of(owner: DecodeLayer, dtype: torch.dtype) -> tuple:
    """What a front is built from, as objects compared by identity: a change of any (the
    attention's `fused` switched off, the top-k rule, a weight replaced, KernelLinear's operands
    remade by `to()` or `rehome`) means a new front. (The parts' `installed` flags change only
    as the runtime removes them, with the DecodeLayer itself.)"""
    attention, router = owner.attention, owner.kernel_router
    weights = tuple(norm.module.weight if norm is not None else None for norm in (*owner.norms, *attention.qk_norms))
    operands = tuple(module.kernel_operands(1) if isinstance(module, KernelLinear) else None for module in owner.projections)
    return (dtype, attention.fused, owner.rule, router.router.weight if router is not None else None, *weights, *operands)


def _build(owner: DecodeLayer, dtype: torch.dtype, parts: tuple) -> LayerFront | None:
    """A LayerFront where every part is native for `dtype` (see the module's docstring), else None."""
    attention, router = owner.attention, owner.kernel_router
    input_norm, post_norm = owner.norms
    if not (
        cpu_decode_ops.available() and owner.routed and owner.rule is not None
        and router is not None and router.installed and attention.installed and attention._fuses(dtype)
        and isinstance(attention.rotate, NativeRotation) and _serves(input_norm, dtype) and _serves(post_norm, dtype)
        and router.router.weight.dtype == dtype
    ):
        return None
    try:  # a weight the kernel does not read as it is (not contiguous, an odd shape): the op-by-op path
        return LayerFront(owner, dtype, parts, _native(owner), _experts(owner, dtype))
    except (RuntimeError, ValueError):
        return None


def _native(owner: DecodeLayer):
    """The extension's LayerFront of the owner's parts (raises where the kernel refuses one)."""
    attention, router = owner.attention, owner.kernel_router
    qkv = [_projections(group) for group in attention.together]
    o_proj = _projections([attention.attention.o_proj])
    if o_proj is None or any(group is None for group in qkv):
        raise ValueError("a projection the decode kernel does not compute")
    extension = decode_extension()
    weight = router.router.weight.detach()
    return extension.LayerFront(
        _norm(owner.norms[0]), qkv, *attention.step_norms(), attention.attention.scaling, o_proj,
        _norm(owner.norms[1]), extension.Projections([weight], [], 0, weight.shape[1], [None]), *owner.rule,
    )


def _experts(owner: DecodeLayer, dtype: torch.dtype):
    """The extension's Experts of the owner's MoE layer where the runtime's experts can be
    computed where they lie before it accounts for them (Runtime.experts_where_they_lie),
    plain SwiGLU read by the decode kernel in the activations' dtype (compute.experts_in_place's
    one-call path); else None."""
    runtime, layer = owner.experts.runtime, owner.experts.layer
    source = runtime.experts_where_they_lie()
    if source is None or not runtime.swiglu or runtime.exact or runtime.layout.is_transposed:
        return None
    fused = source.fused[layer]
    experts = [{name: tensor[expert] for name, tensor in fused.items()} for expert in range(runtime.num_experts)]
    gate_up = kernel_operands_many(experts, "gate_up_proj", exact=False)
    down = kernel_operands_many(experts, "down_proj", exact=False)
    if gate_up is None or down is None or compute_dtype(experts[0], dtype) != dtype:
        return None
    hidden_size, intermediate_size = source.spec.shapes["down_proj"]
    return decode_extension().Experts(*gate_up, hidden_size, *down, intermediate_size)


def _serves(norm: NativeNorm | None, dtype: torch.dtype) -> bool:
    return norm is not None and norm.serves(dtype)


def _norm(norm: NativeNorm):
    return decode_extension().Norm(norm.module.weight, norm.eps, norm.exact)


def _projections(group: list) -> object | None:
    """The modules of one kernel call as the native Projections, or None where one of them does
    not go to the decode kernel for a row (then decode_layer.py's path computes it otherwise)."""
    if not all(isinstance(module, KernelLinear) for module in group) or (operands := group_operands(group, 1)) is None:
        return None
    return decode_extension().Projections(*operands, group[0].in_features, [module.bias for module in group])
