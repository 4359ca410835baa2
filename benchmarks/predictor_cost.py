"""Cost of one forecast at batch 1, on one CPU core: microseconds per token per layer, over
real held-out tokens' routing (predictors fitted on the other half of the sequences).

    OMP_NUM_THREADS=1 python benchmarks/predictor_cost.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from moe_runtime.errors import run_script  # noqa: E402
from moe_runtime.predictor import RoutingContext, make_predictor  # noqa: E402
from moe_runtime.predictor.context import context_from_trace  # noqa: E402
from moe_runtime.trace import load_traces  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "moe_runtime", "data", "routing", "esft-vanilla-lite")


def main() -> None:
    trace = load_traces([os.path.join(DATA, f"{task}.npz") for task in ("intent", "law", "summary", "translation")])
    fit, held_out = trace.split(0.5)
    context = context_from_trace(held_out)
    tokens = np.random.default_rng(0).choice(held_out.num_tokens, size=64, replace=False)
    one_token = [RoutingContext(context.current[t : t + 1], context.previous[:, t : t + 1]) for t in tokens]
    for kind in ("popularity", "previous-token", "affinity", "learned"):
        predictor = make_predictor(kind).fit(fit)
        layers = trace.num_layers - 1
        for layer in range(layers):
            predictor.predict_rows(layer, 1, one_token[layer])
        repeats = 4000
        started = time.perf_counter()
        for i in range(repeats):
            predictor.predict_rows(i % layers, 1, one_token[i % len(one_token)])
        micros = (time.perf_counter() - started) / repeats * 1e6
        print(f"{kind:<15} {micros:7.1f} us per token per layer (batch 1, one thread)")

if __name__ == "__main__":
    run_script(main)
