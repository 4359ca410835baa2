"""The errors a user can cause, one type per family of problems; each message names the fix.

InvalidFileError (a ValueError): a file we read is truncated, corrupt, not the format asked for,
    or holds values out of range (traces, predictor files, plans, profiles, checkpoints).
OutputPathError (an OSError): an output cannot be written where asked: the folder is not
    writable, or it holds files that are not ours to replace. Checked before any work starts.
FileNotFoundError: an input file or folder does not exist ("no <what> at <path>").
ValueError: any other option out of its range (a budget, a slot count, token ids).

The command line turns every one of them into "moe-runtime COMMAND: error: ..." and exit
status 2; nothing of the user's is touched when they are raised. The benchmark scripts end on
the first three the same way (run_script; their options are checked by argparse).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


class InvalidFileError(ValueError):
    """A file we read cannot be used as it is; the message names the file and what to do."""


class OutputPathError(OSError):
    """An output location is refused: unwritable, or holding what is not ours to replace."""


def run_script(main: Callable[[], int | None]) -> None:
    """Run a script's main() and exit with its status, ending on the user's mistakes as the command
    line does: an output that cannot be written (checked before the work), an input file missing
    or damaged: "SCRIPT: error: MESSAGE" on stderr, status 2, no traceback; an interrupt: status
    130. Anything else is a fault of ours and keeps its traceback."""
    program = Path(sys.argv[0]).name
    try:
        status = main()
    except (OutputPathError, InvalidFileError, FileNotFoundError) as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status)
