"""The global slot cache: which expert sits in which slot, what to evict, what to load.

acquire(layer, experts) -> hits used in place, misses loaded (blocking, ahead of prefetches)
-> slots; release(layer) -> the layer's experts become evictable again; prefetch(layer, experts)
-> loads issued in the background into free or evicted slots, never blocking.

Keys are `layer * E + expert`. Experts in use by the running layer, pinned experts and experts
still loading are never evicted; the policy never sees pinned keys, so no victim scan walks
past them. Transient experts (a placement plan's host tier) leave their slot as soon as their
layer releases them. All state changes happen on the caller's thread; workers only copy.

Exception safety: a failed acquire or prefetch (no slot, a failed read, an interrupt) rolls back
every load it had not handed to the loader; a failed load leaves the cache as if it had never
been issued, then raises; a load still in flight when the waiting thread is interrupted keeps
its slot (mapped, loading, never evictable) until the worker has finished writing it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .loader import LoadTicket, Loader
from .policies import EvictionPolicy, NoVictimError
from .stats import RuntimeStats


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
        self.num_experts = num_experts
        self.num_slots = num_slots
        self.policy = policy
        self.loader = loader
        self.stats = stats
        self.slot_of: dict[int, int] = {}
        self.key_of: list[int | None] = [None] * num_slots
        self.free: list[int] = list(range(num_slots - 1, -1, -1))
        self.tickets: dict[int, LoadTicket] = {}  # loads not yet confirmed complete
        self.prefetched: set[int] = set()  # loaded by a prefetch, not yet used
        self.in_use: set[int] = set()
        self.pinned: set[int] = set(pinned)
        self.transient: frozenset[int] = frozenset(transient)
        self.release_events: dict[int, torch.cuda.Event] = {}  # slot -> compute done with it

    # ------------------------------------------------------------------ queries
    def key(self, layer: int, expert: int) -> int:
        return layer * self.num_experts + expert

    def resident(self, layer: int) -> list[int]:
        """Experts of `layer` that sit in a slot (loaded or loading)."""
        low = layer * self.num_experts
        return sorted(key - low for key in self.slot_of if low <= key < low + self.num_experts)

    def _loading(self, key: int) -> bool:
        ticket = self.tickets.get(key)
        return ticket is not None and not ticket.done()

    def _evictable(self, key: int) -> bool:
        return key not in self.in_use and key not in self.pinned and not self._loading(key)

    # ------------------------------------------------------------------ demand path
    def start_layer(self, layer: int, experts: Sequence[int]) -> None:
        """Tell the policy which experts this layer step uses (once per step, before any wave)."""
        self.policy.on_layer_start(layer, [self.key(layer, expert) for expert in experts])

    def acquire(self, layer: int, experts: Sequence[int]) -> list[int]:
        """Slots holding `experts` of `layer`, loading the missing ones (blocking).

        The experts stay protected from eviction until `release(layer)`.
        """
        counters = self.stats.layers[layer]
        keys = [self.key(layer, expert) for expert in experts]
        if len(set(keys) - self.pinned) > self.num_slots - len(self.pinned):
            raise AssertionError(f"wave of {len(keys)} experts exceeds the {self.num_slots} slots")
        self.in_use.update(keys)
        misses: list[LoadTicket] = []
        try:
            for key in keys:
                if key in self.slot_of:
                    counters.hits += 1
                    if key in self.prefetched:
                        self.prefetched.discard(key)
                        counters.prefetches_used += 1
                        counters.late_prefetches += self._loading(key)
                else:
                    counters.misses += 1
                    misses.append(self._start_load(layer, key, prefetch=False))
                if key not in self.pinned:
                    self.policy.on_access(key)
            self.loader.submit(misses)  # all or nothing
        except BaseException:
            self._roll_back(misses)
            self.in_use.difference_update(keys)
            raise
        self._wait(keys, counters)
        return [self.slot_of[key] for key in keys]

    def release(self, layer: int, experts: Sequence[int], compute_done: torch.cuda.Event | None = None) -> None:
        """The layer finished with these experts; on CUDA `compute_done` guards slot reuse."""
        for expert in experts:
            key = self.key(layer, expert)
            self.in_use.discard(key)
            slot = self.slot_of.get(key)
            if slot is None:
                continue
            if compute_done is not None:
                self.release_events[slot] = compute_done
            if key in self.transient and not self._loading(key):  # loaded on use, never kept
                self._evict(key)
                self.free.append(slot)

    def _wait(self, keys: list[int], counters) -> None:
        """Block until every key's load is in its slot; on a failed load or an interrupt, settle and raise."""
        started = time.perf_counter()
        try:
            for key in keys:
                ticket = self.tickets.get(key)
                if ticket is not None:
                    ticket.wait()  # raises the load's error, or whatever interrupts this thread
                    del self.tickets[key]
        except BaseException:
            self._settle(keys)
            self.in_use.difference_update(keys)
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
    def prefetch(self, layer: int, experts: Sequence[int]) -> int:
        """Start background loads of those `experts` of `layer` that are not resident.

        Never blocks and never evicts a protected expert; returns how many loads it issued.
        """
        loads: list[LoadTicket] = []
        try:
            for expert in experts:
                key = self.key(layer, expert)
                if key in self.slot_of:
                    continue
                if not self.free:
                    try:
                        self.policy.choose_victim(self._evictable)
                    except NoVictimError:
                        break
                loads.append(self._start_load(layer, key, prefetch=True))
                self.prefetched.add(key)
                self.stats.layers[layer].prefetches_issued += 1
            self.loader.submit(loads)  # all or nothing
        except BaseException:
            self.stats.layers[layer].prefetches_issued -= len(loads)
            self._roll_back(loads)
            raise
        return len(loads)

    # ------------------------------------------------------------------ slots
    def _start_load(self, layer: int, key: int, *, prefetch: bool) -> LoadTicket:
        """Map `key` to a slot and return its ticket, pending until the caller submits it."""
        slot = self._take_slot()
        self.slot_of[key] = slot
        self.key_of[slot] = key
        if key not in self.pinned:
            self.policy.on_insert(key)
        counters = self.stats.layers[layer]
        counters.loads += 1
        counters.bytes_loaded += self.loader.pool.bytes_per_slot
        ticket = LoadTicket(layer, key - layer * self.num_experts, slot, prefetch, after=self.release_events.pop(slot, None))
        self.tickets[key] = ticket
        return ticket

    def _take_slot(self) -> int:
        if self.free:
            return self.free.pop()
        while True:
            try:
                victim = self.policy.choose_victim(self._evictable)
                break
            except NoVictimError:
                loading = [t for k, t in self.tickets.items() if k not in self.in_use and t.submitted and not t.done()]
                if not loading:
                    raise AssertionError("no evictable slot: every slot is in use by the running layer or pinned") from None
                loading[0]._done.wait()  # a prefetch still in flight holds the slot we need
        slot = self.slot_of[victim]
        self._evict(victim)
        return slot

    def _evict(self, key: int) -> None:
        slot = self.slot_of.pop(key)
        self.key_of[slot] = None
        if key not in self.pinned:
            self.policy.on_evict(key)
        self.prefetched.discard(key)
        self.tickets.pop(key, None)  # only finished loads are evictable (a failed prefetch included)

    def _forget(self, key: int) -> None:
        """Undo a load that failed or was never submitted: the key leaves the cache, its slot is
        free again, and the load is not counted (nothing moved)."""
        slot = self.slot_of[key]
        counters = self.stats.layers[key // self.num_experts]
        counters.loads -= 1
        counters.bytes_loaded -= self.loader.pool.bytes_per_slot
        self._evict(key)
        self.free.append(slot)

    def _roll_back(self, tickets: list[LoadTicket]) -> None:
        """Undo loads this call mapped but never handed to a worker (no thread touches their slots)."""
        for ticket in tickets:
            assert not ticket.submitted, "a submitted load cannot be rolled back"
            self._forget(self.key(ticket.layer, ticket.expert))

    def check_invariants(self) -> None:
        """Internal consistency (tests call this after every scenario)."""
        assert len(self.slot_of) + len(self.free) == self.num_slots, "every slot is either mapped or free"
        assert set(self.slot_of.values()).isdisjoint(self.free), "a free slot is still mapped"
        for key, slot in self.slot_of.items():
            assert self.key_of[slot] == key, f"slot {slot} maps back to {self.key_of[slot]}, not {key}"
        assert set(self.tickets) <= set(self.slot_of), "a pending load targets an unmapped key"
        assert self.prefetched <= set(self.slot_of), "a prefetched key is not resident"
        assert all(ticket.submitted for ticket in self.tickets.values()), "a load was mapped but never submitted"
