"""A CPU model's RMS norms in one native call each (kernels/cpu_decode_ops.py), bit-identical.

A decode step runs two RMS norms per layer, and OLMoE and Qwen3-MoE two more on q and k; in
transformers each is a module of seven torch ops, about 19 us on the 2-core EPYC of
BENCHMARKS.md, where the native op takes 5 (33 norms per step on the peer benchmark's small
model). A module gets the native forward only for the input dtypes where it computes exactly
what the native op does: on random inputs of several magnitudes its own forward and the op
must agree bit for bit (transformers' llama-form norms of OLMoE, Qwen2/3-MoE, Mixtral and
DeepSeek do; GPT-OSS's, which multiplies by the weight before rounding, does only on fp32
inputs). Inputs of more than NATIVE_ELEMENTS numbers (a prefill) go to the module's own
forward: its ops are vectorized and threaded, the native loop is neither.

Where a step need not be exact (config.exact_decode: exact=False, quantize_rest's default), the
op sums the squares in one pass of its own instead of torch's at::mean, whose setup was most
of a decode row's 4.5 us (the mean's last bit may differ; everything else is the same).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .kernels import cpu_decode_ops

NATIVE_ELEMENTS = 1 << 14  # a decode step of up to 16 rows at H = 1024, 4 at H = 4096
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class NativeNorm:
    """Installed on one RMS norm module (its instance `forward`) for inputs of the `dtypes` on
    which the native op reproduces it (`exact`: bit for bit, else up to the mean's summation
    order); `remove` puts the class's forward back."""

    def __init__(self, module: nn.Module, dtypes: frozenset, exact: bool = True):
        self.module = module
        self.dtypes = dtypes
        self.eps = float(module.variance_epsilon)
        self.exact = exact
        self.installed = False

    def install(self) -> None:
        self.module.forward = self.forward
        self.installed = True

    def remove(self) -> None:
        del self.module.forward  # the instance attribute: the class's forward again
        self.installed = False

    def serves(self, dtype: torch.dtype) -> bool:
        """Whether a decode row of `dtype` through this module's forward gets the native op
        with a weight of that dtype (what cpu_decode_ops.attend_step computes in its place)."""
        return self.installed and dtype in self.dtypes and self.module.weight.dtype == dtype

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.numel() <= NATIVE_ELEMENTS and hidden_states.device.type == "cpu" and hidden_states.dtype in self.dtypes:
            return cpu_decode_ops.rms_norm(hidden_states, self.module.weight, self.eps, self.exact)
        return type(self.module).forward(self.module, hidden_states)


def install_native_norms(model: nn.Module, exact: bool = True) -> list[NativeNorm]:
    """A NativeNorm on every RMS norm module of `model` (a 1-D `weight` and a
    `variance_epsilon`, on the CPU) that the native op reproduces bit for bit (then computing
    `exact`ly or not), unless someone has already replaced its forward (theirs is left to
    run); none where the op cannot be built."""
    if not cpu_decode_ops.available():
        return []
    installed = []
    for module in model.modules():
        if _is_candidate(module) and (dtypes := reproduced_dtypes(module)):
            installed.append(NativeNorm(module, dtypes, exact))
            installed[-1].install()
    return installed


def _is_candidate(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(getattr(module, "variance_epsilon", None), float) and isinstance(weight, torch.Tensor) and weight.dim() == 1
        and weight.device.type == "cpu" and weight.dtype in DTYPES and "forward" not in module.__dict__
    )


@torch.no_grad()
def reproduced_dtypes(module: nn.Module) -> frozenset:
    """The input dtypes for which the native op gives the module's own output bit for bit on
    random [2, 3, H] inputs from 1e-4 to 1e4 in scale, with the module's weight and with random
    weights of its dtype (a norm initialized to ones hides where the weight multiplies; a fixed
    seed: the same verdict on every run). GPT-OSS's norm rounds once, after the weight: with an
    fp32 weight it agrees on fp32 inputs and not on bf16 ones."""
    return frozenset(dtype for dtype in DTYPES if _agrees(module, dtype))


def _agrees(module: nn.Module, dtype: torch.dtype) -> bool:
    generator = torch.Generator().manual_seed(0)
    weight = module.weight
    shuffled = copy.copy(module)  # the same module with a weight of its own
    shuffled._parameters = {**module._parameters, "weight": nn.Parameter(torch.randn(weight.shape, generator=generator).to(weight.dtype), requires_grad=False)}
    for probe in (module, shuffled):
        for scale in (1e-4, 1e-1, 1.0, 1e2, 1e4):
            x = (torch.randn(2, 3, weight.shape[0], generator=generator) * scale).to(dtype)
            try:
                if not torch.equal(type(probe).forward(probe, x), cpu_decode_ops.rms_norm(x, probe.weight, float(probe.variance_epsilon))):
                    return False
            except RuntimeError:  # a dtype pair the op does not take
                return False
    return True
