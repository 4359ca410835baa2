"""The engine: one MoE layer's residency -> compute -> release, and its assembly.

- executor.py: the Runtime, and its per-layer path (which experts are resident, wait for the
  loads, compute, release), installed into each MoE block.
- assembly.py: options + model + plans -> a Runtime (wrap, unwrap, stats); pretrained.py does
  the same from a checkpoint folder.
- cache_core.py: residency decisions, thread-free and byte-free (shared with the simulator).
- slot_cache.py: the cache core plus load tickets, waits and CUDA release events.
- expert_loader.py: worker threads that load experts into slots (disk reads, host copies).
- slot_pool.py / host_slots.py: the slot memory (device tensors), or references to host
  tensors when a CPU computes experts where they lie.
"""

from .executor import RUNTIME_ATTR, Runtime

__all__ = ["RUNTIME_ATTR", "Runtime"]
