"""`moe-runtime generate MODEL_DIR --budget X --prompt "..."`: offloaded generation with its stats."""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from ..generation import timed_generate
from ..inspection import describe_model_dir
from ..pretrained import from_pretrained
from ..policies import DEFAULT_POLICY, FITTABLE, NEEDS_FIT, POLICIES
from ..routing_log import LEARN_TASK, LEARN_TOKENS, earlier_sessions, record_routing, remember_session
from .output import console, key_value_table, print_json, stats_tables
from .trace_cmds import load_tokenizer


def add_parsers(subparsers) -> None:
    generate = subparsers.add_parser("generate", help="generate text with experts offloaded under a memory budget")
    generate.add_argument("model_dir", help="local checkpoint directory")
    generate.add_argument("--budget", required=True, help="slot pool memory: bytes, '2GiB' or a fraction of all experts")
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    generate.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    generate.add_argument("--host-budget", help="RAM for cold experts (default: all that fit)")
    generate.add_argument("--store-dir", help="convert the experts once into this folder and read them from it")
    live = sorted(set(POLICIES) - NEEDS_FIT)  # pinned needs fit traces: a tiering plan pins experts live
    generate.add_argument("--policy", default=DEFAULT_POLICY, choices=live, help="cache policy")
    fit = generate.add_mutually_exclusive_group()
    fit.add_argument("--policy-fit", metavar="TRACE", help="start the policy (the default, or next-use) from a reuse model fitted on this routing trace of your task (from moe-runtime trace)")
    fit.add_argument(
        "--learn", metavar="TRACE.npz",
        help=f"learn your task's routing across runs: start the policy from the sessions recorded in this file (if it exists) and add this run's routing to it (the newest {LEARN_TOKENS} tokens are kept)",
    )
    generate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: the checkpoint's")
    generate.add_argument("--json", action="store_true", help="print one JSON object")
    generate.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.model_dir)
    if tokenizer is None:
        raise ValueError(f"{args.model_dir} has no tokenizer: generate needs one to read --prompt")
    if args.learn and args.policy not in FITTABLE:
        raise ValueError(f"--learn starts the policy from the sessions it recorded: the {args.policy} policy fits nothing; drop --policy (the default learns) or --learn")
    earlier = earlier_sessions(args.learn, _moe_shape(args.model_dir)) if args.learn else None  # checked before the model is loaded
    model = from_pretrained(
        args.model_dir,
        budget=args.budget,
        device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        host_budget=args.host_budget,
        store_dir=args.store_dir,
        policy=args.policy,
        policy_fit=args.policy_fit or earlier,
    )
    log = record_routing(model, task=LEARN_TASK) if args.learn else None
    try:
        text, timing, stats = timed_generate(model, tokenizer, args.prompt, args.max_new_tokens, log or contextlib.nullcontext())
    except KeyboardInterrupt:  # the tokens finished before Ctrl-C are this run's session
        if log is not None and log.num_tokens:
            remember_session(args.learn, earlier, log.trace())
            print(f"moe-runtime generate: the routing of the {log.num_tokens} tokens finished was added to {args.learn}", file=sys.stderr)
        raise
    learned = remember_session(args.learn, earlier, log.trace()) if log else None
    figures = {
        "text": text,
        "new_tokens": timing.new_tokens,
        "prefill_seconds": timing.prefill_seconds,
        "decode_tokens_per_second": timing.decode_tokens_per_second,
        "stats": stats,
    }
    if learned is not None:
        figures["learned"] = {"file": args.learn, "session_tokens": log.num_tokens, "sessions": learned.num_sequences, "tokens": learned.num_tokens}
    if args.json:
        print_json(figures)
        return 0
    console.print(f"[bold]{args.prompt}[/bold]{text}")
    console.print(key_value_table("generation", {k: v for k, v in figures.items() if k not in ("text", "stats", "learned")}))
    if learned is not None:
        sessions = f"{learned.num_sequences} session" + ("s" if learned.num_sequences > 1 else "")
        console.print(f"this run's routing ({log.num_tokens} tokens) added to {args.learn}, which now holds {sessions} ({learned.num_tokens} tokens)")
    for table in stats_tables(stats):
        console.print(table)
    return 0


def _moe_shape(model_dir: str) -> tuple[int, int, int]:
    """(MoE layers, experts, top-k) of the checkpoint, from its config alone."""
    info = describe_model_dir(model_dir)
    return info["num_moe_layers"], info["num_experts"], info["top_k"]
