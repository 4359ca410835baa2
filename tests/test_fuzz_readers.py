"""Fuzzing our file readers: every damaged file loads as a valid object or raises our documented error.

For each reader (traces, predictor files, placement plans, pruning profiles) at least 200 seeded
cases: truncation at a random offset, flipped bytes, and re-written contents with wrong dtypes
and shapes, NaN and negative values, ids out of range, missing and mistyped fields. Each case
runs under a per-case time limit (SIGALRM), so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moe_runtime import load_trace
from moe_runtime.errors import InvalidFileError
from moe_runtime.placement import load_plan, save_plan
from moe_runtime.predictor import LearnedPredictor, load_predictor, make_predictor, save_predictor
from moe_runtime.pruning import load_profile

ROUTING = Path(__file__).parents[1] / "moe_runtime" / "data" / "routing" / "esft-vanilla-lite"
PROFILE = Path(__file__).parents[1] / "profiles" / "esft-vanilla-lite" / "law.json"
CASES = 200
CASE_SECONDS = 10


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"a reader ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_case(load, path: Path, data: bytes) -> str:
    """Write `data` to `path` and load it: 'ok', or 'refused' for our error; anything else fails."""
    path.write_bytes(data)
    with time_limit(CASE_SECONDS):
        try:
            load(path)
        except InvalidFileError as error:
            assert str(path) in str(error), f"the message does not name the file: {error}"
            return "refused"
    return "ok"


def byte_mutations(original: bytes, rng: np.random.Generator, count: int) -> list[bytes]:
    """Truncations at random offsets and 1-8 flipped bytes, half and half."""
    cases = []
    for index in range(count):
        if index % 2 == 0:
            cases.append(original[: int(rng.integers(0, len(original)))])
        else:
            data = bytearray(original)
            for position in rng.integers(0, len(data), size=int(rng.integers(1, 9))):
                data[position] ^= int(rng.integers(1, 256))
            cases.append(bytes(data))
    return cases


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def array_mutations(arrays: dict[str, np.ndarray], rng: np.random.Generator, count: int) -> list[bytes]:
    """The arrays re-saved with one of them damaged in content, dtype or shape, or dropped."""

    def damage(array: np.ndarray) -> np.ndarray | None:
        choice = int(rng.integers(0, 8))
        numeric = np.issubdtype(array.dtype, np.number)
        if choice == 0:
            return None  # dropped
        if choice == 1 and array.size and numeric:
            out = array.astype(np.float64).copy()
            out.flat[int(rng.integers(0, out.size))] = np.nan
            return out
        if choice == 2 and array.size and numeric:
            out = array.copy()
            out.flat[int(rng.integers(0, out.size))] = -1
            return out
        if choice == 3 and array.size and numeric:
            out = array.astype(np.int64)
            out.flat[int(rng.integers(0, out.size))] = 10**6
            return out
        if choice == 4:
            return array.reshape(-1)[: max(0, array.size - 1)]
        if choice == 5:
            return np.array("not a number")
        if choice == 6:
            return array.astype(np.float32) if np.issubdtype(array.dtype, np.integer) else np.zeros(array.shape, np.int64)
        return np.expand_dims(array, 0)

    cases = []
    names = sorted(arrays)
    for _ in range(count):
        mutated = dict(arrays)
        name = names[int(rng.integers(0, len(names)))]
        damaged = damage(arrays[name])
        if damaged is None:
            del mutated[name]
        else:
            mutated[name] = damaged
        cases.append(npz_bytes(mutated))
    return cases


def json_mutations(document, rng: np.random.Generator, count: int) -> list[bytes]:
    """The JSON with one value somewhere replaced (NaN, negative, huge id, wrong type) or removed."""
    replacements = [float("nan"), -1, 10**6, "x", None, [], {}, 1.5, [[-3]], True]

    def paths(node, prefix=()):
        yield prefix
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in children:
            yield from paths(child, (*prefix, key))

    every = [path for path in paths(document) if path]
    cases = []
    for _ in range(count):
        mutated = json.loads(json.dumps(document))
        path = every[int(rng.integers(0, len(every)))]
        parent = mutated
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and rng.random() < 0.2:
            del parent[path[-1]]
        else:
            parent[path[-1]] = replacements[int(rng.integers(0, len(replacements)))]
        cases.append(json.dumps(mutated).encode())
    return cases


def fuzz(load, path: Path, original: bytes, extra_cases: list[bytes], seed: int) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    cases = byte_mutations(original, rng, CASES // 2) + extra_cases
    assert len(cases) >= CASES
    outcomes = {"ok": 0, "refused": 0}
    for data in cases:
        outcomes[check_case(load, path, data)] += 1
    return outcomes


@pytest.fixture(scope="module")
def small_trace():
    return load_trace(ROUTING / "law.npz").select_sequences([0, 1, 2])


def test_trace_reader_survives_fuzzing(tmp_path, small_trace):
    original = small_trace.save(tmp_path / "small.npz").read_bytes()
    with np.load(tmp_path / "small.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    extra = array_mutations(arrays, np.random.default_rng(1), CASES // 2)
    outcomes = fuzz(load_trace, tmp_path / "case.npz", original, extra, seed=0)
    assert outcomes["refused"] >= CASES // 2, outcomes
    # the shipped file itself, truncated: always refused
    shipped = (ROUTING / "intent.npz").read_bytes()
    for cut in (0, 10, len(shipped) // 2, len(shipped) - 1):
        assert check_case(load_trace, tmp_path / "cut.npz", shipped[:cut]) == "refused"


@pytest.mark.parametrize("kind", ["popularity", "previous-token", "affinity", "learned"])
def test_predictor_reader_survives_fuzzing(tmp_path, small_trace, kind):
    few_layers = replace(small_trace, expert_ids=small_trace.expert_ids[:, :6], gate_weights=small_trace.gate_weights[:, :6])
    predictor = (LearnedPredictor((1,)) if kind == "learned" else make_predictor(kind)).fit(few_layers)
    original = save_predictor(predictor, tmp_path / "predictor.npz").read_bytes()
    with np.load(tmp_path / "predictor.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    extra = array_mutations(arrays, np.random.default_rng(2), CASES // 2)
    outcomes = fuzz(load_predictor, tmp_path / "case.npz", original, extra, seed=3)
    assert outcomes["refused"] >= CASES // 2, outcomes


def plans(layers: int = 4, experts: int = 8) -> list[dict]:
    shape = {"num_layers": layers, "num_experts": experts, "top_k": 2}
    order = [list(np.random.default_rng(layer).permutation(experts).tolist()) for layer in range(layers)]
    tiers = [["pinned", "dynamic", "host", "disk"] * (experts // 4) for _ in range(layers)]
    return [
        {"kind": "multi_gpu", "gpus": 2, "device_of": [[e // (experts // 2) for e in range(experts)]] * layers, "shape": shape},
        {"kind": "tiering", "tier_of": tiers, "dynamic_slots": 3, "disk_order": order, "shape": shape},
        {"kind": "disk_layout", "disk_order": order, "shape": shape},
    ]


@pytest.mark.parametrize("plan", plans(), ids=lambda plan: plan["kind"])
def test_plan_reader_survives_fuzzing(tmp_path, plan):
    original = save_plan(plan, tmp_path / "plan.json").read_bytes()
    extra = json_mutations(plan, np.random.default_rng(4), CASES // 2)
    outcomes = fuzz(load_plan, tmp_path / "case.json", original, extra, seed=5)
    assert outcomes["refused"] >= CASES // 2, outcomes


def test_profile_reader_survives_fuzzing(tmp_path):
    document = json.loads(PROFILE.read_text())
    document["opening"] = document["opening"][:2]  # keeps each case small; the structure is the same
    original = json.dumps(document).encode()
    extra = json_mutations(document, np.random.default_rng(6), CASES // 2)
    outcomes = fuzz(load_profile, tmp_path / "case.json", original, extra, seed=7)
    assert outcomes["refused"] >= CASES // 2, outcomes
