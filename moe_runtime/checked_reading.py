"""Reading our own files (plans, profiles, traces, predictors) with errors that name the file.

A missing file raises FileNotFoundError "no <what> at <path>"; a file that cannot be parsed
(truncated, corrupt, not a zip or not JSON) raises InvalidFileError "<path>: ..." with the
parser's reason. What the content must hold is each caller's own validation, which raises
InvalidFileError too.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .errors import InvalidFileError


def existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    return path


REMAKE = "write it again with the command that made it"


def read_json(path: str | os.PathLike, what: str, fix: str = REMAKE):
    """The parsed JSON of the file `path` (a `what`, e.g. "profile file"); `fix` ends the error."""
    path = existing_file(path, what)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        reason = f"{error.msg} at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else str(error)
        raise InvalidFileError(f"{path}: not valid JSON ({reason}); {fix}") from None


def read_npz(path: str | os.PathLike, what: str, fix: str = REMAKE) -> dict[str, np.ndarray]:
    """Every array of the .npz file `path` (a `what`, e.g. "trace file"), without pickles."""
    path = existing_file(path, what)
    if not zipfile.is_zipfile(path):  # else numpy reads it as a pickle and blames pickling
        raise InvalidFileError(f"{path}: not a .npz {what} (not a zip archive: truncated, or another kind of file); {fix}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as error:
        raise InvalidFileError(f"{path}: not a readable .npz {what}, truncated or corrupt ({error}); {fix}") from None
