"""Writing files and folders so that nothing is ever left half-written.

write_atomically: write to a temporary file next to the target, then rename it into place.
staging_directory: fill a temporary folder next to the target; on success it replaces the
target, on any error (or Ctrl-C) it is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Create `path` from `write(handle)` in one rename; the folder is made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda handle: handle.write(text.encode()))


@contextlib.contextmanager
def staging_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder next to `target` that becomes `target` when the block succeeds."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as error:
        raise OSError(f"{target.parent} is not writable ({error.strerror}); choose a writable folder") from None
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
