"""Host-side access to cold experts: all of them in RAM, or a bounded RAM tier in front of a disk store.

disk store (disk_store.py) -> host tier (RAM, bounded by host_budget, LRU; pinned when the device
is CUDA) -> held host tensors -> copied into a device slot by the loader, or (in-place execution,
host_slots.py) computed where they lie for as long as a slot holds them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import torch

from .disk_store import DiskStore
from .expert_format import ExpertSpec
from .expert_tensors import ExpertTensors

Held = tuple[ExpertTensors, Callable[[], None]]  # an expert's host tensors and how to let go of them


def _nothing() -> None:
    pass


class ExpertSource(ABC):
    """Host-side access to every expert: hold its host tensors for as long as a copy or an
    in-place computation needs them."""

    spec: ExpertSpec  # how each expert is held (shapes, dtype, format)
    instant = False  # True when holding an expert never reads anything (all of them in RAM)

    @abstractmethod
    def hold_run(self, layer: int, experts: Sequence[int]) -> list[Held]:
        """(host tensors, release) of each of `experts` (a group of `runs()`): the tensors stay
        valid until their release() is called; all or nothing (a failure releases what it held)."""

    def runs(self, layer: int, experts: Sequence[int]) -> list[list[int]]:
        """`experts` grouped so that each group is best fetched together (`hold_run`)."""
        return [[expert] for expert in experts]

    @contextlib.contextmanager
    def borrow_run(self, layer: int, experts: Sequence[int]) -> Iterator[list[ExpertTensors]]:
        """Host tensors of a group of `runs()`, valid until the context exits."""
        held = self.hold_run(layer, experts)
        try:
            yield [tensors for tensors, _ in held]
        finally:
            for _, release in held:
                release()

    @contextlib.contextmanager
    def borrow(self, layer: int, expert: int) -> Iterator[ExpertTensors]:
        with self.borrow_run(layer, [expert]) as (tensors,):
            yield tensors

    def ram_tensors(self) -> list[torch.Tensor]:
        """The tensors it keeps in RAM for as long as it lives (none for a bounded tier)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional
        pass


class RamSource(ExpertSource):
    """All experts in host RAM: the fused parameters of the model itself (pinned on CUDA), or
    their quantized copies (one [E, ...] tensor per stored tensor of `spec`)."""

    def __init__(self, fused: list[dict[str, torch.Tensor]], spec: ExpertSpec | None = None):
        """spec: how the tensors hold each expert (default: the model's own parameters, as they are)."""
        self.fused = fused  # per layer: {name: [E, ...] CPU tensor}
        first = fused[0]
        self.spec = spec or ExpertSpec({name: tuple(t.shape[1:]) for name, t in first.items()}, next(iter(first.values())).dtype)

    instant = True

    def hold_run(self, layer: int, experts: Sequence[int]) -> list[Held]:
        fused = self.fused[layer]
        return [({name: tensor[expert] for name, tensor in fused.items()}, _nothing) for expert in experts]

    def ram_tensors(self) -> list[torch.Tensor]:
        return [tensor for layer in self.fused for tensor in layer.values()]


class HostTier(ExpertSource):
    """A bounded RAM cache of experts in front of a disk store (LRU; thread-safe).

    Host buffers are recycled: an evicted entry's tensors receive the next expert read, so
    pinned memory is allocated once. A borrowed entry is never evicted while borrowed. When
    every entry is borrowed (or the capacity holds none), a read goes to a temporary buffer.
    keep: the (layer, expert) pairs a placement plan holds in RAM; then exactly those stay once
    read, never evicted, and every other expert is read from disk into a temporary buffer.
    """

    def __init__(
        self, disk: DiskStore, spec: ExpertSpec, capacity_bytes: int, *, pin: bool,
        keep: frozenset[tuple[int, int]] | None = None,
    ):
        self.disk = disk
        self.spec = spec
        self.pin = pin
        self.capacity = max(0, capacity_bytes // spec.nbytes)
        if keep is not None and len(keep) > self.capacity:
            raise ValueError(f"the host tier holds {self.capacity} experts, fewer than the {len(keep)} it must keep")
        self.keep = keep
        self._entries: OrderedDict[tuple[int, int], ExpertTensors] = OrderedDict()
        self._borrowed: dict[tuple[int, int], int] = {}
        self._reading: dict[tuple[int, int], threading.Event] = {}
        self._spare: list[ExpertTensors] = []
        self._lock = threading.Lock()
        self.disk_reads = 0

    def __len__(self) -> int:
        return len(self._entries)

    def runs(self, layer: int, experts: Sequence[int]) -> list[list[int]]:
        """Experts already in RAM alone; the others in the disk store's contiguous runs."""
        with self._lock:
            cold = [e for e in experts if (layer, e) not in self._entries and (layer, e) not in self._reading]
        return [[e] for e in experts if e not in cold] + self.disk.runs(layer, cold)

    def hold_run(self, layer: int, experts: Sequence[int]) -> list[Held]:
        """The experts from RAM, reading those not there with one disk read per run. A held
        entry is never evicted; a read that found the tier full went to a buffer of its own."""
        keys = [(layer, expert) for expert in experts]
        held = self._read_missing(keys)
        try:
            for key in keys:
                if key not in held:
                    held[key] = self._acquire(key)
        except BaseException:
            with self._lock:
                for key, (tensors, retained) in held.items():
                    self._give_back(key, tensors, retained)
            raise
        return [(held[key][0], functools.partial(self._let_go, key, *held[key])) for key in keys]

    def _let_go(self, key: tuple[int, int], tensors: ExpertTensors, retained: bool) -> None:
        with self._lock:
            self._give_back(key, tensors, retained)

    def _read_missing(self, keys: list[tuple[int, int]]) -> dict[tuple[int, int], tuple[ExpertTensors, bool]]:
        """Reserve buffers for the keys neither in RAM nor being read, and read them run by run."""
        with self._lock:
            missing = [key for key in keys if key not in self._entries and key not in self._reading]
            reserved = {key: self._reserve(key) for key in missing}
        held = {}
        try:
            for run in self.disk.runs(keys[0][0], [expert for _, expert in missing]):
                run_keys = [(keys[0][0], expert) for expert in run]
                run_reserved = {key: reserved.pop(key) for key in run_keys}
                self._fill(run_keys, run_reserved)  # abandons its keys itself if the read fails
                held.update(run_reserved)
        except BaseException:
            with self._lock:
                for key, (tensors, retained) in held.items():
                    self._give_back(key, tensors, retained)
                for key, buffers_retained in reserved.items():
                    self._abandon(key, *buffers_retained)
            raise
        return held

    def _acquire(self, key: tuple[int, int]) -> tuple[ExpertTensors, bool]:
        while True:
            with self._lock:
                pending = self._reading.get(key)  # checked first: a retained entry fills while listed
                if pending is None and key in self._entries:
                    self._entries.move_to_end(key)
                    self._borrowed[key] = self._borrowed.get(key, 0) + 1
                    return self._entries[key], True
                if pending is None:
                    held = {key: self._reserve(key)}
                    break
            pending.wait()  # another thread is reading this expert: use its result
        self._fill([key], held)
        return held[key]

    def _reserve(self, key: tuple[int, int]) -> tuple[ExpertTensors, bool]:
        """Buffers for a key about to be read (under the lock); others wait for the read."""
        self._reading[key] = threading.Event()
        return self._buffers_for(key)

    def _fill(self, keys: list[tuple[int, int]], held: dict) -> None:
        """Read reserved `keys` (one layer, a run on disk) and release their waiters."""
        try:
            self.disk.read_run(keys[0][0], [expert for _, expert in keys], [held[key][0] for key in keys])
        except BaseException:
            with self._lock:
                for key in keys:
                    self._abandon(key, *held.pop(key))
            raise
        with self._lock:
            self.disk_reads += len(keys)
            for key in keys:
                self._reading.pop(key).set()

    def _abandon(self, key: tuple[int, int], buffers: ExpertTensors, retained: bool) -> None:
        """Undo a reservation whose read failed or never ran (under the lock)."""
        if retained:
            del self._entries[key]
            self._borrowed.pop(key, None)
        self._spare.append(buffers)
        self._reading.pop(key).set()

    def _give_back(self, key: tuple[int, int], tensors: ExpertTensors, retained: bool) -> None:
        """End one borrow (under the lock): a retained entry becomes evictable when unborrowed."""
        if retained:
            self._borrowed[key] -= 1
            if not self._borrowed[key]:
                del self._borrowed[key]
        else:
            self._spare.append(tensors)

    def _buffers_for(self, key: tuple[int, int]) -> tuple[ExpertTensors, bool]:
        """Buffers for a new entry (called under the lock); retained=False means temporary."""
        if self.keep is not None:
            retained = key in self.keep
        else:
            if len(self._entries) >= self.capacity:
                victim = next((k for k in self._entries if k not in self._borrowed), None)
                if victim is not None:
                    self._spare.append(self._entries.pop(victim))
            retained = len(self._entries) < self.capacity
        buffers = self._spare.pop() if self._spare else self.spec.allocate(pin=self.pin)
        if retained:
            self._entries[key] = buffers
            self._borrowed[key] = 1
        return buffers, retained

    def reserve(self, count: int) -> None:
        """Allocate and touch `count` spare buffers now, so the first reads into them do not pay
        for page faults in the middle of a decode (in-place slots own up to one each)."""
        with self._lock:
            missing = max(0, count - len(self._spare))
        buffers = [self.spec.allocate(pin=self.pin) for _ in range(missing)]
        for tensors in buffers:
            for tensor in tensors.values():
                tensor.zero_()
        with self._lock:
            self._spare.extend(buffers)

    def close(self) -> None:
        self.disk.close()
