"""`moe-runtime evaluate MODEL_DIR --text FILE [--budget X] [--quantize F] [--profile P] [--one-at-a-time]`:
perplexity of an offloaded model on a text, and its distance from the unquantized model."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..embedded import embedded_model_dir
from ..evaluation import DEFAULT_TOKENS, evaluate_checkpoint
from ..expert_format import QUANTIZED
from .output import console, key_value_table, print_json
from .trace_cmds import load_tokenizer


def add_parsers(subparsers) -> None:
    evaluate = subparsers.add_parser("evaluate", help="perplexity of an offloaded (quantized, pruned) model on a text")
    evaluate.add_argument("model_dir", help="local checkpoint directory, or 'embedded' for the embedded model")
    evaluate.add_argument("--text", required=True, help="a UTF-8 text file to score")
    evaluate.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="score the first N tokens of the text")
    evaluate.add_argument("--budget", default="1.0", help="slot pool memory: bytes, '2GiB' or a fraction of all experts")
    evaluate.add_argument("--quantize", choices=QUANTIZED, help="hold the routed experts in this format")
    evaluate.add_argument("--profile", help="a pruning profile (from moe-runtime profile build)")
    evaluate.add_argument("--store-dir", help="where the quantized store is written (default: a temporary folder)")
    evaluate.add_argument("--no-reference", action="store_true", help="skip the comparison with the unquantized, unpruned model")
    evaluate.add_argument("--device", default="cpu", help="cuda or cpu")
    evaluate.add_argument("--one-at-a-time", action="store_true", help="score token by token through the KV cache, as generation runs (the decode kernels)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    if args.tokens < 2:
        raise ValueError(f"--tokens must be at least 2, got {args.tokens}")
    model_dir = str(embedded_model_dir()) if args.model_dir == "embedded" else args.model_dir
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer: evaluate needs one to read --text")
    text = Path(args.text).read_text(encoding="utf-8")
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.tokens]
    result = evaluate_checkpoint(
        model_dir, token_ids, budget=args.budget, quantize=args.quantize, profile=args.profile, store_dir=args.store_dir,
        reference=not args.no_reference, device=args.device, one_at_a_time=args.one_at_a_time,
    )
    figures = {
        "model_dir": model_dir, "text": args.text, "budget": args.budget, "quantize": args.quantize or "none", "profile": args.profile,
        "one_at_a_time": args.one_at_a_time, **result.as_dict(),
    }
    if args.json:
        print_json(figures)
    else:
        console.print(key_value_table("evaluation", figures))
    return 0
