"""Faults in the middle of a layer leave the runtime usable: no leaked slot, no torn expert, no hang.

Each scenario injects a real fault into a real runtime (loader threads, a checkpoint read from
disk at the minimum budget), then checks the cache's invariants, runs a forward that must equal
the unwrapped model, and unwraps within 5 s.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

import pytest
import torch

import moe_runtime
import moe_runtime.runtime.executor as runtime_module
from moe_runtime.runtime.executor import RUNTIME_ATTR
from moe_runtime.tiny_models import tiny_model

PER_EXPERT = 3 * 64 * 48 * 4  # tiny olmoe: gate_up [96, 64] + down [64, 48], fp32
MINIMUM = 2 * PER_EXPERT  # top-2: one token's experts
IDS = torch.tensor([[3, 17, 42, 8, 99, 23, 5, 61]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("fault") / "olmoe"
    tiny_model("olmoe").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def expected():
    with torch.no_grad():
        return tiny_model("olmoe")(input_ids=IDS).logits


EXECUTIONS = ("device", "host", "hybrid")


def offloaded(checkpoint, execution="device"):
    """At the minimum budget, every expert read from the checkpoint on each miss (no RAM tier);
    `execution`: into a slot pool, in place, or both (execution.py)."""
    return moe_runtime.from_pretrained(checkpoint, budget=MINIMUM, device="cpu", host_budget=0, dtype=torch.float32, execution=execution)


@contextlib.contextmanager
def before_each_read(runtime, hook):
    """Within the block every read from the store first calls hook(), which may sleep, wait or
    raise a fault; the real read is back afterwards, whatever happened."""
    disk = runtime.source.disk
    real_read = disk.read_run

    def read(layer, experts, outs):
        hook()
        real_read(layer, experts, outs)

    disk.read_run = read
    try:
        yield
    finally:
        disk.read_run = real_read


def assert_usable_then_unwrap(model, expected) -> None:
    runtime = getattr(model, RUNTIME_ATTR)
    runtime.drain()
    runtime.cache.check_invariants()
    assert runtime.cache.in_use == set(), f"protected slots left behind: {runtime.cache.in_use}"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected)
    start = time.perf_counter()
    moe_runtime.unwrap(model)
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_an_exception_in_expert_compute_on_the_kth_forward(checkpoint, expected, monkeypatch, execution):
    model = offloaded(checkpoint, execution)
    real = runtime_module.experts_in_place
    calls = {"n": 0}

    def fails_on_the_7th(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise torch.OutOfMemoryError("injected: out of memory in expert compute")
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime_module, "experts_in_place", fails_on_the_7th)
    with torch.no_grad():
        for _ in range(3):
            with contextlib.suppress(torch.OutOfMemoryError):
                model(input_ids=IDS)
    assert calls["n"] > 7  # the forwards after the fault ran at the minimum budget
    monkeypatch.setattr(runtime_module, "experts_in_place", real)
    assert_usable_then_unwrap(model, expected)


@pytest.mark.parametrize("execution", ["device", "hybrid"])  # the executions with a pool to tear
def test_an_interrupt_while_a_slow_load_is_pending_never_tears_a_slot(checkpoint, expected, execution):
    model = offloaded(checkpoint, execution)
    runtime = getattr(model, RUNTIME_ATTR)
    for slot in range(runtime.num_slots):  # a slot computed before its load finished shows NaN
        for tensor in runtime.pool.view(slot).values():
            tensor.fill_(float("nan"))
    reading = threading.Event()

    def slow():
        reading.set()
        time.sleep(0.4)

    in_flight: set = set()  # tickets a worker is copying right now
    real_copy = runtime.loader._copy

    def tracked_copy(group):
        in_flight.update(map(id, group))
        try:
            real_copy(group)
        finally:
            in_flight.difference_update(map(id, group))

    runtime.loader._copy = tracked_copy

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    with before_each_read(runtime, slow):
        try:
            _interrupt_at(runtime, model, reading, in_flight)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        with torch.no_grad():  # still slow, with interrupted loads in flight: the answer is exact
            torch.testing.assert_close(model(input_ids=IDS).logits, expected)
    assert_usable_then_unwrap(model, expected)


def _interrupt_at(runtime, model, reading, in_flight) -> None:
    """Forwards interrupted by SIGALRM at several delays; after each, no slot being written is
    free or remapped, and the cache is consistent."""
    for delay in (0.1, 0.3, 0.5, 0.9):  # the interrupt lands while different loads are pending
        signal.setitimer(signal.ITIMER_REAL, delay)
        tickets = []
        real_submit = runtime.loader.submit
        runtime.loader.submit = lambda group: (tickets.extend(group), real_submit(group))
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            model(input_ids=IDS)
        runtime.loader.submit = real_submit
        assert reading.is_set()
        for ticket in tickets:  # a slot being written stays mapped to its expert, never free
            if id(ticket) in in_flight:
                key = ticket.layer * runtime.num_experts + ticket.expert
                assert runtime.cache.key_of[ticket.slot] == key and ticket.slot not in runtime.cache.free
        runtime.cache.check_invariants()
        assert runtime.cache.in_use == set()


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_read_errors_in_the_middle_of_a_layer_100_times(checkpoint, expected, execution):
    model = offloaded(checkpoint, execution)
    runtime = getattr(model, RUNTIME_ATTR)
    reads = {"n": 0}

    def every_third_read_fails():
        reads["n"] += 1
        if reads["n"] % 3 == 0:
            raise OSError(5, "injected: Input/output error")

    failures = 0
    with before_each_read(runtime, every_third_read_fails):
        for _ in range(100):
            try:
                with torch.no_grad():
                    model(input_ids=IDS[:, :2])
            except OSError:
                failures += 1
            runtime.cache.check_invariants()
            assert runtime.cache.in_use == set()
    assert failures >= 50
    stats = moe_runtime.stats(model)
    per_layer = stats["per_layer"]
    assert stats["hits"] + stats["misses"] == sum(layer["hits"] + layer["misses"] for layer in per_layer)
    assert stats["loads"] <= stats["misses"] and stats["bytes_loaded"] == stats["loads"] * PER_EXPERT
    assert_usable_then_unwrap(model, expected)


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_a_failed_acquire_rolls_back_the_loads_it_had_not_submitted(checkpoint, expected, monkeypatch, execution):
    model = offloaded(checkpoint, execution)
    runtime = getattr(model, RUNTIME_ATTR)
    loader = runtime.loader
    real_submit = loader.submit
    calls = {"n": 0}

    def submit_fails_once(tickets):
        calls["n"] += 1
        if calls["n"] == 2 and tickets:
            raise RuntimeError("injected: the source could not plan its reads")
        real_submit(tickets)

    loader.submit = submit_fails_once
    with pytest.raises(RuntimeError, match="injected"), torch.no_grad():
        model(input_ids=IDS)
    runtime.cache.check_invariants()
    assert runtime.cache.tickets == {} and runtime.cache.in_use == set()
    loader.submit = real_submit
    assert_usable_then_unwrap(model, expected)


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_unwrap_names_a_stuck_load_instead_of_hanging(checkpoint, expected, execution):
    model = offloaded(checkpoint, execution)
    runtime = getattr(model, RUNTIME_ATTR)
    release = threading.Event()
    with before_each_read(runtime, lambda: release.wait(10)):
        runtime.prefetch(0, [0])  # in flight, held by the stuck read
        start = time.perf_counter()
        with pytest.raises(TimeoutError, match="load of expert 0 of MoE layer 0 .* has not finished"):
            runtime.drain(timeout=0.5)
        assert time.perf_counter() - start < 2.0
        release.set()
    assert_usable_then_unwrap(model, expected)


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_a_background_load_that_failed_is_loaded_again_on_demand(checkpoint, expected, execution):
    model = offloaded(checkpoint, execution)
    runtime = getattr(model, RUNTIME_ATTR)
    def fails():
        raise OSError(5, "injected: Input/output error")

    with before_each_read(runtime, fails):
        assert runtime.prefetch(0, [0, 1]) == 2  # both fail in the background
        runtime.drain()
    assert_usable_then_unwrap(model, expected)  # the old errors are not raised: the experts load again
