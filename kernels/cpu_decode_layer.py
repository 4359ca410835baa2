"""A CPU decode step's layer up to its experts in one native call (cpu_decode_layer.cpp,
compiled on first use with cpu_gemv.cpp and cpu_decode_ops.cpp inside it).

    Projections(weights, scales, group, in_features, biases)(rows [R, K]) -> M x [R, N]
    LayerFront(input_norm, qkv, ..., o_proj, post_norm, router, top_k, ...)
        .step(hidden [1, 1, H], cos, sin, keys, values, length)
        -> (hidden after the attention [1, 1, H], post-norm rows [1, H], weights [1, k], experts [1, k])

moe_runtime/layer_front.py builds a LayerFront from a decoder layer's installed native parts.
`available()` is False where the extension cannot be built or MOE_RUNTIME_CPU_KERNEL=torch is
set; decode_layer.py keeps its op-by-op path there.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .cpu_build import build

SOURCE = Path(__file__).with_name("cpu_decode_layer.cpp")


@lru_cache(maxsize=None)
def extension():
    """The compiled module, or None where it cannot be had (cpu_build.build)."""
    return build(SOURCE, "moe_runtime_cpu_decode_layer", "CPU decode layer", "about 45 s")


def available() -> bool:
    return extension() is not None
