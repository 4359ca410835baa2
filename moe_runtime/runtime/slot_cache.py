"""The live slot cache: the cache core's decisions, carried out by the loader's threads.

acquire(layer, experts) -> core.acquire (hits in place, misses mapped to slots) -> tickets for
the misses, submitted to the loader (misses ahead of prefetches) -> wait -> slots;
release(layer, experts) -> core.release; prefetch(layer, experts) -> core.prefetch -> tickets
submitted in the background, never blocking.

Residency, eviction, protection, pinned and transient experts and the counters live in the
thread-free CacheCore (cache_core.py), which the trace simulator uses too. This class adds what
moving bytes needs: a ticket per load in flight (a key whose load is in flight is never
evicted), waiting, and on CUDA the event after which a slot may be overwritten. All state
changes happen on the caller's thread; workers only copy.

Exception safety: a failed acquire or prefetch (no slot, a failed read, an interrupt) rolls back
every load it had not handed to the loader; a failed load leaves the cache as if it had never
been issued, then raises; a load still in flight when the waiting thread is interrupted keeps
its slot (mapped, loading, never evictable) until the worker has finished writing it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from .cache_core import Access, CacheCore
from .expert_loader import LoadTicket, Loader
from ..policies import EvictionPolicy
from ..stats import RuntimeStats


class SlotCache:
    def __init__(
        self,
        *,
        num_experts: int,
        num_slots: int,
        policy: EvictionPolicy,
        loader: Loader,
        stats: RuntimeStats,
        pinned: Sequence[int] = (),
        transient: Sequence[int] = (),
    ):
        self.loader = loader
        self.stats = stats
        self.tickets: dict[int, LoadTicket] = {}  # loads not yet confirmed complete
        self.release_events: dict[int, torch.cuda.Event] = {}  # slot -> compute done with it
        self.core = CacheCore(
            num_experts=num_experts, num_slots=num_slots, policy=policy, stats=stats, pinned=pinned, transient=transient,
            busy=self._loading, wait_for_slot=self._wait_for_a_prefetch, on_evicted=lambda key: self.tickets.pop(key, None),
        )

    # ------------------------------------------------------------------ views of the core
    policy = property(lambda self: self.core.policy)
    pinned = property(lambda self: self.core.pinned)
    transient = property(lambda self: self.core.transient)
    slot_of = property(lambda self: self.core.slot_of)
    key_of = property(lambda self: self.core.key_of)
    free = property(lambda self: self.core.free)
    in_use = property(lambda self: self.core.protected)

    def resident(self, layer: int) -> list[int]:
        return self.core.resident(layer)

    def _loading(self, key: int) -> bool:
        ticket = self.tickets.get(key)
        return ticket is not None and not ticket.done()

    # ------------------------------------------------------------------ demand path
    def start_layer(self, layer: int, experts: Sequence[int]) -> None:
        self.core.start_layer(layer, experts)

    def acquire(self, layer: int, experts: Sequence[int]) -> list[int]:
        """Slots holding `experts` of `layer`, loading the missing ones (blocking).

        The experts stay protected from eviction until `release(layer)`.
        """
        slots = self.begin_acquire(layer, experts)
        self.finish_acquire(layer, experts)
        return slots

    def begin_acquire(self, layer: int, experts: Sequence[int]) -> list[int]:
        """The slots `experts` of `layer` will be in, their loads started (not waited for): the
        caller may work meanwhile, then calls finish_acquire. Protected until `release(layer)`.
        A background load (prefetch, admission) of one of them that failed earlier is forgotten
        first, so this step loads the expert again instead of raising an old error."""
        had_tickets = bool(self.tickets)  # none: nothing in flight or failed (every decode step at budget 1.0)
        if had_tickets:
            for key in (self.core.key(layer, expert) for expert in experts):
                ticket = self.tickets.get(key)
                if ticket is not None and ticket.prefetch and ticket.done() and ticket.error is not None:
                    self._forget(key)
        accesses = self.core.acquire(layer, experts)
        keys = [access.key for access in accesses]
        if had_tickets:
            self.stats.layers[layer].late_prefetches += sum(access.prefetched and self._loading(access.key) for access in accesses)
        misses = [self._ticket(layer, access, prefetch=False) for access in accesses if not access.hit]
        try:
            self.loader.submit(misses)  # all or nothing
        except BaseException:
            self._roll_back(misses)
            self.core.protected.difference_update(keys)
            raise
        return [access.slot for access in accesses]

    def finish_acquire(self, layer: int, experts: Sequence[int]) -> None:
        """Block until the experts of a begin_acquire are in their slots (see `_wait`)."""
        if not self.tickets:  # no load in flight, none failed: nothing to wait for or settle
            return
        self._wait([self.core.key(layer, expert) for expert in experts], self.stats.layers[layer])

    def loads_in_flight(self) -> int:
        return sum(not ticket.done() for ticket in self.tickets.values())

    def release(self, layer: int, experts: Sequence[int], compute_done: torch.cuda.Event | None = None) -> None:
        """The layer finished with these experts; on CUDA `compute_done` guards slot reuse."""
        for slot in self.core.release(layer, experts):
            if compute_done is not None:
                self.release_events[slot] = compute_done

    def forecast(self, layer: int, lookahead: int, probabilities: np.ndarray) -> None:
        """A predictor's forecast [E] for `layer`, `lookahead` layers ahead (CacheCore.forecast)."""
        self.core.forecast(layer, lookahead, probabilities)

    def _wait(self, keys: list[int], counters) -> None:
        """Block until every key's load has finished, then raise the first failed load's error
        (the failed keys forgotten); an interrupt while waiting settles what finished and raises."""
        started = time.perf_counter()
        try:
            for key in keys:
                ticket = self.tickets.get(key)
                if ticket is not None:
                    ticket.join()  # whatever interrupts this thread propagates from here
            failure = next((self.tickets[key].error for key in keys if key in self.tickets and self.tickets[key].error), None)
            self._settle(keys)
            if failure is not None:
                raise failure
        except BaseException:
            self._settle(keys)
            self.core.protected.difference_update(keys)
            raise
        finally:
            counters.stall_seconds += time.perf_counter() - started

    def _settle(self, keys: list[int]) -> None:
        """After a failed wait: finished loads are kept (or forgotten if they failed); a load
        still in flight keeps its slot, mapped and loading, so no other load can reuse it."""
        for key in keys:
            ticket = self.tickets.get(key)
            if ticket is None or not ticket.done():
                continue
            if ticket.error is not None:
                self._forget(key)
            else:
                del self.tickets[key]

    # ------------------------------------------------------------------ prefetch path
    def prefetch(self, layer: int, experts: Sequence[int], *, admission: bool = False, probabilities: dict[int, float] | None = None) -> int:
        """Start background loads of those `experts` of `layer` that are not resident (forecast
        ones, or with `admission` ones the CPU just computed).

        Never blocks and never evicts a protected expert; returns how many loads it issued.
        """
        placed = self.core.prefetch(layer, experts, admission=admission, probabilities=probabilities)
        loads = [self._ticket(layer, access, prefetch=True) for access in placed]
        try:
            self.loader.submit(loads)  # all or nothing
        except BaseException:
            self.core.count_prefetches(layer, -len(loads), admission=admission)
            self._roll_back(loads)
            raise
        return len(loads)

    # ------------------------------------------------------------------ loads
    def _ticket(self, layer: int, access: Access, *, prefetch: bool) -> LoadTicket:
        """The pending load of a key the core just mapped to a slot (submitted by the caller)."""
        self.stats.layers[layer].bytes_loaded += self.loader.bytes_per_load
        expert = access.key - layer * self.core.num_experts
        ticket = LoadTicket(layer, expert, access.slot, prefetch, after=self.release_events.pop(access.slot, None))
        self.tickets[access.key] = ticket
        return ticket

    def _forget(self, key: int) -> None:
        """Undo a load that failed or was never submitted."""
        self.stats.layers[key // self.core.num_experts].bytes_loaded -= self.loader.bytes_per_load
        self.core.forget([key])

    def _roll_back(self, tickets: list[LoadTicket]) -> None:
        """Undo loads this call mapped but never handed to a worker (no thread touches their slots)."""
        for ticket in tickets:
            assert not ticket.submitted, "a submitted load cannot be rolled back"
            if ticket.after is not None:  # the slot's previous expert may still be computing
                self.release_events[ticket.slot] = ticket.after
            self._forget(self.core.key(ticket.layer, ticket.expert))

    def _wait_for_a_prefetch(self) -> bool:
        """Every slot is protected or loading: wait for a prefetch in flight (not one this layer needs)."""
        loading = [t for k, t in self.tickets.items() if k not in self.core.protected and t.submitted and not t.done()]
        if not loading:
            return False
        loading[0].join()
        return True

    def check_invariants(self) -> None:
        """Internal consistency (tests call this after every scenario)."""
        self.core.check_invariants()
        assert set(self.tickets) <= set(self.core.slot_of), "a pending load targets an unmapped key"
        assert all(ticket.submitted for ticket in self.tickets.values()), "a load was mapped but never submitted"
