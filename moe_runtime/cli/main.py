"""Entry point of the `moe-runtime` console script."""

from __future__ import annotations

import argparse
import sys

from ..atomic import check_replaceable, check_writable
from ..disk_store import ConvertedStore
from . import bench_cmd, demo, evaluate_cmd, generate, inspect_cmds, place_cmd, predictor_cmds, profile_cmds, trace_cmds

COMMAND_GROUPS = (inspect_cmds, trace_cmds, generate, evaluate_cmd, bench_cmd, predictor_cmds, place_cmd, profile_cmds, demo)


OUTPUT_FILES = ("out", "plot", "out_fit", "out_held")  # argument names of files a command writes


class HelpFormatter(argparse.HelpFormatter):
    """Every --help shows each flag's default, unless its help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS or not action.option_strings
        if unset or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands (created as this class) all use HelpFormatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moe-runtime",
        description="Run Mixture-of-Experts models on GPUs that cannot hold them; trace, bench and tune them offline.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_parsers(subparsers)
    return parser


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse unwritable outputs and a store_dir that is not ours before any work starts."""
    for name in OUTPUT_FILES:
        if getattr(args, name, None):
            check_writable(getattr(args, name), f"--{name.replace('_', '-')}")
    if getattr(args, "store_dir", None):
        check_replaceable(args.store_dir, "--store-dir", protected=[args.model_dir], legacy=ConvertedStore.is_store)


def with_default_verb(argv: list[str]) -> list[str]:
    """`trace MODEL_DIR ...` (no verb) as `trace record MODEL_DIR ...`."""
    if len(argv) >= 2 and argv[0] == "trace" and argv[1] not in ("record", "split", "-h", "--help"):
        return ["trace", trace_cmds.DEFAULT_VERB, *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(with_default_verb(sys.argv[1:] if argv is None else list(argv)))
    try:
        check_outputs(args)
        return args.run(args)
    except (ValueError, OSError) as error:  # InvalidFileError, OutputPathError, FileNotFoundError among them
        print(f"moe-runtime {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moe-runtime {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
