"""`moe-runtime demo`: the main job on the embedded default model, no arguments needed.

embedded checkpoint -> from_pretrained with 25% of the experts in the slot pool -> greedy
generation -> hit rate, loads and stalls per layer -> the routing summary of the prompts.
"""

from __future__ import annotations

import argparse

from ..embedded import DEMO_PROMPTS, embedded_model_dir
from ..generation import timed_generate
from ..pretrained import from_pretrained
from ..recording import record_trace
from ..trace_stats import trace_summary
from .output import console, key_value_table, print_json, stats_tables
from .trace_cmds import load_tokenizer

DEMO_BUDGET = 0.25
DEMO_NEW_TOKENS = 48


def add_parsers(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="run the main job on the embedded default model")
    demo.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    demo.add_argument("--json", action="store_true", help="print one JSON object")
    demo.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    model_dir = embedded_model_dir()
    tokenizer = load_tokenizer(str(model_dir))
    model = from_pretrained(model_dir, budget=DEMO_BUDGET, device=args.device)
    text, timing, stats = timed_generate(model, tokenizer, DEMO_PROMPTS[0], DEMO_NEW_TOKENS)
    sequences = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in DEMO_PROMPTS]
    routing = trace_summary(record_trace(model, sequences, task="demo"))
    figures = {
        "model_dir": str(model_dir),
        "budget": DEMO_BUDGET,
        "prompt": DEMO_PROMPTS[0],
        "text": text,
        "new_tokens": timing.new_tokens,
        "decode_tokens_per_second": timing.decode_tokens_per_second,
        "stats": stats,
        "routing": routing,
    }
    if args.json:
        print_json(figures)
        return 0
    console.print(f"embedded model: {model_dir} (a small OLMoE trained here on code, manual pages, licences and translations; its card: README.md)")
    console.print(f"[bold]{DEMO_PROMPTS[0]}[/bold]{text!r}")
    console.print(f"{timing.new_tokens} tokens, decode {timing.decode_tokens_per_second:.1f} tokens/s with {DEMO_BUDGET:.0%} of experts on {stats['device']}")
    for table in stats_tables(stats):
        console.print(table)
    head = {key: value for key, value in routing.items() if key != "per_layer"}
    console.print(key_value_table("routing of the demo prompts", head))
    return 0
