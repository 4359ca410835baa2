"""Asynchronous loads of experts into slots: queue -> worker threads -> host tier -> copy -> event.

Misses go ahead of prefetches (a priority queue), several loads are in flight (one per worker),
and disk reads happen in the workers, so they overlap compute. On CUDA each copy runs on a
dedicated copy stream from pinned host memory, first waiting for the compute stream to finish
with the slot's previous expert, and records one event per load; the worker waits for that
event before it hands the host buffer back, so a finished ticket means the slot is complete and
the compute stream never waits for anything but the experts it needs.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field

import torch

from .pool import SlotPool
from .store import ExpertSource

MISS, PREFETCH = 0, 1  # queue priorities: lower runs first


@dataclass
class LoadTicket:
    """One load of expert (layer, expert) into `slot`; `wait()` blocks until it is there."""

    layer: int
    expert: int
    slot: int
    prefetch: bool
    error: BaseException | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error


class Loader:
    def __init__(self, source: ExpertSource, pool: SlotPool, *, workers: int = 2):
        self.source = source
        self.pool = pool
        self.cuda = pool.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device=pool.device) if self.cuda else None
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._sequence = itertools.count()
        self._threads = [threading.Thread(target=self._work, name=f"moe-loader-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, layer: int, expert: int, slot: int, *, prefetch: bool, after: torch.cuda.Event | None = None) -> LoadTicket:
        """Queue a load; `after` is a compute-stream event the copy must wait for (slot reuse)."""
        ticket = LoadTicket(layer, expert, slot, prefetch)
        self._queue.put((PREFETCH if prefetch else MISS, next(self._sequence), ticket, after))
        return ticket

    def _work(self) -> None:
        while True:
            _, _, ticket, after = self._queue.get()
            if ticket is None:
                return
            try:
                self._copy(ticket, after)
            except BaseException as error:  # handed to the waiting forward, which raises it
                ticket.error = error
            finally:
                ticket._done.set()

    def _copy(self, ticket: LoadTicket, after) -> None:
        destination = self.pool.view(ticket.slot)
        with self.source.borrow(ticket.layer, ticket.expert) as host:
            if not self.cuda:
                for name, tensor in destination.items():
                    tensor.copy_(host[name])
                return
            with torch.cuda.stream(self.copy_stream):
                if after is not None:
                    self.copy_stream.wait_event(after)
                for name, tensor in destination.items():
                    tensor.copy_(host[name], non_blocking=True)
                loaded = torch.cuda.Event()
                loaded.record(self.copy_stream)
            loaded.synchronize()

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put((-1, next(self._sequence), None, None))
        for thread in self._threads:
            thread.join(timeout=10)
