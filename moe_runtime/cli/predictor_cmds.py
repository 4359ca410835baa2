"""`moe-runtime predictor fit ...` and `moe-runtime predictor eval ...`."""

from __future__ import annotations

import argparse
import time

from ..predictor import PREDICTORS, CrossLayerGatePredictor, evaluate, make_predictor, predictor_from, save_predictor
from ..trace import load_traces, merge_traces
from .output import console, print_json, rows_table


def add_parsers(subparsers) -> None:
    predictor = subparsers.add_parser("predictor", help="fit and evaluate routing-path predictors")
    verbs = predictor.add_subparsers(dest="verb", required=True, metavar="VERB")
    fit = verbs.add_parser("fit", help="fit a predictor on traces and save it")
    fit.add_argument("traces", nargs="+", help="trace files to fit on (merged)")
    fit.add_argument("--kind", default="learned", choices=sorted(PREDICTORS), help="predictor to fit")
    fit.add_argument("--out", required=True, help="predictor file to write (.npz)")
    fit.add_argument("--lookahead", default="1,2,3", help="lookaheads a learned predictor covers")
    fit.add_argument("--json", action="store_true", help="print one JSON object")
    fit.set_defaults(run=run_fit)
    score = verbs.add_parser("eval", help="recall@m and precision@m on held-out sequences")
    score.add_argument("predictor", help=f"a kind ({', '.join(sorted(PREDICTORS))}, {CrossLayerGatePredictor.name}) or a predictor file")
    score.add_argument("traces", nargs="+", help="trace files to score on (held-out sequences only)")
    score.add_argument("--lookahead", default="1,2,3", help="comma list of layer distances d to score")
    score.add_argument("--m", help="comma list of m, numbers or multiples of top-k such as K,2K (default: K)")
    score.add_argument("--fit", nargs="+", help="traces to fit a kind on (default: first half of the sequences of the evaluated traces)")
    score.add_argument("--model", help=f"model directory, for {CrossLayerGatePredictor.name} (traces recorded with --router-inputs)")
    score.add_argument("--json", action="store_true", help="print one JSON object")
    score.set_defaults(run=run_eval)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def parse_ms(text: str | None, top_k: int) -> tuple[int, ...]:
    if not text:
        return (top_k,)
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        out.append(int(part[:-1] or 1) * top_k if part.endswith("K") else int(part))
    return tuple(out)


def run_fit(args: argparse.Namespace) -> int:
    trace = load_traces(args.traces)
    predictor = make_predictor(args.kind) if args.kind != "learned" else PREDICTORS["learned"](_ints(args.lookahead), progress=not args.json)
    started = time.perf_counter()
    predictor.fit(trace)
    seconds = time.perf_counter() - started
    path = save_predictor(predictor, args.out)
    summary = {"kind": args.kind, "out": str(path), "tokens": trace.num_tokens, "sequences": trace.num_sequences, "fit_seconds": seconds}
    if args.json:
        print_json(summary)
    else:
        console.print(f"fitted {args.kind} on {trace.num_tokens} tokens ({trace.num_sequences} sequences) in {seconds:.1f} s -> {path}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    trace = load_traces(args.traces)
    held_out, note = trace, "the given traces"
    if args.predictor == CrossLayerGatePredictor.name:
        if not args.model:
            raise ValueError(f"{CrossLayerGatePredictor.name} reads a live model's routers: pass --model MODEL_DIR")
        from transformers import AutoModelForCausalLM

        predictor = CrossLayerGatePredictor(AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).eval())
    else:
        predictor, fitted = predictor_from(args.predictor)
        if not fitted:
            if args.fit:
                predictor.fit(load_traces(args.fit))
                note = "fitted on --fit traces"
            else:
                fits, held = zip(*(t.split(0.5) for t in (load_traces([p]) for p in args.traces)))
                predictor.fit(merge_traces(fits) if len(fits) > 1 else fits[0])
                held_out = merge_traces(held) if len(held) > 1 else held[0]
                note = "fitted on the first half of each trace's sequences, scored on the second"
    rows = evaluate(predictor, held_out, _ints(args.lookahead), parse_ms(args.m, trace.top_k))
    if args.json:
        print_json({"predictor": predictor.name, "evaluation": note, "results": rows})
        return 0
    console.print(f"{predictor.name}: {note}")
    console.print(rows_table("forecast quality", ("lookahead", "m", "recall", "precision"), [(r["lookahead"], r["m"], r["recall"], r["precision"]) for r in rows]))
    return 0
