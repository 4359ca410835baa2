"""What an adapter knows about one MoE family: where its blocks are, how its experts are laid out.

model -> decoder layers -> MoE blocks (router + fused experts module [+ shared experts])
      -> per-expert parameter slices -> checkpoint tensor names of one expert on disk.

Every family supported here keeps the transformers 5 shape: an experts module with fused 3-D
parameters (`gate_up_proj` [E, 2I, H] or, transposed, [E, H, 2I]; `down_proj` [E, H, I] or
[E, I, H]; optional biases [E, 2I] and [E, H]) and a router whose forward returns
`(router_logits, top_k_weights, top_k_index)`. Routing always stays the model's own router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

# The fused parameters of an experts module, in the order a slot stores them.
EXPERT_PARAMS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


@dataclass(frozen=True)
class ExpertLayout:
    """The `use_experts_implementation` flags of an experts class (see transformers.integrations.moe)."""

    is_transposed: bool
    is_concatenated: bool
    has_bias: bool
    has_gate: bool

    @classmethod
    def of(cls, experts: nn.Module) -> ExpertLayout:
        return cls(
            is_transposed=bool(getattr(experts, "is_transposed", False)),
            is_concatenated=bool(getattr(experts, "is_concatenated", True)),
            has_bias=bool(getattr(experts, "has_bias", False)),
            has_gate=bool(getattr(experts, "has_gate", True)),
        )


@dataclass(frozen=True)
class TensorPart:
    """One piece of one expert's parameter in a checkpoint.

    `index` is None for a per-expert tensor (`...experts.3.w1.weight`) and the expert's row for a
    fused [E, ...] tensor (GPT-OSS's `...experts.gate_up_proj`). A parameter made of several parts
    is their concatenation along dim 0 (gate rows, then up rows).
    """

    name: str
    index: int | None = None


@dataclass
class MoEBlock:
    """One MoE layer of a model, found by an adapter."""

    moe_index: int  # 0-based among MoE layers: the L axis of traces
    layer_index: int  # index of the decoder layer that holds it
    path: str  # module path of the block, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: tuple[nn.Module, ...]  # shared experts that stay resident

    @property
    def num_experts(self) -> int:
        return int(self.experts.num_experts)

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    def expert_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-expert shape of each fused parameter present, e.g. {"gate_up_proj": (2I, H), ...}."""
        return {
            name: tuple(getattr(self.experts, name).shape[1:])
            for name in EXPERT_PARAMS
            if isinstance(getattr(self.experts, name, None), torch.Tensor)
        }

    def expert_numel(self) -> int:
        return sum(_prod(shape) for shape in self.expert_shapes().values())


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


class MoEAdapter:
    """Base adapter: the transformers 5 MoE shape, parameterised by a few names per family.

    Subclasses set `model_type` and, where the family differs, the router and shared-expert
    attribute names and the checkpoint naming of one expert.
    """

    model_type: ClassVar[str]
    router_attr: ClassVar[str] = "gate"
    experts_attr: ClassVar[str] = "experts"
    shared_attrs: ClassVar[tuple[str, ...]] = ()
    # Per-expert checkpoint names relative to "<block>.experts.<e>.": gate_up is the
    # concatenation of the gate and up tensors, down is one tensor.
    checkpoint_gate_up: ClassVar[tuple[str, ...]] = ("gate_proj.weight", "up_proj.weight")
    checkpoint_down: ClassVar[str] = "down_proj.weight"
    # (model-name fragment, checkpoint-name fragment) pairs: how save_pretrained renames modules.
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    # The top-k rule of the softmax families: renormalise the top-k (None: as router.norm_topk_prob)
    # and cast the weights to the logits' dtype.
    always_renormalise: ClassVar[bool | None] = None
    cast_weights: ClassVar[bool] = True
    # Where the family's attention puts its q/k norms, for the CPU decode path of
    # decode_attention.py ("projection", "head", "none"); None: transformers' forward always.
    decode_attention: ClassVar[str | None] = None

    def select(self, router: nn.Module, logits: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's choice (top_k_weights [T, K], top_k_index [T, K]) from its logits [T, E],
        among the `keep` experts only (bool [E]; None = all).

        The family's own rule, applied to logits with pruned experts at -inf (used by pruning
        profiles; with keep=None it reproduces the router's output exactly, which tests check).
        """
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        probabilities = torch.softmax(logits.float(), dim=-1)
        weights, index = torch.topk(probabilities, router.top_k, dim=-1)
        renormalise = self.always_renormalise if self.always_renormalise is not None else router.norm_topk_prob
        if renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights.to(logits.dtype) if self.cast_weights else weights), index

    def top_k_rule(self, router: nn.Module) -> tuple[int, bool, bool] | None:
        """(k, renormalise, cast) of `select`'s rule for this router, for a native op that applies
        it (cpu_decode_ops.top_k_softmax); None where a subclass chooses another way."""
        if type(self).select is not MoEAdapter.select:
            return None
        renormalise = self.always_renormalise if self.always_renormalise is not None else router.norm_topk_prob
        return int(router.top_k), bool(renormalise), self.cast_weights

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"{type(model).__name__} has no `model.layers` list: not a {self.model_type} "
                "causal LM as transformers builds it."
            )
        return layers

    def blocks(self, model: nn.Module) -> list[MoEBlock]:
        """Every MoE block of the model, in layer order (dense layers are skipped)."""
        found = []
        for layer_index, layer in enumerate(self.decoder_layers(model)):
            block = getattr(layer, "mlp", None)
            experts = getattr(block, self.experts_attr, None)
            experts = getattr(experts, "original", experts)  # a wrapped block: its original experts
            if experts is None or not hasattr(experts, "gate_up_proj"):
                continue
            shared = tuple(getattr(block, a) for a in self.shared_attrs if getattr(block, a, None) is not None)
            found.append(
                MoEBlock(
                    moe_index=len(found),
                    layer_index=layer_index,
                    path=self.block_path(model, layer_index),
                    block=block,
                    router=getattr(block, self.router_attr),
                    experts=experts,
                    shared=shared,
                )
            )
        if not found:
            raise ValueError(f"found no MoE block in this {self.model_type} model (every layer is dense)")
        return found

    def block_path(self, model: nn.Module, layer_index: int) -> str:
        prefix = "model.layers" if hasattr(model, "model") else "layers"
        return f"{prefix}.{layer_index}.mlp"

    def to_checkpoint_name(self, model_name: str) -> str:
        """The name save_pretrained gives a (non-fused) parameter of the model."""
        for model_fragment, checkpoint_fragment in self.checkpoint_renames:
            model_name = model_name.replace(model_fragment, checkpoint_fragment)
        return model_name

    def checkpoint_parts(self, block: MoEBlock, expert: int) -> dict[str, list[TensorPart]]:
        """Where one expert's parameters live in a checkpoint saved by transformers 5.

        Returns {fused parameter name: parts concatenated along dim 0}. Per-expert families
        (Mixtral, Qwen, OLMoE, DeepSeek) save one tensor per expert projection.
        """
        prefix = self.to_checkpoint_name(f"{block.path}.{self.experts_attr}.{expert}.")
        return {
            "gate_up_proj": [TensorPart(prefix + name) for name in self.checkpoint_gate_up],
            "down_proj": [TensorPart(prefix + self.checkpoint_down)],
        }

    def fused_checkpoint_parts(self, block: MoEBlock, expert: int) -> dict[str, list[TensorPart]]:
        """The same expert in a checkpoint that stores fused [E, ...] tensors (as the module does)."""
        prefix = self.to_checkpoint_name(f"{block.path}.{self.experts_attr}.")
        return {name: [TensorPart(prefix + name, expert)] for name in block.expert_shapes()}
