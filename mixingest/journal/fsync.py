"""
When the journal makes appended data durable, and the system calls that do it.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import attr

__all__ = ["FsyncPolicy", "defaultSync", "syncDirectory"]


@attr.s(frozen=True, slots=True, auto_attribs=True)
class FsyncPolicy:
    """
    How long an acknowledged append may live only in the page cache.

    C{always}: an append fires only after its data is fsynced (group commit
    keeps that to one fsync per batch of concurrent appends).  C{interval}:
    an append fires once written; written data is fsynced at most
    C{interval} seconds later, so a machine crash (not a process crash) may
    lose that much.  C{never}: fsync is left to the kernel, except on
    L{flush<mixingest.journal.writer.JournalWriter.flush>} and close.

    @ivar mode: C{"always"}, C{"interval"} or C{"never"}.
    @ivar interval: seconds between fsyncs for C{"interval"}, else C{None}.
    """

    mode: str
    interval: Optional[float] = None

    @classmethod
    def always(cls) -> FsyncPolicy:
        return cls("always")

    @classmethod
    def never(cls) -> FsyncPolicy:
        return cls("never")

    @classmethod
    def every(cls, milliseconds: int) -> FsyncPolicy:
        """
        @param milliseconds: the longest time written data stays unsynced.
        """
        if milliseconds <= 0:
            raise ValueError(f"fsync interval must be positive, not {milliseconds} ms")
        return cls("interval", milliseconds / 1000.0)

    @classmethod
    def parse(cls, text: str) -> FsyncPolicy:
        """
        Parse the command-line form: C{always}, C{never} or C{interval:MS}.

        @raise ValueError: with a message fit for a usage error.
        """
        if text == "always":
            return cls.always()
        if text == "never":
            return cls.never()
        prefix, sep, ms = text.partition(":")
        if prefix == "interval" and sep and ms.isdigit():
            return cls.every(int(ms))
        raise ValueError(
            f"invalid fsync policy {text!r}: expected 'always', 'never' or "
            "'interval:MS' with MS a positive number of milliseconds"
        )

    @property
    def syncsEveryAppend(self) -> bool:
        return self.mode == "always"

    @property
    def syncsEver(self) -> bool:
        """
        Whether segment creation and rotation should be made durable too.
        """
        return self.mode != "never"

    def __str__(self) -> str:
        if self.interval is not None:
            return f"interval:{round(self.interval * 1000)}"
        return self.mode


defaultSync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
"""
Make a segment's appended bytes durable.  C{fdatasync} is enough for an
append-only file (it still flushes the size that the new data needs) and
skips the timestamp update that C{fsync} would also write.
"""


def syncDirectory(path: str) -> None:
    """
    Make the creation, rename or removal of entries in C{path} durable: an
    fsynced file is still lost after a crash if its directory entry is not.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
