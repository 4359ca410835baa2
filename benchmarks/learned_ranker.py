"""Would a richer learned reuse model evict better than next-use's cells? A gradient-boosted
classifier against fitted next-use, on the held-out halves of the shipped ESFT traces.

next-use ranks residents by an expected wait looked up in cells (popularity x age x recent uses
x transition forecast) fitted on a trace. Here scikit-learn's HistGradientBoostingClassifier,
fitted on the same fit half (the first half of each task's sequences), predicts for every
(token, layer, expert) whether the expert is used again at the next token, from more than the
cells see: the expert's use at each of its layer's last HISTORY tokens, its age and uses in the
recent window (next-use's own measures), its popularity and transition forecast from the fit
half, and the layer. The cache then evicts the resident whose expected next use, steps to its
layer's next visit plus (1/p - 1) tokens (a geometric wait), is latest. Replayed on the held-out
half through the simulator, one global pool of `--budget` of the experts, against LRU, fitted
next-use and Belady's MIN (all as multiples of LRU's loads); and the same policy told each
expert's true tokens to its next use (the check that the ranking, not the policy, limits it).

    python benchmarks/learned_ranker.py [--budget 0.1] [--tasks intent,law,summary,translation]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from foresight import tokens_until_next_use
from sklearn.ensemble import HistGradientBoostingClassifier
from tqdm.auto import tqdm

from moe_runtime.belady import belady_misses, layer_keys
from moe_runtime.errors import run_script
from moe_runtime.policies import LRUPolicy, NextUsePolicy, ReuseModel
from moe_runtime.policies.base import EvictionPolicy, NoVictimError
from moe_runtime.policies.next_use import expert_transitions, reuse_history, transition_forecast, used_matrix
from moe_runtime.simulator import replay
from moe_runtime.trace import Trace, load_trace

DATA = Path(__file__).resolve().parent.parent / "moe_runtime" / "data" / "routing" / "esft-vanilla-lite"
HISTORY = 16  # tokens of each expert's own use history among the features
TRAINING_ROWS = 800_000  # (token, key) rows sampled from the fit half: a fit of 10-20 s on 2 cores


def features(trace: Trace, popularity: np.ndarray, transitions: np.ndarray) -> np.ndarray:
    """[T, L*E, F] fp32 for every token and key, known once the token has passed the key's layer:
    use at each of the last HISTORY tokens, age, uses in next-use's window (per sequence), the fit
    half's popularity [L*E] and transition forecast (transitions [L, E, E]), the layer."""
    used = used_matrix(trace)
    columns = [_shifted(used, trace.seq_offsets, lag) for lag in range(HISTORY)]
    histories = [reuse_history(used[begin:end])[:2] for begin, end in zip(trace.seq_offsets[:-1], trace.seq_offsets[1:])]
    columns += [np.vstack([history[0] for history in histories]), np.vstack([history[1] for history in histories])]
    columns += [np.broadcast_to(popularity, used.shape), transition_forecast(trace, transitions)]
    columns.append(np.broadcast_to(np.repeat(np.arange(trace.num_layers), trace.num_experts), used.shape))
    return np.stack([np.asarray(column, dtype=np.float32) for column in columns], axis=-1)


def _shifted(used: np.ndarray, offsets: np.ndarray, lag: int) -> np.ndarray:
    """[T, N] use flags `lag` tokens earlier in the same sequence (False before its start)."""
    out = np.zeros_like(used)
    out[lag:] = used[: len(used) - lag]
    for start in offsets[:-1]:
        out[start : start + lag] = False
    return out


def fitted_classifier(fit: Trace, popularity: np.ndarray, transitions: np.ndarray, seed: int = 0) -> HistGradientBoostingClassifier:
    known = features(fit, popularity, transitions)
    inputs = known.reshape(-1, known.shape[-1])
    targets = (tokens_until_next_use(fit) == 1).reshape(-1)  # used again at the next token
    rows = np.random.default_rng(seed).choice(len(targets), min(len(targets), TRAINING_ROWS), replace=False)
    return HistGradientBoostingClassifier(max_iter=200, max_leaf_nodes=63, random_state=seed).fit(inputs[rows], targets[rows])


class ExpectedWaitPolicy(EvictionPolicy):
    """Evicts the resident with the latest expected next use, from per-token probabilities
    [T, L*E] of each key's use at the next token (known once the token passed the key's layer)."""

    name = "learned ranker"
    tracks_accesses = False

    def __init__(self, probabilities: np.ndarray, num_layers: int, num_experts: int):
        self.probabilities = np.maximum(probabilities, 1e-3)
        self.num_layers, self.num_experts = num_layers, num_experts
        self.token, self.layer = -1, 0
        self.residents: set[int] = set()

    def on_layer_start(self, layer: int, keys: list[int]) -> None:
        self.token += layer == 0
        self.layer = layer

    def on_insert(self, key: int) -> None:
        self.residents.add(key)

    def on_access(self, key: int) -> None:
        pass

    def on_evict(self, key: int) -> None:
        self.residents.discard(key)

    def choose_victim(self, is_evictable: Callable[[int], bool]) -> int:
        keys = np.fromiter((key for key in self.residents if is_evictable(key)), dtype=np.int64)
        if len(keys) == 0:
            raise NoVictimError("every resident expert is protected")
        layers = keys // self.num_experts
        passed = layers < self.layer  # this token already told us about them
        known_at = np.where(passed, self.token, self.token - 1)
        chance = np.where(known_at >= 0, self.probabilities[np.maximum(known_at, 0), keys], 0.1)
        steps_to_visit = (layers - self.layer) % self.num_layers
        return int(keys[np.argmax(steps_to_visit + (1 / chance - 1) * self.num_layers)])


def measure(task: str, budget: float) -> dict[str, float]:
    fit, held = load_trace(DATA / f"{task}.npz").split(0.5)
    capacity = int(budget * held.num_layers * held.num_experts)
    used = used_matrix(fit)
    popularity, transitions = used.mean(axis=0), expert_transitions(fit, used)
    start = time.perf_counter()
    classifier = fitted_classifier(fit, popularity, transitions)
    seconds = time.perf_counter() - start
    held_features = features(held, popularity, transitions)
    probabilities = classifier.predict_proba(held_features.reshape(-1, held_features.shape[-1]))[:, 1].reshape(held.num_tokens, -1)
    policies = {
        "lru": LRUPolicy(), "fitted next-use": NextUsePolicy(held.num_layers, held.num_experts, ReuseModel.fit(fit)),
        "learned ranker": ExpectedWaitPolicy(probabilities, held.num_layers, held.num_experts),
        "told": ExpectedWaitPolicy(1.0 / tokens_until_next_use(held), held.num_layers, held.num_experts),  # wait = the true distance
    }
    loads = {name: replay(held, policy, capacity).loads for name, policy in policies.items()}
    loads["belady"] = belady_misses(layer_keys(held.expert_ids, held.num_experts), held.top_k, capacity)
    return {"lru_per_token": loads["lru"] / held.num_tokens, "fit_s": seconds, **{name: count / loads["lru"] for name, count in loads.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.1, help="share of the experts the pool holds")
    parser.add_argument("--tasks", default="intent,law,summary,translation")
    args = parser.parse_args()
    if not 0 < args.budget < 1:
        parser.error("--budget must be a share between 0 and 1, e.g. 0.1")
    print(f"held-out halves, {args.budget:.0%} of the experts: loads per token, LRU's and the rest as multiples of it")
    print(f"{'task':<12} {'LRU':>6} {'MIN':>6} {'next-use':>8} {'learned':>8} {'told':>6} {'fit s':>6}")
    for task in tqdm(args.tasks.split(","), desc="tasks", leave=False):
        row = measure(task, args.budget)
        tqdm.write(f"{task:<12} {row['lru_per_token']:>6.1f} {row['belady']:>6.3f} {row['fitted next-use']:>8.3f} {row['learned ranker']:>8.3f} {row['told']:>6.3f} {row['fit_s']:>6.1f}")


if __name__ == "__main__":
    run_script(main)
