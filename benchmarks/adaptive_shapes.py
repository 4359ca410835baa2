"""The runtime's default policy against LRU at the shapes of MoEs whose routing we do not ship.

Synthetic routing (moe_runtime.synthetic.flat_routing) at the layer x expert x top-k shapes of
Mixtral-8x7B, Qwen1.5-MoE-A2.7B, OLMoE-1B-7B, DeepSeek-V2-Lite and Qwen3-30B-A3B, each with
three token-to-token reuse rates (0, 0.3, 0.5 of a layer's experts kept) and three kinds of
popularity (flat; Zipf 0.7; Zipf 0.7 redrawn for each of the 8 sequences, as requests on
different topics would), at 10/25/50% of the experts in one global pool: the default's loads per
token as a multiple of LRU's, with no fit traces (what `wrap` runs when given nothing). The
issue's bar is at most 1.00x LRU on routing the default has never seen. With --prompt-share S,
each sequence is a session of its own from a cold cache, its first S of tokens one prefill step
(simulator.replay's prompts), and the decode tokens' loads are counted. --requests and --skew
make the stream harsher: more, shorter sequences (so that popularity, where it drifts, changes
every few dozen tokens) and a steeper skew (a few experts a layer take most uses, then others).
--shapes picks the shapes, among them the largest open MoEs' (LARGER).

    python benchmarks/adaptive_shapes.py --json shapes.json --plot shapes.png
    python benchmarks/adaptive_shapes.py --requests 47 --skew 1.5
    python benchmarks/adaptive_shapes.py --shapes GPT-OSS-120B,DeepSeek-V3,Kimi-K2,Qwen3-235B-A22B
"""

from __future__ import annotations

import argparse

from adaptive_default import add_replay_arguments, check_outputs, write_outputs
from prompt_sessions import decode_loads, prompt_share, sessions
from tqdm.auto import tqdm

from moe_runtime.atomic import write_atomically
from moe_runtime.errors import run_script
from moe_runtime.policies import DEFAULT_POLICY, make_policy
from moe_runtime.simulator import replay
from moe_runtime.synthetic import flat_routing

SHAPES = {  # name: (MoE layers, routed experts, top-k)
    "Mixtral-8x7B": (32, 8, 2), "Qwen1.5-MoE": (24, 60, 4), "OLMoE-1B-7B": (16, 64, 8), "DeepSeek-V2-Lite": (26, 64, 6), "Qwen3-30B-A3B": (48, 128, 8),
}
LARGER = {  # --shapes may name these too: the largest open MoEs (each MoE layer's shape; their dense first layers left out)
    "GPT-OSS-120B": (36, 128, 4), "DeepSeek-V3": (58, 256, 8), "Kimi-K2": (60, 384, 8), "Qwen3-235B-A22B": (94, 128, 8),
}
CATALOGUE = SHAPES | LARGER
REUSES = (0.0, 0.3, 0.5)
ROUTINGS = ((0.0, 0.0), (0.7, 0.0), (0.7, 1.0))  # (Zipf skew, drift: the share of ranks redrawn per sequence)
REQUESTS = 8  # sequences in each stream
BUDGETS = (0.1, 0.25, 0.5)
TOKENS = 1500


def measure(shape: str, reuse: float, skew: float, drift: float, seed: int, prompt_share: float | None = None, requests: int = REQUESTS) -> list[dict]:
    layers, experts, top_k = CATALOGUE[shape]
    trace = flat_routing(layers, experts, top_k, TOKENS, reuse=reuse, skew=skew, drift=drift, sequences=requests, seed=seed)
    rows = []
    for budget in BUDGETS:
        capacity = max(top_k, int(budget * layers * experts))
        size = {"num_layers": layers, "num_experts": experts, "capacity": capacity, "top_k": top_k}
        loads = {name: loads_per_token(trace, name, size, prompt_share) for name in ("lru", DEFAULT_POLICY)}
        rows.append({"shape": shape, "reuse": reuse, "skew": skew, "drift": drift, "budget": budget, **loads, "ratio": loads[DEFAULT_POLICY] / loads["lru"]})
    return rows


def loads_per_token(trace, name: str, size: dict, prompt_share: float | None) -> float:
    """Loads per decode token of policy `name`: the trace as one stream, or with `prompt_share`
    each sequence alone from a cold cache, its first share of tokens one prefill step (whose
    loads are not counted)."""
    if prompt_share is None:
        return replay(trace, make_policy(name, **size), size["capacity"]).loads / TOKENS
    loads = decoded = 0
    for session, prompt in sessions(trace, prompt_share):
        loads += decode_loads(session, make_policy(name, **size), size["capacity"], prompt)
        decoded += session.num_tokens - prompt
    return loads / decoded


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({_case(row) for row in rows}, key=lambda case: (list(CATALOGUE).index(case[0]), case[1:]))
    figure, axes = plt.subplots(1, len(BUDGETS), figsize=(4.2 * len(BUDGETS), 0.22 * len(cases) + 1.6), sharey=True, layout="constrained")
    for axis, budget in zip(axes, BUDGETS):
        ratio = {_case(row): row["ratio"] for row in rows if row["budget"] == budget}
        axis.barh(range(len(cases)), [ratio[case] for case in cases], height=0.7)
        axis.axvline(1.0, color="k", linestyle="--", linewidth=1)
        axis.set_yticks(range(len(cases)), [f"{s} r{r:g} z{z:g}" + (f" d{d:g}" if d else "") for s, r, z, d in cases], fontsize=7)
        axis.set_title(f"{budget:.0%} of the experts")
        axis.set_xlabel("default's loads per token / LRU's")
    write_atomically(path, lambda handle: figure.savefig(handle, format="png", dpi=120))
    plt.close(figure)


def shape_names(text: str) -> list[str]:
    """--shapes: names from CATALOGUE, comma-separated."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CATALOGUE]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model shape {', '.join(unknown) or repr(text)}: choose from {', '.join(CATALOGUE)}")
    return names


def _case(row: dict) -> tuple:
    return row["shape"], row["reuse"], row["skew"], row["drift"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_replay_arguments(parser, budgets=False)
    parser.add_argument("--prompt-share", type=prompt_share, help="each sequence alone, this share of its tokens one prefill step (default: one stream)")
    parser.add_argument("--requests", type=int, default=REQUESTS, help=f"sequences in each stream of {TOKENS} tokens (default {REQUESTS})")
    parser.add_argument("--skew", type=float, default=ROUTINGS[1][0], help=f"Zipf skew of the skewed routings (default {ROUTINGS[1][0]})")
    parser.add_argument("--shapes", type=shape_names, default=list(SHAPES), help=f"comma-separated model shapes (default: {', '.join(SHAPES)}; also {', '.join(LARGER)})")
    args = parser.parse_args()
    if not 1 <= args.requests <= TOKENS // 2:
        parser.error(f"--requests must be from 1 to {TOKENS // 2} (sequences of at least 2 of the {TOKENS} tokens), got {args.requests}")
    if not args.skew > 0:
        parser.error(f"--skew must be above 0 (0 is the flat routing, always measured), got {args.skew}")
    check_outputs(args.json, args.plot)
    routings = [(args.skew if skew else 0.0, drift) for skew, drift in ROUTINGS]
    cases = [(shape, reuse, skew, drift) for shape in args.shapes for reuse in REUSES for skew, drift in routings]
    jobs = [case for case in cases if not case[3]] + [case for case in cases if case[3]]  # drifting last: the others keep their seeds of before
    rows = []
    if args.prompt_share is not None:
        print(f"each sequence alone from a cold cache, its first {args.prompt_share:.0%} one prefill step; decode tokens'")
    print("the default's loads per token / LRU's; r: reuse from token to token, z: Zipf skew,")
    print(f"d: share of the popularity ranks redrawn for each of {args.requests} sequences")
    print(f"{'model shape':<17} {'L':>3} {'E':>4} {'K':>2} {'r':>4} {'z':>4} {'d':>4} " + " ".join(f"{budget:>7.0%}" for budget in BUDGETS))
    for seed, (shape, reuse, skew, drift) in enumerate(tqdm(jobs, desc="routings", leave=False)):
        found = measure(shape, reuse, skew, drift, seed, args.prompt_share, args.requests)
        rows += found
        layers, experts, top_k = CATALOGUE[shape]
        tqdm.write(f"{shape:<17} {layers:>3} {experts:>4} {top_k:>2} {reuse:>4.1f} {skew:>4.1f} {drift:>4.1f} " + " ".join(f"{row['ratio']:>7.4f}" for row in found))
    worst = max(rows, key=lambda row: row["ratio"])
    print(f"worst: {worst['ratio']:.4f}x LRU ({worst['shape']}, reuse {worst['reuse']}, skew {worst['skew']}, drift {worst['drift']}, {worst['budget']:.0%})")
    write_outputs(rows, args.json, args.plot, plot)


if __name__ == "__main__":
    run_script(main)
