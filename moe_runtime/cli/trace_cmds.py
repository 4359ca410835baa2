"""`moe-runtime trace MODEL_DIR --prompts FILE --out PATH [--task NAME]`."""

from __future__ import annotations

import argparse

import torch

from ..prompts import read_prompts
from ..recording import record_trace
from ..trace_stats import trace_summary
from .output import console, key_value_table, print_json


def add_parsers(subparsers) -> None:
    trace = subparsers.add_parser("trace", help="record the routing of a model over prompts into a trace file")
    trace.add_argument("model_dir", help="local checkpoint directory")
    trace.add_argument("--prompts", required=True, help="text lines, or JSONL with 'text' or 'input_ids'")
    trace.add_argument("--out", required=True, help="trace file to write (.npz)")
    trace.add_argument("--task", help="task name stored in the trace")
    trace.add_argument("--router-inputs", action="store_true", help="also record router input hidden states")
    trace.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    trace.add_argument("--json", action="store_true", help="print one JSON object")
    trace.set_defaults(run=run_trace)


def load_tokenizer(model_dir: str):
    """The directory's tokenizer, or None when it has none (JSONL input_ids still work)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError):
        return None


def run_trace(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    sequences = read_prompts(args.prompts, load_tokenizer(args.model_dir))
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=getattr(torch, args.dtype), local_files_only=True
    ).eval()
    trace = record_trace(model, sequences, router_inputs=args.router_inputs, task=args.task, progress=not args.json)
    path = trace.save(args.out)
    summary = {"out": str(path), **{k: v for k, v in trace_summary(trace).items() if k != "per_layer"}}
    if args.json:
        print_json(summary)
    else:
        console.print(key_value_table(f"trace written to {path}", summary))
    return 0
