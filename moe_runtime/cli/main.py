"""Entry point of the `moe-runtime` console script."""

from __future__ import annotations

import argparse
import sys

from . import bench_cmd, demo, generate, inspect_cmds, place_cmd, predictor_cmds, profile_cmds, trace_cmds

COMMAND_GROUPS = (inspect_cmds, trace_cmds, generate, bench_cmd, predictor_cmds, place_cmd, profile_cmds, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-runtime",
        description="Run Mixture-of-Experts models on GPUs that cannot hold them; trace, bench and tune them offline.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_parsers(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"moe-runtime {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moe-runtime {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
