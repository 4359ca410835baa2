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
its own forward: it runs on a view of the router whose `weight` is a KernelWeight, the same
tensor as a subclass whose F.linear goes to the kernel for a few rows on the CPU (every other
op on it runs as torch's). A first version ran the forward under a TorchFunctionMode instead,
which sent every torch call of the forward through Python: on the peer benchmark's small model
(int4, alternating in one process) the routers took 0.57 ms more of a 9.0 ms step than the same
ops called directly; through the subclass, 0.17 ms more.
A router whose `linear` takes another tensor (a copy of its weight in another dtype), or whose
forward cannot run on the view, is left alone; DeepSeek's casts its weight to fp32, which in
transformers 5 it already is, so the cast is the weight itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import cpu_gemv

# A decode step's rows (a batch of up to 16 sequences); prefills keep torch's GEMM. With cold
# caches, as between a step's weight streams: [R, 1024] x [64, 1024] bf16, torch 95-103 us at
# every R up to 16, the kernel 36 at 1 row, 57 at 8, 73 at 16 (the CPU of BENCHMARKS.md).
KERNEL_ROWS = 16


class KernelWeight(torch.Tensor):
    """A router's weight as its forward sees it under a KernelRouter (the same storage): F.linear
    of it by the decode kernel for up to KERNEL_ROWS rows on the CPU in its dtype (which
    _uses_linear checks once); every other op as torch's, on plain tensors. `seen` counts the
    kernel's calls."""

    seen: int

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and type(args[1]) is cls:
            logits = _kernel_linear(args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias"))
            if logits is not None:
                return logits
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _kernel_linear(x: torch.Tensor, weight: KernelWeight, bias: torch.Tensor | None) -> torch.Tensor | None:
    """F.linear(x, weight, bias) by the decode kernel (counted in `seen`), or None where it does
    not take these rows (`_takes`)."""
    if not _takes(x, weight):
        return None
    weight.seen += 1
    return _linear(x, weight, bias)


def _takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu" and x.dtype == weight.dtype and x.shape[-1] == weight.shape[1]
        and x.numel() <= KERNEL_ROWS * weight.shape[1]
    )


def _linear(x: torch.Tensor, weight: KernelWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., H] -> [..., E] in x's dtype (the bias added after the product's rounding)."""
    with torch._C.DisableTorchFunctionSubclass():
        logits = cpu_gemv.products(x.reshape(1, -1, x.shape[-1]), [weight])[0]
        if bias is not None:
            logits = logits + bias
        return logits.reshape(*x.shape[:-1], weight.shape[0])


def kernel_weight(weight: torch.Tensor) -> KernelWeight:
    """`weight` (its storage, not a copy) as a KernelWeight."""
    return weight.detach().as_subclass(KernelWeight)


class RouterView:
    """A router as its class's forward sees it under a KernelRouter: every attribute the
    router's own, but `weight`, a KernelWeight of it (remade if the router's weight is
    replaced, by `to()` or an assignment)."""

    def __init__(self, router: nn.Module):
        object.__setattr__(self, "router", router)
        self._view(router.weight, seen=0)

    def _view(self, source: torch.Tensor, seen: int) -> None:
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "weight", kernel_weight(source))
        self.weight.seen = seen

    def __getattr__(self, name: str):
        if name == "router":  # not set yet (a half-built copy): no recursion through it
            raise AttributeError(name)
        return getattr(self.router, name)

    def current(self) -> RouterView:
        """This view, its KernelWeight remade first if the router's weight is no longer its source."""
        if self.router.weight is not self.source:
            self._view(self.router.weight, seen=self.weight.seen)
        return self


class KernelRouter:
    """Installed on one router module (its instance `forward`): its class's forward run on a
    RouterView; `remove` puts the class's forward back."""

    def __init__(self, router: nn.Module):
        self.router = router
        self.view = RouterView(router)
        self.installed = False

    @property
    def seen(self) -> int:
        """Decode rows' logits the kernel computed for this router."""
        return self.view.weight.seen

    def install(self) -> None:
        self.router.forward = self.forward
        self.installed = True

    def remove(self) -> None:
        del self.router.forward
        self.installed = False

    def forward(self, *args, **kwargs):
        return type(self.router).forward(self.view.current(), *args, **kwargs)

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [T, H] -> [T, E]: the logits the router's forward computes under this KernelRouter
        (for callers that apply the family's top-k themselves: decode_layer.py)."""
        weight = self.view.current().weight
        logits = _kernel_linear(rows, weight, None)  # as KernelWeight's F.linear, without its dispatch
        return logits if logits is not None else F.linear(rows, weight)  # torch's, as KernelWeight hands it on


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
    """Whether the router's class forward, run on a RouterView with a random decode row, computes
    its logits as F.linear of its weight: once, and without failing on the view."""
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.device.type != "cpu" or weight.dtype not in cpu_gemv.FLOAT_WEIGHTS:
        return False
    view = RouterView(router)
    x = torch.randn(1, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    try:
        type(router).forward(view, x)
    except Exception:  # a forward that needs the module itself (super(), isinstance): left alone
        return False
    return view.weight.seen == 1
