"""
Secrets read from files, so that they stay out of the process list.

A password given on the command line is visible to every local user in
C{/proc/PID/cmdline}, of the daemon and of each of its workers; a file
readable by its owner alone is not.
"""

from __future__ import annotations

import os
import stat

from twisted.logger import Logger

__all__ = ["REDIS_PASSWORD_ENV", "readSecretFile", "warnIfExposed"]

REDIS_PASSWORD_ENV = "MIXINGEST_REDIS_PASSWORD"
"""The environment variable that may hold the Redis password."""

log = Logger()


def warnIfExposed(path: str, what: str) -> bool:
    """
    Log a warning if the file at C{path} may be read by users other than
    its owner.

    @param what: what the file holds, for the message.
    @return: whether it may.
    """
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warn(
            "{what} file {path} is readable by other users (mode {mode:o}); "
            "make it private: chmod 600 {path}",
            what=what,
            path=path,
            mode=stat.S_IMODE(mode),
        )
        return True
    return False


def readSecretFile(path: str, what: str) -> str:
    """
    Read a secret kept alone in a file (one line; a final newline is not
    part of it), warning if others may read the file.

    @raise ValueError: if the file cannot be read or is empty.
    """
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the {what} file {path!r}: {e}") from None
    secret = secret.removesuffix("\n").removesuffix("\r")
    if not secret:
        raise ValueError(f"the {what} file {path!r} is empty")
    warnIfExposed(path, what)
    return secret
