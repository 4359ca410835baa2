"""A CPU decode step's decoder layer without nn.Module's per-call machinery around its parts.

hidden [B, 1, H] -> input norm -> attention (decode_attention.py) -> + residual
                 -> post-attention norm -> router logits -> the family's top-k -> experts -> + residual

The llama-form decoder layer of OLMoE, Qwen2-MoE, Qwen3-MoE and Mixtral is seven lines of
arithmetic, but a decode step reaches each part through nn.Module.__call__ (hooks, the
forward-call wrappers), the layer's deprecated-argument decorator, the MoE block's forward, the
router module and the experts module: on the peer benchmark's small model (int4 throughout,
2-core EPYC of BENCHMARKS.md, 3 x 240 steps with and without in turn in one process) a step's
median fell from 8.8 to 8.1 ms without them (fp16, exact=False: 18.6 to 18.0). Here the same
parts are called directly, in the same order on the same tensors, so the outputs are
bit-identical (tested per family):

- the norms' and the attention's own forwards (NativeNorm, DecodeAttention where installed);
- for a block of a router and routed experts only (OLMoE, Qwen3-MoE, Mixtral), the router's
  logits as its forward computes them (F.linear, or the decode kernel's where a KernelRouter
  serves it), the family's top-k rule (MoEAdapter.select, which reproduces every supported
  router exactly; tests check it), and the runtime's experts (OffloadedExperts.forward);
  any other block (Qwen2-MoE's shared expert, a dense MLP) through its module.

Where the step need not be exact (a KernelRouter serves the router: exact=False), the top-k
rule is one native call (cpu_decode_ops.top_k_softmax: 4 us where select's five torch ops
took 22 in a hot loop, and 84 inside an OLMoE-1B-7B-shaped step, whose weight streams leave
every cache cold), equal to select's up to the last bits of exp and the order of exact ties.

Where every part of a step is native (a step that need not be exact, one token of one
sequence), the whole layer is one native call instead (layer_front.py: the same functions in
the same order, bit for bit; the experts too where they lie in RAM): on the peer benchmark's
small model (int4 throughout, two copies taking turns in one process) a step's median fell from
10.65 to 8.29 ms, in one of the VM's slow spells.

A hook on any of these parts (a pruning profile's router hook, transformers' output capturing,
a user's) gives the step back to the layer's own forward, which calls each part through its
module, hooks and all; so does a step the attention path does not take (a prefill, a mask,
training, another device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from .adapters import MoEAdapter, MoEBlock
from .decode_attention import DecodeAttention
from .kernel_routers import KernelRouter
from .kernels import cpu_decode_ops
from .layer_front import front_for
from .native_norms import NativeNorm

GLOBAL_HOOKS = (  # torch's hooks on every module: dicts changed in place, checked per step
    torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks,
    torch_module._global_backward_hooks, torch_module._global_backward_pre_hooks,
)


class DecodeLayer:
    """Installed on one llama-form decoder layer (its instance `forward`); `remove` puts the
    class's back. `block`: the runtime's MoE block of this layer (None: a dense layer);
    `router`: the KernelRouter serving its router, if any; `norms`: the NativeNorms installed on
    its input and post-attention norms (None where there is none)."""

    def __init__(
        self, layer: nn.Module, attention: DecodeAttention, block: MoEBlock | None, adapter: MoEAdapter, router: KernelRouter | None,
        norms: tuple[NativeNorm | None, NativeNorm | None] = (None, None),
    ):
        self.layer = layer
        self.norms = norms
        self.native_front = True  # the step in one native call where it can, layer_front.py (a switch for tests and benchmarks)
        self.front = None  # (its parts, the LayerFront or None) once a step has asked (layer_front.front_for)
        self.projections = [module for group in attention.together for module in group] + [attention.attention.o_proj]
        self.attention = attention
        self.adapter = adapter
        self.kernel_router = router
        mlp = layer.mlp
        own_router = block is not None and ("forward" not in block.router.__dict__ or router is not None)
        self.routed = block is not None and block.block is mlp and not block.shared and "forward" not in mlp.__dict__ and own_router
        self.router = block.router if self.routed else None
        self.experts = getattr(mlp, adapter.experts_attr) if self.routed else None
        self.rule = adapter.top_k_rule(self.router) if self.routed and router is not None and cpu_decode_ops.available() else None
        bypassed = [layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm, mlp, self.router, self.experts]
        self.hooks = [hooks for module in bypassed if module is not None for hooks in _hook_dicts(module)] + list(GLOBAL_HOOKS)
        self.steps = 0  # one-token steps served here

    def install(self) -> None:
        self.layer.forward = self.forward

    def remove(self) -> None:
        del self.layer.forward  # the instance attribute: the class's forward again

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None, cache=None, use_cache=False, position_embeddings=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        layer = self.layer
        if layer.training or any(self.hooks) or not self._decodes(hidden_states, position_embeddings, attention_mask, cache, kwargs):
            return type(layer).forward(
                layer, hidden_states, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache,
                position_embeddings=position_embeddings, **kwargs,
            )
        self.steps += 1
        front = front_for(self, hidden_states) if self.routed and self.native_front else None
        if front is not None and (found := front.step(hidden_states, position_embeddings, cache)) is not None:
            if front.experts is not None:
                return found[0]
            hidden_states, rows, weights, index = found
            return hidden_states + self.experts.forward(rows, index, weights).view(hidden_states.shape)
        hidden_states = hidden_states + self.attention.decode(layer.input_layernorm.forward(hidden_states), position_embeddings, cache, kwargs)
        return hidden_states + self._mlp(layer.post_attention_layernorm.forward(hidden_states))

    def _decodes(self, hidden_states, position_embeddings, attention_mask, cache, kwargs) -> bool:
        """Whether the attention's decode path is installed and serves this step."""
        return self.attention.installed and self.attention.applies(hidden_states, position_embeddings, attention_mask, cache, kwargs)

    def _mlp(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, 1, H]: the routed experts' output, as the block's forward computes it."""
        if not self.routed:
            return self.layer.mlp(hidden_states)
        rows = hidden_states.view(-1, hidden_states.shape[-1])
        if self.kernel_router is not None and self.kernel_router.installed:  # a step that need not be exact
            logits = self.kernel_router.logits(rows)
            weights, index = cpu_decode_ops.top_k_softmax(logits, *self.rule) if self.rule else self.adapter.select(self.router, logits, None)
        else:
            weights, index = self.adapter.select(self.router, F.linear(rows, self.router.weight), None)
        return self.experts.forward(rows, index, weights).view(hidden_states.shape)


def _hook_dicts(module: nn.Module) -> list[dict]:
    """The module's hook dicts (changed in place by register_*_hook: checked per step)."""
    return [module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks]


def install_decode_layers(
    layers: nn.ModuleList, attention: list[DecodeAttention], blocks: list[MoEBlock], adapter: MoEAdapter, routers: list[KernelRouter],
    native_norms: list[NativeNorm] = (),
) -> list[DecodeLayer]:
    """A DecodeLayer on every decoder layer whose attention has a DecodeAttention (the llama-form
    families' layers: the adapter names them by `decode_attention`), whose norms are named as
    theirs, and whose forward nobody has replaced already."""
    served = {id(installed.attention): installed for installed in attention}
    by_mlp = {id(block.block): block for block in blocks}
    by_router = {id(installed.router): installed for installed in routers}
    by_norm = {id(norm.module): norm for norm in native_norms}
    decode_layers = []
    for layer in layers:
        decoding = served.get(id(getattr(layer, "self_attn", None)))
        if decoding is None or "forward" in layer.__dict__ or not all(hasattr(layer, name) for name in ("input_layernorm", "post_attention_layernorm", "mlp")):
            continue
        block = by_mlp.get(id(layer.mlp))
        router = by_router.get(id(block.router)) if block is not None else None
        norms = (by_norm.get(id(layer.input_layernorm)), by_norm.get(id(layer.post_attention_layernorm)))
        decode_layers.append(DecodeLayer(layer, decoding, block, adapter, router, norms))
        decode_layers[-1].install()
    return decode_layers
