"""Advisory file locks (flock): released by the kernel when a process dies, even by SIGKILL."""

from __future__ import annotations

import contextlib
import fcntl
import os

from .errors import LockedError


@contextlib.contextmanager
def file_lock(path: str, exclusive: bool = True, busy: str = "another mvc process holds a lock"):
    """Hold *path* locked (shared or exclusive) for the block; LockedError(*busy*) if that would wait."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise LockedError(busy) from e
        yield
    finally:
        os.close(fd)
