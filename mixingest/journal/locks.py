"""
Exclusive locks on files of the journal directory: one writer per journal,
one consumer per group.  They are C{flock}s, so the kernel releases them when
their holder dies, however it dies: a crash never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
from typing import Optional

__all__ = ["exclusiveLock"]


def exclusiveLock(path: str) -> Optional[int]:
    """
    Take an exclusive lock on C{path} (created if missing), without waiting.

    @return: the descriptor that holds it (close it to release the lock),
        or C{None} if another holder has it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
