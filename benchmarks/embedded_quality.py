"""Quality figures of the trained embedded model on its shipped held-out text, per domain.

held-out DOMAIN.txt -> `evaluate` (perplexity, windows of the model's context):
  - pruning: every domain's text under every domain's profile at keep 25/50/75% (the shipped
    keep-50% profiles' scores re-planned at each share); own-domain increase vs the others' mean
  - quantized experts: int8 and int4 (group 32/64) against the shipped bf16 weights
held-out traces DOMAIN.npz (routing + router inputs, one sequence per ~256-token piece):
  - profile="auto": the domain picked from each piece's first 16 tokens
  - predictors: recall@K at d = 1 and 3 (cross-layer-gate; learned and affinity fitted on the
    first half of every domain's pieces, all scored on the second half)
  - caching: hit rates of LRU, the runtime's default and Belady at a 25% budget

    python benchmarks/embedded_quality.py [--json OUT] [--plot PNG]

Everything is reproducible from the repository alone (no corpus needed).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moe_runtime.atomic import check_writable, write_text_atomically
from moe_runtime.belady import belady_misses, layer_keys
from moe_runtime.bench import DEFAULT, capacity_for, policy_for
from moe_runtime.embedded import EMBEDDED_DOMAINS, HELDOUT_DIR, TRACES_DIR, embedded_model_dir, load_embedded_model
from moe_runtime.errors import run_script
from moe_runtime.evaluation import evaluate_checkpoint
from moe_runtime.pruning import load_profiles, match_trace
from moe_runtime.pruning.plan import keep_plan
from moe_runtime.simulator import replay
from moe_runtime.trace import load_trace, merge_traces
from moe_runtime.predictor import make_predictor
from moe_runtime.predictor.cross_layer import CrossLayerGatePredictor
from moe_runtime.predictor.evaluation import evaluate as predictor_recall

PROFILES_DIR = Path(__file__).resolve().parents[1] / "profiles" / "embedded"
KEEPS = (0.25, 0.5, 0.75)
FORMATS = ("int8", "int4-g32", "int4-g64")  # int4-g128 needs inputs divisible by 128; hidden 192 is not
CACHE_BUDGET = 0.25


def tokens_of(domain: str, tokenizer) -> list[int]:
    return tokenizer((HELDOUT_DIR / f"{domain}.txt").read_text(), add_special_tokens=False)["input_ids"]


def at_keep(profile, keep: float):
    """The profile re-planned to keep `keep` of all experts by its own importance scores."""
    keep_lists = keep_plan(np.array(profile.scores), keep, profile.top_k)
    return replace(profile, keep=keep_lists, source={**profile.source, "keep": keep})


def perplexity(ids: list[int], **options) -> float:
    return evaluate_checkpoint(embedded_model_dir(), ids, reference=False, **options).perplexity


def pruning_rows(texts: dict[str, list[int]], base: dict[str, float], profiles: dict) -> list[dict]:
    rows = []
    jobs = [(d, p, k) for d in EMBEDDED_DOMAINS for k in KEEPS for p in EMBEDDED_DOMAINS]
    for domain, source, keep in tqdm(jobs, desc="pruning", unit="run"):
        value = perplexity(texts[domain], profile=at_keep(profiles[source], keep))
        rows.append({"domain": domain, "profile": source, "keep": keep, "perplexity": value, "base": base[domain]})
    return rows


def pruning_verdicts(rows: list[dict]) -> list[dict]:
    """Per domain and keep: own-profile increase, the other profiles' mean increase, and their ratio."""
    out = []
    for domain in EMBEDDED_DOMAINS:
        for keep in KEEPS:
            mine = [r for r in rows if r["domain"] == domain and r["keep"] == keep]
            own = next(r["perplexity"] - r["base"] for r in mine if r["profile"] == domain)
            others = float(np.mean([r["perplexity"] - r["base"] for r in mine if r["profile"] != domain]))
            out.append({"domain": domain, "keep": keep, "base": mine[0]["base"], "own_increase": own, "others_mean_increase": others,
                        "ratio": own / others if others > 0 else float("inf")})
    return out


def quantization_rows(texts: dict[str, list[int]], base: dict[str, float]) -> list[dict]:
    """Each format scored in windows (prefill: the many-row kernels) and one token at a time
    through the KV cache (decode: on a CPU kernels/cpu_gemv.py, int8 activations), each
    against the bf16 model scored the same way."""
    rows = []
    for domain in tqdm(EMBEDDED_DOMAINS, desc="quantized experts", unit="domain"):
        stepwise_base = perplexity(texts[domain], one_at_a_time=True)
        for fmt in FORMATS:
            value = perplexity(texts[domain], quantize=fmt)
            stepwise = perplexity(texts[domain], quantize=fmt, one_at_a_time=True)
            rows.append({
                "domain": domain, "format": fmt, "perplexity": value, "base": base[domain], "change": value / base[domain] - 1,
                "decode_perplexity": stepwise, "decode_base": stepwise_base, "decode_change": stepwise / stepwise_base - 1,
            })
    return rows


def auto_profile_rows(traces: dict, profiles: dict) -> list[dict]:
    choices = list(profiles.values())
    return [
        {"domain": d, "pieces": traces[d].num_sequences, "correct": sum(m["task"] == d for m in match_trace(choices, traces[d], 16))}
        for d in EMBEDDED_DOMAINS
    ]


def predictor_rows(traces: dict, model) -> list[dict]:
    halves = {d: traces[d].split(0.5) for d in EMBEDDED_DOMAINS}
    fit = merge_traces([halves[d][0] for d in EMBEDDED_DOMAINS])
    held = merge_traces([halves[d][1] for d in EMBEDDED_DOMAINS])
    predictors = {"cross-layer-gate": CrossLayerGatePredictor(model), **{n: make_predictor(n).fit(fit) for n in ("learned", "affinity")}}
    rows = []
    for name, predictor in predictors.items():
        for row in predictor_recall(predictor, held, (1, 3), (held.top_k,)):
            rows.append({"predictor": name, "lookahead": row["lookahead"], "recall": row["recall"]})
    return rows


def caching_rows(traces: dict) -> list[dict]:
    rows = []
    for domain in (*EMBEDDED_DOMAINS, "all"):
        trace = merge_traces(list(traces.values())) if domain == "all" else traces[domain]
        capacity = capacity_for(trace, CACHE_BUDGET)
        row = {"domain": domain, "capacity": capacity}
        for name in ("lru", DEFAULT):
            row[name] = replay(trace, policy_for(name, trace, capacity, None), capacity).hit_rate
        uses = trace.num_tokens * trace.num_layers * trace.top_k
        row["belady"] = 1 - belady_misses(layer_keys(trace.expert_ids, trace.num_experts), trace.top_k, capacity) / uses
        rows.append(row)
    return rows


def print_tables(report: dict) -> None:
    print("\nPruning at keep 50/25/75%: perplexity increase, own-domain profile vs the others' mean")
    print(f"{'domain':<12}{'keep':>5}{'base ppl':>9}{'own +':>9}{'others +':>10}{'ratio':>7}")
    for v in report["pruning_verdicts"]:
        print(f"{v['domain']:<12}{v['keep']:>5.2f}{v['base']:>9.2f}{v['own_increase']:>9.2f}{v['others_mean_increase']:>10.2f}{v['ratio']:>7.2f}")
    print("\nQuantized experts: perplexity change against the bf16 weights, in windows / decoding")
    print(f"{'domain':<12}" + "".join(f"{f:>16}" for f in FORMATS))
    for domain in EMBEDDED_DOMAINS:
        rows = [r for r in report["quantization"] if r["domain"] == domain]
        print(f"{domain:<12}" + "".join(f"{r['change']:>+8.2%}{r['decode_change']:>+8.2%}" for r in rows))
    print("\nprofile='auto' from the first 16 tokens of each held-out piece")
    for row in report["auto_profile"]:
        print(f"{row['domain']:<12}{row['correct']:>3} / {row['pieces']}")
    print("\nPredictor recall@K on held-out pieces (fit on the other half)")
    for row in report["predictors"]:
        print(f"{row['predictor']:<18} d={row['lookahead']}  {row['recall']:.3f}")
    print(f"\nHit rate at a {CACHE_BUDGET:.0%} budget")
    print(f"{'domain':<12}{'LRU':>8}{'default':>9}{'Belady':>8}")
    for row in report["caching"]:
        print(f"{row['domain']:<12}{row['lru']:>8.3f}{row[DEFAULT]:>9.3f}{row['belady']:>8.3f}")


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(EMBEDDED_DOMAINS), figsize=(13, 3.6), sharey=False)
    width = 0.8 / len(EMBEDDED_DOMAINS)
    for axis, domain in zip(axes, EMBEDDED_DOMAINS):
        for i, source in enumerate(EMBEDDED_DOMAINS):
            rows = [r for r in report["pruning"] if r["domain"] == domain and r["profile"] == source]
            axis.bar(np.arange(len(KEEPS)) + i * width, [r["perplexity"] for r in rows], width, label=f"{source} profile")
        axis.axhline(rows[0]["base"], color="black", lw=0.8, ls="--", label="no pruning")
        axis.set(title=f"{domain} text", xticks=np.arange(len(KEEPS)) + 0.3, xticklabels=[f"keep {k:.0%}" for k in KEEPS], yscale="log")
    axes[0].set_ylabel("held-out perplexity")
    axes[-1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--plot", type=Path, help="write the pruning figure here (PNG)")
    args = parser.parse_args()
    for path in (args.json, args.plot):
        if path:
            check_writable(path)  # before the runs, not after
    model, tokenizer = load_embedded_model()
    texts = {d: tokens_of(d, tokenizer) for d in EMBEDDED_DOMAINS}
    profiles = {p.task: p for p in load_profiles(PROFILES_DIR)}
    traces = {d: load_trace(TRACES_DIR / f"{d}.npz") for d in EMBEDDED_DOMAINS}
    base = {d: perplexity(texts[d]) for d in EMBEDDED_DOMAINS}  # every expert resident, bf16, unpruned
    report = {"tokens": {d: len(t) for d, t in texts.items()}, "pruning": pruning_rows(texts, base, profiles)}
    report["pruning_verdicts"] = pruning_verdicts(report["pruning"])
    report["quantization"] = quantization_rows(texts, base)
    report["auto_profile"] = auto_profile_rows(traces, profiles)
    report["predictors"] = predictor_rows(traces, model)
    report["caching"] = caching_rows(traces)
    print_tables(report)
    if args.json:
        write_text_atomically(args.json, json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    run_script(main)
