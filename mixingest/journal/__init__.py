"""
The embedded durable journal: the default queue, and the store-and-forward
buffer for a remote queue that is down.

Each queue is a directory of append-only segment files of CRC-checked
records; appends are acknowledged under an L{FsyncPolicy}, with group
commit so that C{fsync=always} costs one fsync per batch of concurrent
requests.  C{python -m mixingest.journal} inspects a journal.
"""

from mixingest.journal.fsync import FsyncPolicy
from mixingest.journal.reader import JournalReader, Position
from mixingest.journal.service import Journal, JournalLocked
from mixingest.journal.writer import DEFAULT_SEGMENT_SIZE, JournalWriter

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "FsyncPolicy",
    "Journal",
    "JournalLocked",
    "JournalReader",
    "JournalWriter",
    "Position",
]
