"""`moe-runtime trace MODEL_DIR --prompts FILE --out PATH [--task NAME]`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..prompts import read_prompts
from ..recording import record_trace
from ..trace import load_trace
from ..trace_stats import trace_summary
from .output import console, key_value_table, print_json, rows_table


DEFAULT_VERB = "record"  # `moe-runtime trace MODEL_DIR ...` means `trace record MODEL_DIR ...`


def add_parsers(subparsers) -> None:
    group = subparsers.add_parser("trace", help="record routing over prompts into a trace file (record), or split a trace (split)")
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    add_split_parser(verbs)
    trace = verbs.add_parser("record", help="record the routing of a model over prompts (the default verb: 'trace MODEL_DIR' works too)")
    trace.add_argument("model_dir", help="local checkpoint directory")
    trace.add_argument("--prompts", required=True, help="text lines, or JSONL with 'text' or 'input_ids'")
    trace.add_argument("--out", required=True, help="trace file to write (.npz)")
    trace.add_argument("--task", help="task name stored in the trace")
    trace.add_argument("--router-inputs", action="store_true", help="also record router input hidden states")
    trace.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="dtype the model runs in while tracing")
    trace.add_argument("--json", action="store_true", help="print one JSON object")
    trace.set_defaults(run=run_trace)


def add_split_parser(verbs) -> None:
    split = verbs.add_parser("split", help="split a trace by sequence into a fit part and a held-out part")
    split.add_argument("trace", help="trace file to split (.npz)")
    split.add_argument("--fit", type=float, default=0.5, help="share of the sequences in the fit part (the first ones)")
    split.add_argument("--out-fit", required=True, help="trace file for the fit part")
    split.add_argument("--out-held", required=True, help="trace file for the held-out part")
    split.add_argument("--json", action="store_true", help="print one JSON object")
    split.set_defaults(run=run_split)


def run_split(args: argparse.Namespace) -> int:
    if not 0 < args.fit < 1:
        raise ValueError(f"--fit is the share of sequences that fit, in (0, 1); got {args.fit}")
    fit, held = load_trace(args.trace).split(args.fit)
    written = {"fit": str(fit.save(args.out_fit)), "held": str(held.save(args.out_held))}
    parts = {name: {"path": path, "sequences": part.num_sequences, "tokens": part.num_tokens} for (name, path), part in zip(written.items(), (fit, held))}
    if args.json:
        print_json(parts)
    else:
        console.print(rows_table(f"{Path(args.trace).name} split by sequence", ("part", "file", "sequences", "tokens"), [(n, *p.values()) for n, p in parts.items()]))
    return 0


def load_tokenizer(model_dir: str):
    """The directory's tokenizer, or None when it has none (JSONL input_ids still work)."""
    from transformers import AutoTokenizer

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"no model folder at {model_dir} (no such folder); pass the folder that holds config.json")

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
