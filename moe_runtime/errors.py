"""The errors a user can cause, one type per family of problems; each message names the fix.

InvalidFileError (a ValueError): a file we read is truncated, corrupt, not the format asked for,
    or holds values out of range (traces, predictor files, plans, profiles, checkpoints).
OutputPathError (an OSError): an output cannot be written where asked: the folder is not
    writable, or it holds files that are not ours to replace. Checked before any work starts.
FileNotFoundError: an input file or folder does not exist ("no <what> at <path>").
ValueError: any other option out of its range (a budget, a slot count, token ids).

The command line turns every one of them into "moe-runtime COMMAND: error: ..." and exit
status 2; nothing of the user's is touched when they are raised.
"""

from __future__ import annotations


class InvalidFileError(ValueError):
    """A file we read cannot be used as it is; the message names the file and what to do."""


class OutputPathError(OSError):
    """An output location is refused: unwritable, or holding what is not ours to replace."""
