"""`moe-runtime profile TRACE ... --task NAME --keep 0.5 --out PATH`, `profile match`, `profile eval`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..pruning import METHODS, load_profile, make_profile, match_trace, profile_figures
from ..pruning.plan import ALLOCATIONS
from ..trace import load_traces
from .output import console, key_value_table, print_json, rows_table

VERBS = ("match", "eval")


def add_parsers(subparsers) -> None:
    profile = subparsers.add_parser(
        "profile",
        help="make a task pruning profile from traces; 'profile match' and 'profile eval' use profiles",
        description="profile TRACE ... --task NAME --keep 0.5 --out PATH | profile match PROFILE ... --trace T --tokens N | profile eval PROFILE --trace T",
    )
    profile.add_argument("items", nargs="+", metavar="TRACE_OR_VERB", help="traces, or 'match'/'eval' followed by profiles")
    profile.add_argument("--task", help="task name stored in the profile")
    profile.add_argument("--keep", type=float, default=0.5, help="share of all experts kept")
    profile.add_argument("--out", help="profile file to write (.json)")
    profile.add_argument("--method", default="mass", choices=METHODS, help="importance score")
    profile.add_argument("--allocation", default="global", choices=ALLOCATIONS, help="how the kept share is spread over layers")
    profile.add_argument("--trace", help="match/eval: the trace to score")
    profile.add_argument("--tokens", type=int, default=16, help="match: tokens of each sequence used")
    profile.add_argument("--json", action="store_true", help="print one JSON object")
    profile.set_defaults(run=run_profile)


def run_profile(args: argparse.Namespace) -> int:
    verb = args.items[0] if args.items[0] in VERBS else None
    if verb is None:
        return make(args)
    if not args.trace:
        raise ValueError(f"profile {verb} needs --trace TRACE")
    profiles = [load_profile(path) for path in args.items[1:]]
    if not profiles:
        raise ValueError(f"profile {verb} needs at least one profile file")
    trace = load_traces([args.trace])
    return match(profiles, trace, args) if verb == "match" else evaluate(profiles, trace, args)


def make(args: argparse.Namespace) -> int:
    if not args.task or not args.out:
        raise ValueError("making a profile needs --task NAME and --out PATH")
    trace = load_traces(args.items)
    profile = make_profile(trace, args.task, args.keep, method=args.method, allocation=args.allocation, source_names=[Path(p).name for p in args.items])
    path = profile.save(args.out)
    summary = {"task": args.task, "out": str(path), "kept_share": profile.kept_share(), "kept_per_layer": [len(k) for k in profile.keep]}
    if args.json:
        print_json(summary)
    else:
        console.print(key_value_table(f"profile {args.task} -> {path}", summary))
    return 0


def match(profiles, trace, args: argparse.Namespace) -> int:
    matches = match_trace(profiles, trace, args.tokens)
    if args.json:
        print_json({"tokens": args.tokens, "matches": matches})
        return 0
    rows = [(m["sequence"], m["task"], *(m["scores"][p.task] for p in profiles)) for m in matches]
    console.print(rows_table(f"closest profile from the first {args.tokens} tokens", ("sequence", "task", *(p.task for p in profiles)), rows))
    return 0


def evaluate(profiles, trace, args: argparse.Namespace) -> int:
    figures = [profile_figures(profile, trace) for profile in profiles]
    if args.json:
        print_json(figures[0] if len(figures) == 1 else {"results": figures})
        return 0
    rows = [(f["task"], f["kept_share"], f["retained_gate_mass"], f["selection_coverage"]) for f in figures]
    console.print(rows_table("profile on trace", ("profile", "kept share", "retained gate mass", "selection coverage"), rows))
    return 0
