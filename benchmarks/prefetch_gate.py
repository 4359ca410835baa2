"""Does prefetching ever cost time? Every predictor, gated and not, on every shipped held-out task.

For each shipped trace (ESFT: DeepSeek-V2-Lite experts; GPT-OSS-20B experts), fitted on the
first half of its sequences and replayed on the second, at 10/25/50% of the experts, with the
experts in bf16 and in int4 (the load shrinks to 0.28x, so a layer's compute can hide more of
it): modelled ms per token of LRU without prefetching, and each predictor prefetching its top-k
one layer ahead, through the prefetch gate (what the runtime does) and without it, as a
multiple of the no-prefetch time.

    python benchmarks/prefetch_gate.py --json out.json --plot prefetch_gate.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

from moe_runtime.atomic import check_writable, write_atomically, write_text_atomically
from moe_runtime.errors import run_script
from moe_runtime.expert_format import format_size_ratio
from moe_runtime.policies import make_policy
from moe_runtime.predictor import predictor_from
from moe_runtime.simulator import Prefetch, TimingModel, replay
from moe_runtime.trace import load_trace

ROUTING = Path(__file__).parents[1] / "moe_runtime" / "data" / "routing"
BUDGETS = (0.1, 0.25, 0.5)
PREDICTORS = ("learned", "affinity", "previous-token", "popularity")
EXPERT_MB = {  # one expert's bf16 bytes: gate, up and down projections
    "esft-vanilla-lite": 3 * 2048 * 1408 * 2 / 1e6,  # DeepSeek-V2-Lite, 17.3 MB
    "gpt-oss-20b": 3 * 2880 * 2880 * 2 / 1e6,  # GPT-OSS-20B, 49.8 MB
}
FORMATS = (None, "int4")


def rows_for(path: Path, lookahead: int, progress) -> list[dict]:
    trace = load_trace(path)
    fit, held_out = trace.split(0.5)
    forecasts = {name: predictor_from(name)[0].fit(fit).forecast_trace(held_out, lookahead) for name in PREDICTORS}
    rows = []
    for quantize in FORMATS:
        timing = TimingModel(expert_mb=EXPERT_MB[path.parent.name] * format_size_ratio(quantize))
        for budget in BUDGETS:
            capacity = max(held_out.top_k, int(budget * held_out.num_layers * held_out.num_experts))

            def ms(prefetch: Prefetch | None) -> float:
                policy = make_policy("lru", num_layers=held_out.num_layers, num_experts=held_out.num_experts, capacity=capacity)
                result = replay(held_out, policy, capacity, timing=timing, prefetch=prefetch)
                progress.update(1)
                return result.total_ms / held_out.num_tokens

            base = ms(None)
            row = {"trace": f"{path.parent.name[:7]}/{path.stem}", "format": quantize or "bf16", "budget": budget, "no_prefetch_ms": base}
            for name in PREDICTORS:
                for gated in (True, False):
                    prefetch = Prefetch(forecasts[name], held_out.top_k, lookahead, gated=gated)
                    row[f"{name}{'' if gated else '_ungated'}"] = ms(prefetch) / base
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """Gated ratios (ungated in the JSON), one line per trace, format and budget: fits 80 columns."""
    lines = ["modelled ms/token with gated prefetching as a multiple of LRU without it",
             f"{'trace':22} {'format':6} {'budget':>6} {'ms':>7} " + " ".join(f"{p[:8]:>8}" for p in PREDICTORS)]
    for row in rows:
        ratios = " ".join(f"{row[p]:8.3f}" for p in PREDICTORS)
        lines.append(f"{row['trace']:22} {row['format']:6} {row['budget']:6.2f} {row['no_prefetch_ms']:7.2f} {ratios}")
    worst = max(row[p] for row in rows for p in PREDICTORS)
    best = min(row[p] for row in rows for p in PREDICTORS)
    lines.append(f"gated: worst {worst:.3f}, best {best:.3f}; ungated: worst {max(row[p + '_ungated'] for row in rows for p in PREDICTORS):.3f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, gated in zip(axes, (False, True)):
        for name in PREDICTORS:
            key = name if gated else f"{name}_ungated"
            axis.plot(range(len(rows)), [row[key] for row in rows], "o", label=name, alpha=0.7)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_title("gated (the runtime)" if gated else "ungated")
        axis.set_xlabel("trace x format x budget")
    axes[0].set_ylabel("ms/token / no-prefetch ms/token")
    axes[0].legend()
    figure.tight_layout()
    write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lookahead", type=int, default=1)
    parser.add_argument("--traces", nargs="*", type=Path, default=sorted(ROUTING.glob("*/*.npz")))
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    for output in (args.json, args.plot):
        if output:
            check_writable(output)
    runs = len(args.traces) * len(FORMATS) * len(BUDGETS) * (1 + 2 * len(PREDICTORS))
    rows = []
    with tqdm(total=runs, desc="replays") as progress:
        for path in args.traces:
            rows.extend(rows_for(path, args.lookahead, progress))
    print(table(rows))
    if args.json:
        write_text_atomically(args.json, json.dumps({"lookahead": args.lookahead, "rows": rows}, indent=1))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    run_script(main)
