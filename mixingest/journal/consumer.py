"""
Consumer groups: independent readers of one journal queue, each resuming
from its own durable cursor.

A group's cursor is a checkpoint of the queue (C{DATA_DIR/QUEUE/checkpoint.GROUP},
the same file format and code as the forwarder's), so retention keeps every
segment until all groups have passed it.  Blocking file I/O throughout: use
it from a thread or a separate process, never on a reactor.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from mixingest.journal.framing import HEADER_SIZE, listSegments
from mixingest.journal.fsync import syncDirectory
from mixingest.journal.locks import exclusiveLock
from mixingest.journal.reader import (
    JournalReader,
    Position,
    SegmentCounter,
    backlogAfter,
    backlogAge,
    checkpointTime,
    loadCheckpoint,
    registerCheckpoint,
    writeCheckpoint,
)
from mixingest.naming import validQueueName

__all__ = [
    "FORWARDER_GROUP",
    "HEARTBEAT",
    "Consumer",
    "GroupInUse",
    "Record",
    "endPosition",
    "groupStatus",
    "positionBefore",
    "resetGroup",
]

FORWARDER_GROUP = "forwarder"
"""The checkpoint of the store-and-forward service: not a consumer group."""

HEARTBEAT = 60.0
"""
Seconds after which an idle consumer rewrites its cursor unchanged, so that
C{--group-expiry} tells a live consumer that has nothing to read from one that
is gone.
"""


class GroupInUse(Exception):
    """
    Another consumer of the group has the queue open (in this process or
    another): two would both read every item and commit over each other.
    """


def _lockGroup(queueDir: str, group: str) -> int:
    """
    @return: the descriptor holding the group's lock (C{QUEUE/lock.GROUP}).
    @raise GroupInUse: if another consumer holds it.
    """
    fd = exclusiveLock(os.path.join(queueDir, f"lock.{group}"))
    if fd is None:
        raise GroupInUse(f"consumer group {group!r} of {queueDir} is in use by another consumer")
    return fd


class Record(NamedTuple):
    """
    One item of a queue, as a L{Consumer} returns it.

    @ivar seq: its sequence number: increasing, unique in the queue, with
        gaps only where the journal skipped damage or lost unsynced data.
    @ivar position: just after it: L{Consumer.commit} this once the item,
        and every one before it, is processed.
    @ivar payload: the item as the daemon stored it (one JSON object).
    """

    seq: int
    position: Position
    payload: bytes


def _checkGroup(group: str) -> None:
    if not validQueueName(group):
        raise ValueError(f"invalid group name {group!r}")
    if group == FORWARDER_GROUP:
        raise ValueError(f"{FORWARDER_GROUP!r} is reserved for the store-and-forward service")


def _segmentStart(base: int) -> Position:
    return Position(base, HEADER_SIZE, base)


def endPosition(queueDir: str) -> Optional[Position]:
    """
    @return: the position just after the last intact record of the queue
        (C{None} when it has no segment): reading from it returns only what
        is appended later.  Reads the newest segment once.
    """
    bases = listSegments(queueDir)
    if not bases:
        return None
    with JournalReader(queueDir) as reader:
        reader.seek(_segmentStart(bases[-1]))
        while reader.read(10_000, 16 * 1024 * 1024, markers=True):
            pass
        return reader.position


def positionBefore(queueDir: str, seq: int) -> Optional[Position]:
    """
    @return: the position from which reading returns the items numbered
        C{seq} or higher; C{None} (the start) if C{seq} is older than every
        segment, the end if no item has it yet.
    """
    bases = [base for base in listSegments(queueDir) if base <= seq]
    if not bases:
        return None
    with JournalReader(queueDir) as reader:
        previous = _segmentStart(bases[-1])
        reader.seek(previous)
        while True:
            batch = reader.read(10_000, 16 * 1024 * 1024, markers=True)
            if not batch:
                return reader.position
            for position, _ in batch:
                if position.seq - 1 >= seq:
                    return previous
                previous = position


def resetGroup(dataDir: str, queue: str, group: str, to: str) -> Optional[Position]:
    """
    Move a group's cursor (creating the group if needed).  The group's
    consumer must be stopped first: a running one would commit over it.

    @param to: C{"start"}, C{"end"} or a sequence number.
    @return: the new cursor (C{None}: the start of the queue).
    @raise ValueError: for a bad group, queue or C{to}.
    @raise GroupInUse: while a consumer of the group runs.
    """
    _checkGroup(group)
    if to not in ("start", "end") and not to.isdigit():
        raise ValueError(f"reset to start, end or a sequence number, not {to!r}")
    queueDir = _queueDirectory(dataDir, queue)
    lock = _lockGroup(queueDir, group)
    try:
        if to == "start":
            position = None
        elif to == "end":
            position = endPosition(queueDir)
        else:
            position = positionBefore(queueDir, int(to))
        writeCheckpoint(queueDir, group, position)
    finally:
        os.close(lock)
    return position


def _queueDirectory(dataDir: str, queue: str) -> str:
    """
    @return: the directory of C{queue}, created (as the daemon would) if
        missing, so that a group can register before the first event.
    @raise FileNotFoundError: if C{dataDir} does not exist.
    """
    if not validQueueName(queue):
        raise ValueError(f"invalid queue name {queue!r}")
    if not os.path.isdir(dataDir):
        raise FileNotFoundError(f"no journal directory {dataDir}")
    queueDir = os.path.join(dataDir, queue)
    try:
        os.mkdir(queueDir, 0o700)
    except FileExistsError:
        pass
    else:
        syncDirectory(dataDir)
    return queueDir


class Consumer:
    """
    Reads a queue as a member of a consumer group: L{poll} returns the next
    items after the group's cursor, L{commit} durably moves the cursor.

    Delivery is at least once: after a crash, a consumer (of the same group)
    opened again resumes after the last commit, so it sees again exactly the
    items that were polled but not committed; never a gap.  One consumer per
    group at a time, enforced by a lock (C{QUEUE/lock.GROUP}) that the
    kernel releases if the consumer dies: a second one gets L{GroupInUse}.

    @ivar group: the group name.
    @ivar queueDir: the queue's directory.
    """

    def __init__(
        self,
        dataDir: str,
        queue: str,
        group: str,
        start: str = "start",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """
        @param start: where a group that does not exist yet begins:
            C{"start"} (every item still in the queue) or C{"end"} (only
            items appended from now on).  An existing group resumes at its
            cursor whatever this says.
        @raise ValueError: for a bad queue or group name (C{forwarder} is
            reserved), or a damaged cursor file.
        @raise FileNotFoundError: if C{dataDir} does not exist.
        @raise GroupInUse: if another consumer of the group is open.
        """
        _checkGroup(group)
        if start not in ("start", "end"):
            raise ValueError(f"start must be 'start' or 'end', not {start!r}")
        self.group = group
        self.queueDir = _queueDirectory(dataDir, queue)
        self._clock = clock
        self._lock: Optional[int] = _lockGroup(self.queueDir, group)
        try:
            if start == "end" and checkpointTime(self.queueDir, group) is None:
                writeCheckpoint(self.queueDir, group, endPosition(self.queueDir))
            else:
                registerCheckpoint(self.queueDir, group)
            self._reader = JournalReader(self.queueDir, group)
        except BaseException:
            self._unlock()
            raise
        self._written = clock()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """
        Close the reader and release the group for another consumer.
        """
        self._reader.close()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    @property
    def committed(self) -> Optional[Position]:
        """
        The group's cursor as this consumer last read or wrote it.
        """
        return self._reader.committed

    @property
    def damagedRanges(self) -> int:
        """
        Damaged ranges skipped so far (each one is also logged at error).
        """
        return self._reader.damagedRanges

    def poll(self, maxItems: int = 1000, maxBytes: int = 1024 * 1024) -> List[Record]:
        """
        Read the next items, without waiting: poll again later (a daemon
        appending meanwhile is fine) when this returns nothing.

        @param maxBytes: stop before the payloads add up to more, except
            that one larger item is still returned alone.
        """
        batch = self._reader.read(maxItems, maxBytes)
        if not batch and self._clock() - self._written >= HEARTBEAT:
            writeCheckpoint(self.queueDir, self.group, self._reader.committed)
            self._written = self._clock()
        return [Record(position.seq - 1, position, payload) for position, payload in batch]

    def commit(self, position: Optional[Position] = None) -> None:
        """
        Durably move the group's cursor (fsynced, atomically replaced).

        @param position: the L{Record.position} of the last processed item;
            by default, everything L{poll} returned so far (and any markers
            or damage skipped after it).
        """
        if position is None:
            position = self._reader.position
            if position is None:
                return
        self._reader.commit(position)
        self._written = self._clock()

    def lag(self) -> Tuple[int, int]:
        """
        @return: C{(items, bytes)} in the queue after the group's cursor.
        """
        return self._reader.backlog()


def groupStatus(counter: SegmentCounter, group: str, now: float) -> Dict[str, object]:
    """
    A group's (or the forwarder's) cursor and lag in the queue that
    C{counter} counts: C{position} (C{None} before its first commit),
    C{nextSeq} (the least number it reads next), C{lagItems}, C{lagBytes},
    C{lagSeconds} (see L{backlogAge}) and C{lastCommit} (POSIX time of the
    last commit or heartbeat).

    @raise ValueError: for a damaged cursor file.
    """
    position = loadCheckpoint(counter.queueDir, group)
    items, size = backlogAfter(counter, position)
    bases = listSegments(counter.queueDir)
    nextSeq = position.seq if position is not None else bases[0] if bases else 0
    return {
        "position": None if position is None else position._asdict(),
        "nextSeq": nextSeq,
        "lagItems": items,
        "lagBytes": size,
        "lagSeconds": round(backlogAge(counter, position, items, now), 3),
        "lastCommit": checkpointTime(counter.queueDir, group),
    }
