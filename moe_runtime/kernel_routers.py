"""A CPU decode step's router logits through the decode kernel, where the step need not be exact
(config.exact_decode: exact=False, the default under quantize_rest).

A router's logits are one small product: a decode row times [E, H] in the model's dtype (64 x
1024 bf16 on the peer benchmark's small model). torch's bf16 `linear` for it took 82 us inside
a decode step on the 2-core EPYC of BENCHMARKS.md (22 us in a hot loop: inside a step its
threads and caches are cold), eight times a step; the decode kernel (kernels/cpu_gemv.py)
takes 14-16. Both accumulate in fp32 and round once, in different orders, so logits can
differ in their last bit and a near tie between two experts can then go the other way: where a
step must be exact (the default at full precision: wrap promises the unwrapped model's
outputs) the runtime keeps torch's `linear`.

Everything else the router does (softmax, top-k, renormalizing; each family's own order) stays
its own forward: it runs under a TorchFunctionMode that hands the kernel only the `linear` of
the router's own weight, for a few rows on the CPU. A router whose `linear` takes another
tensor (a copy of its weight in another dtype) is left alone; DeepSeek's casts its weight to
fp32, which in transformers 5 it already is, so the cast is the weight itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .kernels import cpu_gemv

# A decode step's rows (a batch of up to 16 sequences); prefills keep torch's GEMM. With cold
# caches, as between a step's weight streams: [R, 1024] x [64, 1024] bf16, torch 95-103 us at
# every R up to 16, the kernel 36 at 1 row, 57 at 8, 73 at 16 (the CPU of BENCHMARKS.md).
KERNEL_ROWS = 16


class KernelLogits(TorchFunctionMode):
    """While active: F.linear(x, weight[, bias]) of this `weight` (a 2-D CPU tensor of a dtype the
    kernel reads: _uses_linear checks it once) by the decode kernel for up to KERNEL_ROWS rows on
    the CPU; every other call as usual. `seen` counts the calls it took."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.seen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and args[1] is self.weight and self._takes(args[0]):
            self.seen += 1
            return self._linear(args[0], args[2] if len(args) > 2 else kwargs.get("bias"))
        return func(*args, **kwargs)

    def _takes(self, x: torch.Tensor) -> bool:
        weight = self.weight
        return (
            x.device.type == "cpu" and x.dtype == weight.dtype and x.shape[-1] == weight.shape[1]
            and x.numel() <= KERNEL_ROWS * weight.shape[1]
        )

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., H] -> [..., E] in x's dtype (the bias added after the product's rounding)."""
        logits = cpu_gemv.products(x.reshape(1, -1, x.shape[-1]), [self.weight])[0]
        if bias is not None:
            logits = logits + bias
        return logits.reshape(*x.shape[:-1], self.weight.shape[0])


class KernelRouter:
    """Installed on one router module (its instance `forward`): its own forward under
    KernelLogits of its weight; `remove` puts the class's forward back."""

    def __init__(self, router: nn.Module):
        self.router = router
        self.logits = KernelLogits(router.weight)

    def install(self) -> None:
        self.router.forward = self.forward

    def remove(self) -> None:
        del self.router.forward

    def forward(self, *args, **kwargs):
        with self.logits:
            return type(self.router).forward(self.router, *args, **kwargs)


def install_kernel_routers(routers: list[nn.Module]) -> list[KernelRouter]:
    """A KernelRouter on every one of `routers` whose forward computes its logits as
    F.linear(x, weight) (found by running it once on a random decode row), unless someone has
    already replaced its forward; none where the kernel cannot be built."""
    if not cpu_gemv.available():
        return []
    installed = []
    for router in routers:
        if "forward" not in router.__dict__ and _uses_linear(router):
            installed.append(KernelRouter(router))
            installed[-1].install()
    return installed


@torch.no_grad()
def _uses_linear(router: nn.Module) -> bool:
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype not in cpu_gemv.FLOAT_WEIGHTS:
        return False
    probe = KernelLogits(weight)
    x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    with probe:
        router(x)
    return probe.seen == 1
