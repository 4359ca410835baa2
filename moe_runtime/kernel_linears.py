"""The linear layers outside the routed experts through the CPU decode kernel: quantized when
asked (`quantize_rest="int8" | "int4"`), at full precision where a decode step need not be exact.

On a CPU, once the experts are int8 or int4, the model's other linear layers (attention
projections, shared experts, dense MLPs, the output head) in bf16 take most of a decode step:
60% of it on the live_decode model with int4 experts (profiled on the 2-core EPYC of
BENCHMARKS.md). With quantize_rest, each nn.Linear outside the routed experts and the routers
becomes a KernelLinear holding the same formats as the experts (expert_format.py) and
computing through the same CPU kernels; its bf16 weight is freed. Without quantize_rest but
with exact=False (config.exact_decode), each becomes a KernelLinear holding its own weight as it
is, whose decode rows the kernel computes in another summation order than torch's: for one
row of a [50304, 1024] output head, torch's bf16 GEMM streams 19 GB/s on that CPU and the
kernel 34-35 (fp16: torch 36-38, the kernel 31-34; a decode step gains in bf16, not in fp16).
Undo gives back nn.Linear modules holding the (dequantized) weights; quantized, the original
values are gone, as with the experts.
"""

from __future__ import annotations

import torch
from torch import nn

from . import huge_pages
from .expert_format import ExpertFormat, cpu_kernel_operands, dequantize, linear
from .kernels import cpu_gemv


class KernelLinear(nn.Module):
    """y = x W^T + b with W held in an expert format (expert_format.py) as buffers named
    "weight.int8", "weight.scale", ... (full precision: "weight"); activations keep the model's
    dtype; `exact`: full precision computed by torch's kernels, not the decode kernel."""

    def __init__(self, original: nn.Linear, tensors: dict[str, torch.Tensor], exact: bool):
        super().__init__()
        self.in_features, self.out_features = original.in_features, original.out_features
        self.dtype = original.weight.dtype
        self.exact = exact
        self.names = list(tensors)
        for name, tensor in tensors.items():
            self.register_buffer(name.replace(".", "_"), tensor)
        self.bias = original.bias
        self._tensors = None
        self._operands: dict[tuple[int, bool], tuple | None] = {}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """{"weight.int8": ..., ...}: the buffers, gathered once (this runs per decode step and
        layer) and again after `to()` or any other _apply replaces them."""
        if self._tensors is None:
            self._tensors = {name: getattr(self, name.replace(".", "_")) for name in self.names}
        return self._tensors

    def kernel_operands(self, rows: int) -> tuple[list, list, int] | None:
        """(matrices, scales, group) of the weight as the decode kernel reads it for `rows` CPU
        rows, or None where linear() would not use the kernel: asked once per row count and
        `exact` (expert_format.cpu_kernel_operands), not per step."""
        key = (rows, self.exact)
        if key not in self._operands:
            self._operands[key] = cpu_kernel_operands(self.tensors, "weight", rows, exact=self.exact)
        return self._operands[key]

    def rehome(self, tensors: dict[str, torch.Tensor]) -> None:
        """Hold `tensors` (the same values elsewhere: huge_pages.py) instead of the buffers it has."""
        for name, tensor in tensors.items():
            setattr(self, name.replace(".", "_"), tensor)
        self._tensors = None
        self._operands = {}

    def _apply(self, fn, recurse=True):
        self._tensors = None
        self._operands = {}
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        operands = self.kernel_operands(len(rows)) if rows.device.type == "cpu" else None
        y = cpu_gemv.products(rows[None], *operands)[0] if operands else linear(rows, self.tensors, "weight", False, exact=self.exact)
        return self.output(y, x.shape[:-1])

    def output(self, y: torch.Tensor, leading: torch.Size) -> torch.Tensor:
        """y [M, out] (the rows' products) -> [*leading, out], the bias added: the end of
        forward, also for products computed elsewhere (decode_attention.py's shared calls)."""
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*leading, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in] in the model's dtype."""
        return dequantize(self.tensors, "weight", self.dtype)


class KernelLinears:
    """Replaces the linear layers of `model` outside `skipped` modules (the routed experts and
    the routers) with KernelLinear in `fmt`, and puts nn.Linear modules back on undo."""

    def __init__(self, model: nn.Module, fmt: ExpertFormat, skipped: list[nn.Module], exact: bool):
        self.fmt = fmt
        self.exact = exact
        uses = {}
        for _, parameter in model.named_parameters(remove_duplicate=False):
            uses[id(parameter)] = uses.get(id(parameter), 0) + 1
        self.tied = {key for key, count in uses.items() if count > 1}  # e.g. an output head tied to the embedding
        skip = {id(module) for root in skipped for module in root.modules()}
        self.targets = [
            (parent, name, child) for parent in model.modules() if id(parent) not in skip
            for name, child in parent.named_children() if type(child) is nn.Linear and id(child) not in skip and self._fits(child)
        ]
        self.originals: list[tuple[nn.Module, str, nn.Linear, nn.Parameter | None]] = []

    def _fits(self, module: nn.Linear) -> bool:
        """Whether the format holds this shape (int4: K divisible by the group, N by 32)."""
        try:
            self.fmt.specs({"weight": (module.out_features, module.in_features)}, module.weight.dtype, False)
        except ValueError:
            return False
        return not module.weight.is_meta

    def apply(self) -> int:
        """Replace every target, one at a time (each bf16 weight freed as it goes once quantized,
        unless another module shares it: then it is kept and given back as it was); returns
        how many."""
        for parent, name, module in self.targets:
            tensors = self.fmt.encode({"weight": module.weight.detach().cpu()}, False)
            setattr(parent, name, KernelLinear(module, tensors, self.exact))
            kept = module.weight if id(module.weight) in self.tied else None
            module.weight = nn.Parameter(module.weight.detach().to("meta"), requires_grad=False)
            self.originals.append((parent, name, module, kept))
        self._into_huge_pages()
        return len(self.originals)

    def _into_huge_pages(self) -> None:
        """Every replacement's tensors copied into one arena of huge pages (huge_pages.py), but a
        weight shared with another module (a tied output head), which stays shared."""
        if not huge_pages.available():
            return
        modules = [getattr(parent, name) for parent, name, _, kept in self.originals if kept is None]
        owned = [(module, name, tensor) for module in modules for name, tensor in module.tensors.items() if tensor.device.type == "cpu"]
        if not owned:
            return
        copies = huge_pages.moved([tensor for _, _, tensor in owned])
        if copies is None:  # no room for the copies (warned): every weight stays where it is
            return
        for (module, name, _), copy in zip(owned, copies):
            module.rehome({name: copy})

    def tensors(self) -> list[torch.Tensor]:
        """Every replacement's tensors (weights, scales)."""
        return [tensor for parent, name, _, _ in self.originals for tensor in getattr(parent, name).tensors.values()]

    def undo(self) -> None:
        """nn.Linear modules again, holding the (dequantized) weights."""
        for parent, name, module, kept in self.originals:
            replaced = getattr(parent, name)
            module.weight = kept if kept is not None else nn.Parameter(replaced.dequantized_weight(), requires_grad=False)
            setattr(parent, name, module)
        self.originals = []
