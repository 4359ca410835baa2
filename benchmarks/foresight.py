"""How close can any routing forecast bring a cache to Belady? The next-use policy given perfect
foresight of H tokens, on the shipped ESFT traces.

At each visit of a layer the policy is told, for each of that layer's experts, the exact step
of its next use if it falls within the next H tokens, and that it does not otherwise; beyond H
it keeps its fitted estimate. H = 0 is the shipped policy. A predictor of token t + 1's routing
can at best supply H = 1; in decoding, token t + 1 is not even chosen before token t's forward
ends. Each task is split by sequence: fitted on its first half, replayed on the second, one
global pool of `--budget` of the experts. `--rest-of-token` adds what a perfect cross-layer
predictor could tell: at each layer, which experts the running token uses at its later layers.

    python benchmarks/foresight.py [--horizons 0,1,2,3] [--budget 0.25] [--rest-of-token] [--plot foresight.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moe_runtime.belady import belady_misses, layer_keys
from moe_runtime.errors import run_script
from moe_runtime.policies import LRUPolicy, NextUsePolicy, ReuseModel
from moe_runtime.policies.next_use import tokens_to_next_use, used_matrix
from moe_runtime.simulator import replay
from moe_runtime.trace import Trace, load_trace

DATA = Path(__file__).resolve().parent.parent / "moe_runtime" / "data" / "routing" / "esft-vanilla-lite"
TASKS = ("intent", "law", "summary", "translation")


class ForesightPolicy(NextUsePolicy):
    """next-use, told at each layer visit which of the layer's experts return within H tokens, and when."""

    def __init__(self, trace: Trace, model: ReuseModel, horizon: int):
        super().__init__(trace.num_layers, trace.num_experts, model)
        self.horizon = horizon
        self.returns = tokens_until_next_use(trace)  # [T, L*E]

    def on_layer_start(self, layer: int, keys: list[int]) -> None:
        super().on_layer_start(layer, keys)
        if self.horizon == 0:
            return
        span = self._span(layer)
        wait = self.returns[self.token, span]
        known = wait <= self.horizon
        beyond = self.due[span] + self.num_layers * self.horizon  # the fitted estimate, past the horizon
        self._set_due(span, np.where(known, self.step + self.num_layers * wait, beyond))


class RestOfTokenPolicy(NextUsePolicy):
    """next-use, told at each layer visit which experts the running token uses at its later layers
    (the most a routing predictor could tell within the token), and that the others wait at
    least until the next token."""

    def __init__(self, trace: Trace, model: ReuseModel):
        super().__init__(trace.num_layers, trace.num_experts, model)
        self.used = used_matrix(trace)  # [T, L*E]

    def on_layer_start(self, layer: int, keys: list[int]) -> None:
        super().on_layer_start(layer, keys)
        for later in range(layer + 1, self.num_layers):
            span, chance = self._span(later), self.step + later - layer
            self._set_due(span, np.where(self.used[self.token, span], chance, np.maximum(self.due[span], chance + self.num_layers)))


def tokens_until_next_use(trace: Trace) -> np.ndarray:
    """[T, L*E] tokens from t until the key's next use in the same sequence (a large number if none)."""
    used = used_matrix(trace)
    bounds = zip(trace.seq_offsets[:-1], trace.seq_offsets[1:])
    return np.vstack([tokens_to_next_use(used[begin:end]) for begin, end in bounds])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--horizons", default="0,1,2,3", help="tokens of perfect foresight")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--plot", help="a PNG of loads per token against Belady per horizon")
    parser.add_argument("--rest-of-token", action="store_true", help="also tell the policy the running token's later layers")
    args = parser.parse_args()
    horizons = [int(h) for h in args.horizons.split(",")]
    ratios = {}
    for task in TASKS:
        fit, held = load_trace(DATA / f"{task}.npz").split(0.5)
        capacity = int(args.budget * held.num_layers * held.num_experts)
        optimum = belady_misses(layer_keys(held.expert_ids, held.num_experts), held.top_k, capacity)
        model = ReuseModel.fit(fit)
        loads = [replay(held, ForesightPolicy(held, model, h), capacity).loads for h in horizons]
        ratios[task] = [load / optimum for load in loads]
        cells = "  ".join(f"H={h}: {load / held.num_tokens:.1f} ({load / optimum:.2f}x)" for h, load in zip(horizons, loads))
        print(f"{task:12s} Belady {optimum / held.num_tokens:.1f} loads/tok | {cells}", flush=True)
        if args.rest_of_token:
            rest, lru = (replay(held, policy, capacity).loads for policy in (RestOfTokenPolicy(held, model), LRUPolicy()))
            against = "  ".join(f"H={h}: {load / lru:.3f}" for h, load in zip(horizons, loads))
            print(f"{'':12s} x LRU's loads | {against} | H=0 told the running token's later layers: {rest / lru:.3f}", flush=True)
    if args.plot:
        _plot(horizons, ratios, args.plot)


def _plot(horizons: list[int], ratios: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for task, values in ratios.items():
        axis.plot(horizons, values, marker="o", label=task)
    axis.axhline(1.3, color="grey", linestyle="--", label="issue 4 target (1.3x)")
    axis.axhline(1.0, color="black", label="Belady")
    axis.set_xticks(horizons)
    axis.set_xlabel("tokens of perfect routing foresight (0 = next-use as shipped)")
    axis.set_ylabel("loads per token / Belady's")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot -> {path}")


if __name__ == "__main__":
    run_script(main)
