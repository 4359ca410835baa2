"""Asynchronous loads of experts into slots: queue -> worker threads -> host tier -> copy -> event.

Misses go ahead of prefetches (a priority queue), several loads are in flight (one per worker),
and disk reads happen in the workers, so they overlap compute. The loads one call submits are
grouped by the source's runs (experts back to back on disk are read by one worker in one read). On CUDA each copy runs on a
dedicated copy stream from pinned host memory, first waiting for the compute stream to finish
with the slot's previous expert, and records one event per load; the worker waits for that
event before it hands the host buffer back, so a finished ticket means the slot is complete and
the compute stream never waits for anything but the experts it needs.

With a HostSlots table (in-place execution on the CPU) nothing is copied: a load holds the
expert's host tensors (reading it from disk straight into its buffer if it is not in RAM) and
hands them to the slot. When the source has every expert in RAM (`instant`), that is a pointer
move, done on the caller's thread: no queue, no thread switch.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field

import torch

from .host_slots import HostSlots
from ..host_tier import ExpertSource
from .slot_pool import SlotPool

MISS, PREFETCH = 0, 1  # queue priorities: lower runs first


@dataclass
class LoadTicket:
    """One load of expert (layer, expert) into `slot`; `wait()` blocks until it is there.

    after: on CUDA, a compute-stream event the copy must wait for (the slot's previous expert).
    """

    layer: int
    expert: int
    slot: int
    prefetch: bool
    after: torch.cuda.Event | None = None
    submitted: bool = False
    error: BaseException | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def done(self) -> bool:
        return self._done.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Block until the load has finished (or failed); False if `timeout` passed first."""
        return self._done.wait(timeout)

    def wait(self) -> None:
        """Block until the expert is in its slot; raises the load's error if it failed."""
        self._done.wait()
        if self.error is not None:
            raise self.error


class Loader:
    def __init__(self, source: ExpertSource, pool: SlotPool | HostSlots, *, workers: int = 2):
        self.source = source
        self.pool = pool
        self.in_place = isinstance(pool, HostSlots)
        self.inline = self.in_place and source.instant  # nothing to wait for: load on the caller's thread
        # What a load moves: a copy into a slot; in place, a read into RAM (at most: the host tier
        # may hold it already); nothing at all when every expert is in RAM.
        self.bytes_per_load = 0 if self.inline else pool.bytes_per_slot
        self.cuda = pool.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device=pool.device) if self.cuda else None
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._sequence = itertools.count()
        workers = 0 if self.inline else workers
        self._threads = [threading.Thread(target=self._work, name=f"moe-loader-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, tickets: list[LoadTicket]) -> None:
        """Queue loads of one layer's experts, one queue entry per run of the source."""
        if not tickets:
            return
        by_expert = {ticket.expert: ticket for ticket in tickets}
        groups = [[by_expert[expert] for expert in run] for run in self.source.runs(tickets[0].layer, list(by_expert))]
        # Nothing below raises: either every ticket is queued or (above) none is.
        for ticket in tickets:
            ticket.submitted = True
        if self.inline:
            for group in groups:
                self._run(group)
            return
        for group in groups:
            priority = PREFETCH if all(ticket.prefetch for ticket in group) else MISS
            self._queue.put((priority, next(self._sequence), group))

    def _work(self) -> None:
        while True:
            _, _, group = self._queue.get()
            if group is None:
                return
            self._run(group)

    def _run(self, group: list[LoadTicket]) -> None:
        """Load one group; its tickets finish either way (a failure is raised by their wait)."""
        try:
            self._hold(group) if self.in_place else self._copy(group)
        except BaseException as error:  # handed to the waiting forward, which raises it
            for ticket in group:
                ticket.error = error
        finally:
            for ticket in group:
                ticket._done.set()

    def _hold(self, group: list[LoadTicket]) -> None:
        """In place: the slots hold the experts' host tensors (nothing copied)."""
        held = self.source.hold_run(group[0].layer, [ticket.expert for ticket in group])
        for ticket, (tensors, release) in zip(group, held):
            self.pool.assign(ticket.slot, tensors, release)

    def _copy(self, group: list[LoadTicket]) -> None:
        with self.source.borrow_run(group[0].layer, [ticket.expert for ticket in group]) as hosts:
            if not self.cuda:
                for ticket, host in zip(group, hosts):
                    for name, tensor in self.pool.view(ticket.slot).items():
                        tensor.copy_(host[name])
                return
            with torch.cuda.stream(self.copy_stream):
                for ticket, host in zip(group, hosts):
                    if ticket.after is not None:
                        self.copy_stream.wait_event(ticket.after)
                    for name, tensor in self.pool.view(ticket.slot).items():
                        tensor.copy_(host[name], non_blocking=True)
                loaded = torch.cuda.Event()
                loaded.record(self.copy_stream)
            loaded.synchronize()  # the host buffers go back only once the copies have read them

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put((-1, next(self._sequence), None))
        for thread in self._threads:
            thread.join(timeout=10)
        if self.in_place:
            self.pool.release_all()
