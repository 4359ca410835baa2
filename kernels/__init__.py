"""Triton grouped-GEMM kernels over the slot pool (issue 8) and their PyTorch reference."""
