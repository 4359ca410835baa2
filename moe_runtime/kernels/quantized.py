"""A slot pool's quantized matrices of one parameter, as grouped_moe reads them.

    int8: values [S, N, K] int8,        scales [S, N]            w = q * s[n]
    int4: values [S, N, K/2] uint8,     scales [S, K/G, N, 2]    w = (q - 8) * s + z per group of G inputs
          (input 2j in a byte's low nibble, 2j+1 in its high nibble)

The formats are moe_runtime/expert_format.py's; the kernels dequantize tiles of them in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedBank:
    values: torch.Tensor
    scales: torch.Tensor

    @property
    def scheme(self) -> str:
        return "int8" if self.values.dtype == torch.int8 else "int4"

    @property
    def quant_code(self) -> int:
        """The kernels' QUANT constant: 1 int8, 2 int4."""
        return 1 if self.scheme == "int8" else 2

    @property
    def shape(self) -> tuple[int, int, int]:
        """[S, N, K]: the logical (dequantized) shape."""
        slots, rows, columns = self.values.shape
        return slots, rows, columns if self.scheme == "int8" else 2 * columns

    @property
    def group(self) -> int:
        return self.shape[2] // self.scales.shape[1] if self.scheme == "int4" else 0

    @property
    def device(self) -> torch.device:
        return self.values.device

    def dequantize(self) -> torch.Tensor:
        """[S, N, K] fp32 (the reference path; the kernels never build it)."""
        if self.scheme == "int8":
            return self.values.float() * self.scales.float()[:, :, None]
        q = torch.stack([self.values & 0xF, self.values >> 4], dim=-1).reshape(self.shape).float()
        scales = self.scales.float().transpose(1, 2).repeat_interleave(self.group, dim=2)  # [S, N, K, 2]
        return (q - 8) * scales[..., 0] + scales[..., 1]


def quantized_banks(tensors: dict[str, torch.Tensor]) -> tuple:
    """(gate_up, down) of a slot pool's tensors: plain tensors, or QuantizedBank for int8 and
    nibble-packed int4 (torch's CPU tile order is not a layout the kernels read)."""
    return tuple(_bank(tensors, name) for name in ("gate_up_proj", "down_proj"))


def _bank(tensors: dict[str, torch.Tensor], name: str):
    if name in tensors:
        return tensors[name]
    if f"{name}.int8" in tensors:
        return QuantizedBank(tensors[f"{name}.int8"], tensors[f"{name}.scale"])
    if f"{name}.int4" in tensors:
        return QuantizedBank(tensors[f"{name}.int4"], tensors[f"{name}.scales_zeros"])
    raise ValueError(f"the slot pool holds {name} in a layout the Triton kernels do not read ({sorted(tensors)})")
