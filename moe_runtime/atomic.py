"""Writing files and folders so that nothing is left half-written and nothing of the user's is lost.

check_writable: refuse an output path whose folder cannot be written, before any work starts.
write_atomically: write a temporary file next to the target, then rename it into place.
staging_directory: fill a temporary folder next to the target; when the block succeeds it takes
    the target's place (an older folder of ours is swapped out only then, and deleted after);
    on an error, Ctrl-C or a kill, the target is as it was.

A folder is ours when it holds OWNER_MARK, which staging_directory writes first thing. A target
that exists, is not empty and is not ours is refused, and so are the working folder, the home
folder, the root, any folder the caller protects (a checkpoint) and every parent of those.
Leftovers of a killed process (its staging or swapped-out folders, marked as ours) are removed
by the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import OutputPathError

OWNER_MARK = ".moe-runtime-owned"
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:staging|replaced)-(?P<pid>\d+)-[^.]+$")


def check_writable(path: str | os.PathLike, what: str = "output file") -> Path:
    """`path` if a file can be created there; else OutputPathError naming the folder and the fix.

    Tried for real (a temporary file is created and removed in the nearest existing folder), so
    a read-only mount or a path below a regular file is caught even when running as root.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder; name a file inside it, e.g. {path / 'out'}")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputPathError(f"{what} {path} is not writable: {folder} is a file, not a folder; choose another path")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".moe-runtime-probe-"):
            pass
    except OSError as error:
        raise OutputPathError(f"{what} {path} is not writable: {folder} refuses new files ({error.strerror}); choose a writable folder") from None
    return path


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Create (or replace) the file `path` from `write(handle)` in one rename; the folder is made if needed."""
    path = check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle_fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle_fd, "wb") as handle:
            write(handle)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    return write_atomically(path, lambda handle: handle.write(text.encode()))


def is_ours(folder: Path, legacy: Callable[[Path], bool] | None = None) -> bool:
    """Whether `folder` was written by us (our mark, or `legacy` recognises an older layout)."""
    return (folder / OWNER_MARK).is_file() or (legacy is not None and legacy(folder))


def check_replaceable(
    target: str | os.PathLike, what: str, *, protected: Iterable[str | os.PathLike] = (), legacy: Callable[[Path], bool] | None = None
) -> Path:
    """`target` if a folder of ours may be written there; else OutputPathError, touching nothing.

    Allowed: a path that does not exist, an empty folder, or a folder of ours. Refused: anything
    else, and the working folder, the home folder, the root, a `protected` folder or any of
    their parents, whatever they hold.
    """
    target = Path(target)
    resolved = target.resolve()
    for guarded in (Path.cwd(), Path.home(), Path(resolved.anchor), *map(Path, protected)):
        guarded = guarded.resolve()
        if guarded == resolved or resolved in guarded.parents:
            raise OutputPathError(
                f"{what} {target} would replace {'that folder' if guarded == resolved else 'a folder holding ' + str(guarded)}; "
                f"name a new folder for it, e.g. {target / 'moe-runtime-store'}"
            )
    if target.is_symlink():
        raise OutputPathError(f"{what} {target} is a symbolic link; name a new folder (or the folder it points to)")
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{what} {target} is a file, not a folder; name a new folder for it")
    if target.is_dir() and any(target.iterdir()) and not is_ours(target, legacy):
        raise OutputPathError(
            f"{what} {target} holds files that moe-runtime did not write (no {OWNER_MARK}); they are left as they are. "
            f"Name a new or empty folder, e.g. {target / 'moe-runtime-store'}"
        )
    check_writable(target / OWNER_MARK, what)
    return target


@contextlib.contextmanager
def staging_directory(
    target: str | os.PathLike, what: str, *, protected: Iterable[str | os.PathLike] = (), legacy: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """A temporary folder next to `target` that takes the target's place when the block succeeds."""
    target = check_replaceable(target, what, protected=protected, legacy=legacy)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target, legacy)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-{os.getpid()}-", dir=target.parent))
    try:
        (staging / OWNER_MARK).write_text(json.dumps({"what": what}) + "\n")
        yield staging
        _swap_in(staging, target, what, legacy)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, target: Path, what: str, legacy) -> None:
    """Put the finished `staging` folder at `target`; an older folder of ours goes only after."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        os.replace(staging, target)
        return
    check_replaceable(target, what, legacy=legacy)  # it may have changed while we wrote
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-{os.getpid()}-", dir=target.parent))
    os.replace(target, old)  # an empty folder is replaced by rename(2)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(target: Path, legacy: Callable[[Path], bool] | None = None) -> None:
    """Delete what a killed process left beside `target`: our staging or swapped-out folders."""
    for sibling in target.parent.glob(f".{target.name}.*-*-*"):
        match = _LEFTOVER.match(sibling.name)
        if not match or match["name"] != target.name or _alive(int(match["pid"])) or not sibling.is_dir():
            continue
        if is_ours(sibling, legacy):
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                sibling.rmdir()  # killed before its mark was written: empty


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
