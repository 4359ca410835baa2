"""One offloaded model serving several threads at once: every answer is the one it gets alone.

A real runtime at the minimum budget with every miss read from disk, four generating threads and
one thread that reads and resets the stats and runs a forward at random moments. Bounded: a
fixed number of generations, and each thread is joined with a time limit.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

import moe_runtime
from moe_runtime.runtime.executor import RUNTIME_ATTR
from moe_runtime.tiny_models import tiny_model

PER_EXPERT = 3 * 64 * 48 * 4  # tiny olmoe, fp32
MINIMUM = 2 * PER_EXPERT  # one token's top-2
THREADS, GENERATIONS, NEW_TOKENS = 4, 10, 16
JOIN_SECONDS = 300


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("concurrent") / "olmoe"
    tiny_model("olmoe").save_pretrained(path)
    return path


def prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 250, (1, int(n)), generator=generator) for n in torch.randint(3, 9, (THREADS * GENERATIONS,), generator=generator)]


def greedy(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


def run_threads(targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_SECONDS)
        assert not thread.is_alive(), "a thread did not finish in time (deadlock?)"
    return errors


@pytest.mark.slow
def test_four_threads_generating_on_one_model_get_their_own_answers(checkpoint):
    reference_model = tiny_model("olmoe")
    inputs = prompts()
    expected = [greedy(reference_model, ids) for ids in inputs]
    model = moe_runtime.from_pretrained(checkpoint, budget=MINIMUM, device="cpu", host_budget=0, dtype=torch.float32)
    runtime = getattr(model, RUNTIME_ATTR)
    uses = {"since_reset": 0}
    run_layer = runtime._run_layer

    def counted(layer, hidden, top_k_index, top_k_weights):  # runs under the runtime's lock
        uses["since_reset"] += len(torch.unique(top_k_index))
        return run_layer(layer, hidden, top_k_index, top_k_weights)

    runtime._run_layer = counted
    outputs: dict[int, torch.Tensor] = {}
    done = threading.Event()

    def generator(worker: int):
        def work():
            for index in range(worker, len(inputs), THREADS):
                outputs[index] = greedy(model, inputs[index])
        return work

    def meddler():
        rng = random.Random(1)
        while not done.wait(rng.uniform(0.0, 0.05)):
            snapshot = moe_runtime.stats(model)
            assert snapshot["hits"] + snapshot["misses"] == sum(layer["hits"] + layer["misses"] for layer in snapshot["per_layer"])
            if rng.random() < 0.3:
                with runtime.lock:
                    moe_runtime.reset_stats(model)
                    uses["since_reset"] = 0
            if rng.random() < 0.3:
                with torch.no_grad():
                    torch.testing.assert_close(model(input_ids=inputs[0]).logits, reference_model(input_ids=inputs[0]).logits)

    meddling = threading.Thread(target=meddler)
    meddling.start()
    errors = run_threads([generator(worker) for worker in range(THREADS)])
    done.set()
    meddling.join(JOIN_SECONDS)
    assert errors == []
    assert sorted(outputs) == list(range(len(inputs)))
    for index, ids in enumerate(expected):
        assert torch.equal(outputs[index], ids), f"generation {index} differs from its sequential answer"
    final = moe_runtime.stats(model)
    assert final["hits"] + final["misses"] == uses["since_reset"]  # every expert use counted once
    runtime.cache.check_invariants()
    assert runtime.cache.in_use == set()
    moe_runtime.unwrap(model)


def test_two_runtimes_over_one_checkpoint_do_not_interfere(checkpoint):
    reference = tiny_model("olmoe")
    first = moe_runtime.from_pretrained(checkpoint, budget=MINIMUM, device="cpu", host_budget=0, dtype=torch.float32, execution="device")
    second = moe_runtime.from_pretrained(checkpoint, budget=0.5, device="cpu", host_budget=0, dtype=torch.float32)  # in place
    inputs = prompts()[:6]
    answers: dict[tuple[int, int], torch.Tensor] = {}

    def use(which: int, model):
        def work():
            for index, ids in enumerate(inputs):
                answers[which, index] = greedy(model, ids)
        return work

    assert run_threads([use(0, first), use(1, second)]) == []
    for index, ids in enumerate(inputs):
        expected = greedy(reference, ids)
        assert torch.equal(answers[0, index], expected) and torch.equal(answers[1, index], expected)
    a, b = moe_runtime.stats(first), moe_runtime.stats(second)
    assert a["num_slots"] == 2 and b["num_slots"] == 12  # each pool is what its own budget says
    assert a["slot_pool_bytes"] == 2 * PER_EXPERT and b["slot_pool_bytes"] == 0  # in place: no pool
    moe_runtime.reset_stats(first)
    assert moe_runtime.stats(first)["misses"] == 0 and moe_runtime.stats(second)["misses"] == b["misses"] > 0
    moe_runtime.unwrap(first)
    moe_runtime.unwrap(second)
