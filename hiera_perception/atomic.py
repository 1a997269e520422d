"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Write to a temporary file in the destination folder, flush and fsync it, rename it over the target
(atomic on POSIX within one file system), then fsync the folder so the rename itself survives a crash.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_replace", "check_writable", "leftovers",
           "locked_folder", "temp_beside"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path`, on error it is removed."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; these are ordinary data files
        with os.fdopen(fd, mode) as f:
            yield f
        atomic_replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on a folder itself (no lock file left behind) while files in it are read, changed and
    replaced by more than one process."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; each file is still replaced atomically
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def atomic_replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished file `tmp` (written by anyone, e.g. a video writer) over `path` in the same folder:
    fsync it, rename it, fsync the folder."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def check_writable(path: str | os.PathLike) -> None:
    """Fail now, before long work, where `atomic_write(path)` would fail at its end: `path` is a folder, or its
    folder cannot be made or written. Raises ValueError or OSError naming `path`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_beside(path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None


def leftovers(path: str | os.PathLike) -> list[Path]:
    """Temporary files of writes to `path` that never finished: their process was killed outright (SIGKILL, power
    loss) before it could remove them."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp*"))


def temp_beside(path: Path, keep_suffix: bool = False) -> tuple[int, str]:
    """(fd, name) of a new temporary file beside `path`, a name no other writer gets; `keep_suffix` ends it with
    path's suffix (a video writer picks its container by it). The one naming rule: `leftovers` finds them by it."""
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + (path.suffix if keep_suffix else ""),
                            dir=path.parent)
