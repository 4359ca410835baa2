"""Where a routed expert is computed: in a device slot, or on the CPU where its weights lie.

- "device": every expert a layer needs is loaded into the device slot pool and computed there
  (the classic offloading engine; on a CPU device the pool is RAM and a load is a memcpy).
- "host": no slot pool. Slots hold references to the experts' host tensors and the CPU computes
  them in place; on CUDA the layer's activations go to the CPU and the results come back
  (llama.cpp's `--cpu-moe`, kTransformers). On a CPU device nothing is ever copied.
- "hybrid": resident experts run on the device; each missed expert is either loaded or computed
  on the CPU, whichever a cost model says finishes first (HybridCostModel), the CPU working
  while the copies and the device's compute proceed. Experts computed on the CPU may still be
  admitted to the pool by a background load when the copy engine is idle.
- "auto": "host" on a CPU device (unless the Triton kernel, which reads a pool, is asked for);
  "device" on CUDA, until hybrid execution has been measured on a GPU (it is tested for
  correctness on the CPU, where the same code runs with a pool in RAM).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adapters import ExpertLayout
from .compute import one_expert
from .host_tier import ExpertSource
from .runtime.slot_pool import SlotPool

DEVICE, HOST, HYBRID = "device", "host", "hybrid"
EXECUTIONS = ("auto", DEVICE, HOST, HYBRID)


def resolve_execution(execution: str, device: torch.device, kernel: str) -> str:
    """The concrete execution for `execution` on `device` (see the module docstring)."""
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
    if kernel == "triton" and execution in (HOST, HYBRID) and device.type == "cpu":
        raise ValueError(f"kernel='triton' computes experts in a slot pool; execution={execution!r} on a CPU has none: pass execution='device'")
    if execution != "auto":
        return execution
    return HOST if device.type == "cpu" and kernel != "triton" else DEVICE


@dataclass(frozen=True)
class HybridCostModel:
    """Per-expert costs in ms, measured on the machine (`measure_costs`), never assumed.

    load_ms: one expert from host RAM into a device slot; host_ms: one expert computed on the
    CPU for one token (weights read from RAM); device_ms: the same on the device, from a slot.
    """

    load_ms: float
    host_ms: float
    device_ms: float = 0.0

    def split(
        self, missed: Sequence[int], tokens: dict[int, int], copy_backlog_ms: float = 0.0, device_busy_ms: float = 0.0,
    ) -> tuple[list[int], list[int]]:
        """(to load, to compute on the CPU): each missed expert, in order, goes where the layer
        then finishes first. The device finishes after its loads (queued behind
        `copy_backlog_ms`), their compute and its own `device_busy_ms` of work this layer; the
        CPU after the experts already given to it; the layer when both have (greedy makespan
        over two machines working side by side).

        tokens: the expert's rows in this layer (1 per expert in decode; many in a prefill, where
        the CPU's time grows with them and a load's does not). Ties go to the CPU: no bytes move.
        """
        load, host = [], []
        copy_free, device_compute, host_free = max(0.0, copy_backlog_ms), device_busy_ms, 0.0
        for expert in missed:
            rows = tokens.get(expert, 1)
            device_end = copy_free + device_compute
            on_host = max(device_end, host_free + rows * self.host_ms)
            on_device = max(device_end + self.load_ms + rows * self.device_ms, host_free)
            if on_host <= on_device:
                host.append(expert)
                host_free += rows * self.host_ms
            else:
                load.append(expert)
                copy_free += self.load_ms
                device_compute += rows * self.device_ms
        return load, host


def measure_costs(source: ExpertSource, pool: SlotPool, layout: ExpertLayout, apply_gate, *, repeats: int = 5) -> HybridCostModel:
    """The cost model's constants on this machine, at this shape and dtype (best of `repeats`):
    expert 0 of layer 0 copied into slot 0 (before the runtime uses the pool) and computed for
    one token on the CPU and on the device."""
    device = pool.device
    with source.borrow(0, 0) as host:
        slot = pool.view(0)
        in_features = source.spec.shapes["gate_up_proj"][0 if layout.is_transposed else 1]
        x_host = torch.randn(1, in_features, dtype=pool.dtype)
        x_device = x_host.to(device)
        load_ms = _best_ms(lambda: [target.copy_(host[name], non_blocking=True) for name, target in slot.items()], device, repeats)
        host_ms = _best_ms(lambda: one_expert(x_host, host, layout, apply_gate), torch.device("cpu"), repeats)
        device_ms = _best_ms(lambda: one_expert(x_device, slot, layout, apply_gate), device, repeats)
    return HybridCostModel(load_ms=load_ms, host_ms=host_ms, device_ms=device_ms)


def _best_ms(work, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best * 1e3
