"""Grouped-GEMM expert kernels over the slot pool: `grouped_moe` (Triton or PyTorch) and its
plain PyTorch reference. Imported as `moe_runtime.kernels`; the @triton.jit code is private
(_grouped_moe.py) and loaded only when the Triton kernel runs.
"""

from .grouped_moe import KERNELS, grouped_moe, tile_config
from .quantized import QuantizedBank, quantized_banks
from .reference import grouped_moe_reference

__all__ = ["KERNELS", "QuantizedBank", "grouped_moe", "grouped_moe_reference", "quantized_banks", "tile_config"]
