"""
The embedded durable journal: the default queue, and the store-and-forward
buffer for a remote queue that is down.

Each queue is a directory of append-only segment files of CRC-checked
records; appends are acknowledged under an L{FsyncPolicy}, with group
commit so that C{fsync=always} costs one fsync per batch of concurrent
requests.  L{Consumer} reads a queue as a consumer group with a durable
cursor; C{python -m mixingest.journal} inspects and consumes a journal.
"""

from mixingest.journal.consumer import Consumer, GroupInUse, Record, resetGroup
from mixingest.journal.fsync import FsyncPolicy
from mixingest.journal.reader import JournalReader, Position
from mixingest.journal.retention import RetentionPolicy
from mixingest.journal.service import Journal, JournalLocked, RetentionExceeded
from mixingest.journal.writer import DEFAULT_SEGMENT_SIZE, JournalWriter

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "Consumer",
    "FsyncPolicy",
    "GroupInUse",
    "Journal",
    "JournalLocked",
    "JournalReader",
    "JournalWriter",
    "Position",
    "Record",
    "RetentionExceeded",
    "RetentionPolicy",
    "resetGroup",
]
