"""The one lock of the app: an exclusive `flock` on a path (a run directory, or a lock file).

The kernel releases it when the process dies, even by SIGKILL, so a crashed job never leaves a
stale lock. Used for run directories (one process per run: `wait=False`, busy is an error) and
for cache entries built once (the trained base, the converted GGUF: `wait=True`, the second
process waits and then finds the entry built). Not POSIX: no locking (the atomic renames alone
keep caches consistent).

Example:
>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> with exclusive(d):
...     pass
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None


class Busy(OSError):
    """The path is locked by another process (with `wait=False`)."""


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, *, wait: bool = False, waiting_message: str | None = None):
    """Holds an exclusive lock on `path` (created as a file if missing; a directory is locked as is).

    Args:
        path: a directory, or a lock file.
        wait: block until the lock is free (printing `waiting_message` once) instead of raising.
        waiting_message: printed when the lock is held by another process and `wait=True`.

    Raises:
        Busy: another process holds the lock and `wait=False`.
    """
    path = Path(path)
    if fcntl is None:
        yield
        return
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if not wait:
                raise Busy(f"{path} is locked by another process") from None
            if waiting_message:
                print(waiting_message, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
