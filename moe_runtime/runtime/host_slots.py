"""Slots that hold experts where they lie in host RAM: the slot table of in-place execution.

On a CPU, copying an expert from RAM into a slot pool that is also RAM costs a memcpy per miss
and a second copy of every resident expert, for nothing. Here slot s holds a *reference* to the
expert's host tensors (the model's own fused parameters, a host-tier entry, or a buffer a disk
read filled directly) and a way to let go of them; compute reads them in place.

    load (layer, expert) into slot s -> source.hold(...) -> (tensors, release) -> slot s
    evict / reload slot s             -> the previous holder's release()

The cache core decides residency exactly as for a device pool, so hits, misses and the
simulator's agreement are unchanged; only the bytes that never needed to move stay put.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ..expert_format import ExpertSpec
from ..expert_tensors import ExpertTensors


class HostSlots:
    """S slots of references to host tensors; the counterpart of SlotPool for in-place compute."""

    def __init__(self, spec: ExpertSpec, num_slots: int):
        if num_slots <= 0:
            raise ValueError("a slot table needs at least one slot")
        self.spec = spec
        self.dtype = spec.dtype
        self.num_slots = num_slots
        self.device = torch.device("cpu")
        self.bytes_per_slot = spec.nbytes
        self._held: list[tuple[ExpertTensors, Callable[[], None]] | None] = [None] * num_slots
        self._lock = threading.Lock()  # workers assign, the closing thread lets go

    nbytes = 0  # nothing is allocated up front: a slot holds what its source already has

    def assign(self, slot: int, tensors: ExpertTensors, release: Callable[[], None]) -> None:
        """Slot `slot` now holds `tensors`; the expert it held before is let go."""
        with self._lock:
            previous, self._held[slot] = self._held[slot], (tensors, release)
        if previous is not None:
            previous[1]()

    def view(self, slot: int) -> ExpertTensors:
        held = self._held[slot]
        if held is None:
            raise AssertionError(f"slot {slot} holds no expert")
        return held[0]

    def release_all(self) -> None:
        """Let go of every held expert (on close: host-tier entries become evictable again)."""
        with self._lock:
            held, self._held = self._held, [None] * self.num_slots
        for entry in held:
            if entry is not None:
                entry[1]()
