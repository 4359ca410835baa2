"""`moe-runtime demo`: the main job on the embedded default model, no arguments needed."""

from __future__ import annotations

import argparse

from ..embedded import DEMO_PROMPTS, embedded_model_dir, load_embedded_model
from ..recording import record_trace
from ..trace_stats import trace_summary
from .output import console, key_value_table, print_json, rows_table


def add_parsers(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="run the main job on the embedded default model")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    model_dir = embedded_model_dir()
    model, tokenizer = load_embedded_model()
    sequences = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in DEMO_PROMPTS]
    summary = trace_summary(record_trace(model, sequences, task="demo"))
    result = {"model_dir": str(model_dir), "routing": summary}
    if args.json:
        print_json(result)
        return 0
    head = {key: value for key, value in summary.items() if key != "per_layer"}
    console.print(key_value_table(f"routing of the embedded model ({model_dir})", head))
    rows = [(row["layer"], row["gini"], row["top_quarter_share"]) for row in summary["per_layer"]]
    console.print(rows_table("popularity skew per MoE layer", ("layer", "gini", "top 25% share"), rows))
    return 0
