"""
Reading a journal queue: blocking, so call it from a thread (or a CLI).

Readers never lock anything and may run while the daemon appends: a record
that runs past the end of the newest segment is one still being written, so
reading stops there ("not yet") and sees it on a later call.

Damage costs only the damaged bytes (format 2): a reader skips from a bad
record to the next intact one, once it is certain that the bad bytes are
damage and not a record still being written: an intact record after them
proves it, as does a newer segment (the writer never touches an older one
again).  Each skipped range is logged once and counted in
L{JournalReader.damaged}.  A format 1 segment has no sync marker, so the
rest of it is skipped (once it is not the newest).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

from twisted.logger import Logger

from mixingest.journal.framing import (
    BAD,
    HEADER_SIZE,
    OK,
    Marker,
    SegmentScanner,
    Survey,
    listSegments,
    segmentPath,
)
from mixingest.journal.fsync import syncDirectory
from mixingest.naming import validQueueName

__all__ = [
    "JournalReader",
    "Position",
    "SegmentCounter",
    "backlogAfter",
    "backlogAge",
    "checkpointTime",
    "deleteCheckpoint",
    "deleteConsumedSegments",
    "deleteSegmentsBefore",
    "highestCheckpointSeq",
    "listCheckpoints",
    "listQueues",
    "loadCheckpoint",
    "registerCheckpoint",
    "writeCheckpoint",
]

log = Logger()

_CHECKPOINT_NAME = re.compile(r"\Acheckpoint\.([A-Za-z0-9_-]{1,64})\Z")


class Position(NamedTuple):
    """
    A place in a queue: just after a record, or at the start of a segment.

    @ivar segment: the base sequence number naming the segment file.
    @ivar offset: the byte offset in that file.
    @ivar seq: the least sequence number that the record at C{offset} may
        have: the number of the record just before it plus one (the next
        one has more after damage or a gap).  At a segment start, the
        segment's base; just after a skipped damaged range, the number of the
        intact record there.
    @ivar crc: the payload CRC-32 of the record just before C{offset} (0 at
        a segment start or after damage), so that a checkpoint can tell
        whether that record is still there.
    """

    segment: int
    offset: int
    seq: int
    crc: int = 0


def _segmentStart(base: int) -> Position:
    return Position(base, HEADER_SIZE, base)


def listQueues(dataDir: str) -> List[str]:
    """
    @return: the names of the queues in journal directory C{dataDir}, sorted.
    """
    try:
        names = os.listdir(dataDir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if validQueueName(n) and os.path.isdir(os.path.join(dataDir, n)))


def listCheckpoints(queueDir: str) -> List[str]:
    """
    @return: the names of the checkpoints of queue directory C{queueDir}.
    """
    try:
        names = os.listdir(queueDir)
    except FileNotFoundError:
        return []
    return sorted(m.group(1) for m in map(_CHECKPOINT_NAME.match, names) if m is not None)


def _checkpointPath(queueDir: str, name: str) -> str:
    return os.path.join(queueDir, f"checkpoint.{name}")


def loadCheckpoint(queueDir: str, name: str) -> Optional[Position]:
    """
    @return: the committed position of checkpoint C{name}, or C{None} if it
        was never committed (no file, or one that L{registerCheckpoint}
        wrote: read from the oldest segment).
    @raise ValueError: if the file is damaged.  Checkpoints are replaced by
        an atomic rename so this means outside interference; starting over
        silently could resend gigabytes, so it is left to an operator.
    """
    path = _checkpointPath(queueDir, name)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        fields = json.loads(data)
        if fields is None:
            return None
        position = Position(fields["segment"], fields["offset"], fields["seq"], fields["crc"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: damaged checkpoint file {data[:100]!r}") from None
    if not all(isinstance(x, int) and x >= 0 for x in position):
        raise ValueError(f"{path}: damaged checkpoint file {data[:100]!r}")
    return position


def writeCheckpoint(queueDir: str, name: str, position: Optional[Position]) -> None:
    """
    Durably replace checkpoint C{name} with C{position} (C{None}: registered,
    nothing consumed yet).

    The file is replaced atomically (temporary file, fsync, rename, fsync of
    the directory), so a crash leaves the old or the new checkpoint, never a
    mix.
    """
    path = _checkpointPath(queueDir, name)
    tmp = path + ".tmp"
    fields = None if position is None else position._asdict()
    data = json.dumps(fields).encode("ascii") + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    syncDirectory(queueDir)


def registerCheckpoint(queueDir: str, name: str) -> bool:
    """
    Create checkpoint C{name} with nothing consumed, unless it exists: from
    then on, L{deleteConsumedSegments} keeps every segment until it moves.

    @return: whether it was created.
    """
    if os.path.exists(_checkpointPath(queueDir, name)):
        return False
    writeCheckpoint(queueDir, name, None)
    return True


def deleteCheckpoint(queueDir: str, name: str) -> bool:
    """
    Remove checkpoint C{name}: segments are no longer kept for it.

    @return: whether it existed.
    """
    try:
        os.unlink(_checkpointPath(queueDir, name))
    except FileNotFoundError:
        return False
    syncDirectory(queueDir)
    return True


def checkpointTime(queueDir: str, name: str) -> Optional[float]:
    """
    @return: when checkpoint C{name} was last written (POSIX time), or
        C{None} if it does not exist.
    """
    try:
        return os.stat(_checkpointPath(queueDir, name)).st_mtime
    except FileNotFoundError:
        return None


def highestCheckpointSeq(queueDir: str) -> int:
    """
    @return: the highest sequence number that any readable checkpoint of
        C{queueDir} reached (0 without one).  Checkpoints are fsynced, so
        this survives a power loss that took records a reader had already
        returned: the writer numbers new records past it, never reusing a
        number that a reader may have passed on.
    """
    highest = 0
    for name in listCheckpoints(queueDir):
        with contextlib.suppress(ValueError):
            position = loadCheckpoint(queueDir, name)
            if position is not None:
                highest = max(highest, position.seq)
    return highest


class _Counted(NamedTuple):
    survey: Survey
    size: int
    sealed: bool


class SegmentCounter:
    """
    Counts the intact records of segments, remembering what it counted: a
    segment that is no longer the newest never changes, and the newest only
    grows (short of crash recovery, after which it is counted again).
    Markers count as records.
    """

    def __init__(self, queueDir: str) -> None:
        self.queueDir = queueDir
        self._known: Dict[int, _Counted] = {}

    def count(self, base: int, sealed: bool) -> Tuple[int, int]:
        """
        @param sealed: whether a newer segment exists.
        @return: C{(records, size)}: intact records and bytes of segment
            C{base}; C{(0, 0)} if it is gone.
        """
        known = self._known.get(base)
        if known is not None and known.sealed:
            return known.survey.records, known.size
        try:
            scanner = SegmentScanner(segmentPath(self.queueDir, base))
        except FileNotFoundError:
            self._known.pop(base, None)
            return 0, 0
        try:
            size = scanner.size()
            if scanner.header() != OK:
                return 0, size
            if known is not None and known.survey.end <= size:
                old = known.survey
                survey = scanner.survey(old.end, old.nextSeq)
                _merge(old, survey)
                survey = old
            else:
                survey = scanner.survey(HEADER_SIZE, base)
            # Remember where counting stopped, not the size: the tail may
            # be a record still being written.
            self._known[base] = _Counted(survey, size, sealed)
        finally:
            scanner.close()
        return survey.records, size

    def recordsFrom(self, base: int, seq: int) -> int:
        """
        @return: how many of the records that L{count} last found in segment
            C{base} have sequence numbers C{seq} or higher.
        """
        known = self._known.get(base)
        if known is None:
            return 0
        return sum(
            min(count, first + count - seq)
            for first, count in known.survey.runs
            if first + count > seq
        )

    def prune(self, bases: List[int]) -> None:
        """
        Forget segments that are not in C{bases} any more.
        """
        for base in set(self._known).difference(bases):
            del self._known[base]


def _merge(old: Survey, more: Survey) -> None:
    """
    Extend C{old} with C{more}, a survey that carried on where it stopped.
    """
    runs = more.runs
    if runs and old.runs and old.runs[-1][0] + old.runs[-1][1] == runs[0][0]:
        old.runs[-1][1] += runs[0][1]
        runs = runs[1:]
    old.runs.extend(runs)
    old.records += more.records
    old.nextSeq = more.nextSeq
    old.end = more.end
    old.damaged.extend(more.damaged)


def backlogAfter(counter: SegmentCounter, position: Optional[Position]) -> Tuple[int, int]:
    """
    @param position: where reading would resume; C{None} for the start.
    @return: C{(records, bytes)} in the queue after C{position}.  Records
        include markers.  Bytes count framing and any damage too: they
        measure disk use.
    """
    bases = listSegments(counter.queueDir)
    counter.prune(bases)
    records = size = 0
    for i, base in enumerate(bases):
        if position is not None and base < position.segment:
            continue
        n, nbytes = counter.count(base, sealed=i < len(bases) - 1)
        if position is not None and base == position.segment:
            records += counter.recordsFrom(base, position.seq)
            size += max(0, nbytes - position.offset)
        else:
            records += n
            size += max(0, nbytes - HEADER_SIZE)
    return records, size


def backlogAge(
    counter: SegmentCounter, position: Optional[Position], items: int, now: float
) -> float:
    """
    How long ago the segment holding the record after C{position} was last
    written: 0 when nothing is left (C{items} is 0), and at most the age of
    the oldest record left (a lower bound, to the resolution of a segment).
    """
    if items == 0:
        return 0.0
    bases = listSegments(counter.queueDir)
    if position is not None:
        if counter.recordsFrom(position.segment, position.seq) == 0:
            bases = [base for base in bases if base > position.segment]
        else:
            bases = [base for base in bases if base >= position.segment]
    for base in bases:
        try:
            return max(0.0, now - os.stat(segmentPath(counter.queueDir, base)).st_mtime)
        except FileNotFoundError:
            continue
    return 0.0


def deleteSegmentsBefore(queueDir: str, floor: int) -> List[int]:
    """
    Delete, durably, the segments of C{queueDir} whose first record is
    before C{floor}, but never the newest: the writer may be appending to it.

    @return: the base sequence numbers of the deleted segments.
    """
    deleted = [base for base in listSegments(queueDir)[:-1] if base < floor]
    for base in deleted:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(segmentPath(queueDir, base))
    if deleted:
        syncDirectory(queueDir)
    return deleted


def deleteConsumedSegments(queueDir: str) -> List[int]:
    """
    Delete the segments that every checkpoint has read past.

    For the store-and-forward case, where the journal only holds what a
    remote queue has not taken yet.  Nothing is deleted if the queue has no
    checkpoint, and the newest segment never is.

    @return: the base sequence numbers of the deleted segments.
    """
    names = listCheckpoints(queueDir)
    positions = [loadCheckpoint(queueDir, name) for name in names]
    if not positions or None in positions:
        return []
    floor = min(p.segment for p in positions if p is not None)
    deleted = deleteSegmentsBefore(queueDir, floor)
    if deleted:
        log.info(
            "journal {queueDir}: deleted {count} consumed segments",
            queueDir=queueDir,
            count=len(deleted),
        )
    return deleted


class JournalReader:
    """
    Reads one queue's items in order, optionally from and to a named,
    durable checkpoint.

    Each item comes with the L{Position} just after it; L{commit} that
    position once the item is safely elsewhere, and a reader opened later
    with the same checkpoint name resumes after it.

    @ivar damaged: bytes of damage skipped so far.
    @ivar damagedRanges: how many damaged ranges they were.
    """

    def __init__(self, queueDir: str, checkpointName: Optional[str] = None) -> None:
        """
        @param checkpointName: resume from (and L{commit} to) this
            checkpoint; C{None} to read from the oldest segment and never
            commit.
        @raise ValueError: for a bad checkpoint name or a damaged checkpoint.
        """
        if checkpointName is not None and not validQueueName(checkpointName):
            raise ValueError(f"invalid checkpoint name {checkpointName!r}")
        self.queueDir = queueDir
        self.checkpointName = checkpointName
        self.committed: Optional[Position] = (
            None if checkpointName is None else loadCheckpoint(queueDir, checkpointName)
        )
        self._position = self.committed
        self._verify = self.committed is not None
        self._scanner: Optional[SegmentScanner] = None
        self._headerOK = False
        self._counter = SegmentCounter(queueDir)
        self._resyncAt: Optional[Tuple[int, int, int]] = None
        self.damaged = 0
        self.damagedRanges = 0

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._scanner is not None:
            self._scanner.close()
            self._scanner = None

    @property
    def position(self) -> Optional[Position]:
        """
        Where the next L{read} starts; C{None} until there is a first segment.
        """
        return self._position

    def seek(self, position: Position) -> None:
        """
        Continue reading at C{position} (one that a read returned).
        """
        self.close()
        self._position = position
        self._resyncAt = None

    def _openSegment(self) -> bool:
        """
        Open the segment of the current position (or the oldest, or the
        next one if it was deleted).

        @return: whether there is a segment to read.
        """
        while self._scanner is None:
            bases = listSegments(self.queueDir)
            position = self._position
            if position is None:
                if not bases:
                    return False
                position = _segmentStart(bases[0])
            elif position.segment not in bases:
                later = [base for base in bases if base > position.segment]
                if not later:
                    return False
                log.warn(
                    "journal {queueDir}: segment {segment} is gone, continuing at {base}",
                    queueDir=self.queueDir,
                    segment=position.segment,
                    base=later[0],
                )
                position = _segmentStart(later[0])
            try:
                self._scanner = SegmentScanner(segmentPath(self.queueDir, position.segment))
            except FileNotFoundError:
                continue  # deleted between listing and opening: list again
            if self._verify:
                self._verify = False
                if not self._isRecordBoundary(self._scanner, position):
                    log.error(
                        "journal {path}: checkpoint {name} at offset {offset} (seq {seq}) "
                        "does not match the segment, which lost data in a crash; "
                        "rereading the segment from its start",
                        path=self._scanner.path,
                        name=self.checkpointName,
                        offset=position.offset,
                        seq=position.seq,
                    )
                    position = _segmentStart(position.segment)
            self._position = position
            self._headerOK = False
        return True

    @staticmethod
    def _isRecordBoundary(scanner: SegmentScanner, position: Position) -> bool:
        """
        Whether C{position} is still where a record ends in its segment.

        It may not be after a machine crash: a reader can read (and commit
        past) data that was written but not yet fsynced, and the writer then
        appends in its place after recovery.  Resuming mid-record would stall
        the reader forever, and resuming at the old offset could skip new
        records, so the caller rereads the segment (at-least-once) instead.

        In format 2 this looks only at the records next to C{position}, so
        damage elsewhere in the segment does not matter: the record starting
        there has the expected number, or the one ending there has the
        number and CRC that the checkpoint remembers.
        """
        if position.offset == HEADER_SIZE:
            return position.seq == position.segment
        if scanner.header() != OK:
            return False
        if scanner.version == 1:
            return JournalReader._isRecordBoundaryV1(scanner, position)
        status, _, _, _, seq = scanner.recordAt(position.offset)
        if status == OK and seq == position.seq:
            return True
        return scanner.recordEndingAt(position.offset) == (position.seq - 1, position.crc)

    @staticmethod
    def _isRecordBoundaryV1(scanner: SegmentScanner, position: Position) -> bool:
        """
        L{_isRecordBoundary} in format 1, which can only walk from the start.
        """
        offset, records, crc = HEADER_SIZE, 0, 0
        while offset < position.offset:
            status, _, offset, crc, _ = scanner.recordAt(offset)
            if status != OK:
                return False
            records += 1
        return (offset, position.segment + records, crc) == (
            position.offset,
            position.seq,
            position.crc,
        )

    def _nextSegment(self, base: int) -> Optional[int]:
        for later in listSegments(self.queueDir):
            if later > base:
                return later
        return None

    def _damage(self, path: str, offset: int, length: int, then: str) -> None:
        """
        Log and count a damaged range that reading skips.
        """
        self.damaged += length
        self.damagedRanges += 1
        log.error(
            "journal {path}: {length} damaged bytes at offset {offset}, skipped; {then}",
            path=path,
            offset=offset,
            length=length,
            then=then,
        )

    def _skipDamage(self, scanner: SegmentScanner, position: Position) -> bool:
        """
        At a bad format 2 record: move to the next intact record if there is
        one.  Where there is none yet, remember how far the search went, so
        that polling the newest segment does not search the same bytes again.

        @return: whether the position moved.
        """
        searchFrom = position.offset + 1
        cached = self._resyncAt
        if cached is not None and cached[:2] == (position.segment, position.offset):
            searchFrom = cached[2]
        status, at, seq = scanner.resync(searchFrom, position.seq)
        if status != OK:
            self._resyncAt = (position.segment, position.offset, at)
            return False
        self._resyncAt = None
        self._damage(scanner.path, position.offset, at - position.offset, "reading on after it")
        self._position = Position(position.segment, at, seq)
        return True

    def read(
        self, maxItems: int = 1000, maxBytes: int = 1024 * 1024, markers: bool = False
    ) -> List[Tuple[Position, bytes]]:
        """
        Read the next items, without waiting for more.

        @param maxItems: return at most this many.
        @param maxBytes: stop before the payloads would add up to more than
            this, except that one larger item is still returned alone.
        @param markers: return marker records too, as L{Marker} payloads;
            otherwise they are skipped (the position still moves past them).
        @return: up to C{maxItems} C{(position after the item, item)}; empty
            when there is nothing more yet.
        @raise JournalFormatError: on reaching a segment of an unknown format.
        """
        out: List[Tuple[Position, bytes]] = []
        size = 0
        later: Optional[int] = None
        while len(out) < maxItems and self._openSegment():
            scanner = self._scanner
            position = self._position
            assert scanner is not None and position is not None
            if not self._headerOK:
                status = scanner.header()
                self._headerOK = status == OK
            if self._headerOK:
                status, payload, end, crc, seq = scanner.recordAt(position.offset, position.seq)
                if status == OK:
                    assert payload is not None
                    if seq < 0:  # format 1: numbered by counting
                        seq = position.seq
                    later = None
                    if not markers and type(payload) is Marker:
                        self._position = Position(position.segment, end, seq + 1, crc)
                        continue
                    if out and size + len(payload) > maxBytes:
                        break
                    position = Position(position.segment, end, seq + 1, crc)
                    self._position = position
                    out.append((position, payload))
                    size += len(payload)
                    continue
                if status == BAD and scanner.version == 2 and self._skipDamage(scanner, position):
                    later = None
                    continue
            scanner.forget()
            if later is None:
                # The end of the segment, or of what the writer has written so
                # far.  If the writer moved on to a newer segment, it had
                # finished this one first: look again, then move on.
                later = self._nextSegment(position.segment)
                if later is None:
                    break
                continue
            # A sealed segment: whatever follows the last intact record is damage.
            rest = scanner.size() - position.offset
            if rest > 0:
                self._damage(scanner.path, position.offset, rest, f"going on with segment {later}")
            self.close()
            self._position = _segmentStart(later)
            self._resyncAt = None
            later = None
        return out

    def __iter__(self) -> Iterator[Tuple[Position, bytes]]:
        """
        Iterate over the items available now, from the current position.
        """
        while True:
            batch = self.read()
            if not batch:
                return
            yield from batch

    def commit(self, position: Position) -> None:
        """
        Durably record that everything up to C{position} is consumed (see
        L{writeCheckpoint}).
        """
        if self.checkpointName is None:
            raise ValueError("this reader has no checkpoint to commit to")
        writeCheckpoint(self.queueDir, self.checkpointName, position)
        self.committed = position

    def backlog(self) -> Tuple[int, int]:
        """
        @return: C{(records, bytes)} after the committed checkpoint (after
            the start of the queue without one).  Counting reads each
            segment once; later calls only read what was appended since.
        """
        return backlogAfter(self._counter, self.committed)

    def backlogAge(self, now: float) -> float:
        """
        @return: seconds since the segment holding the first record after
            the committed checkpoint was last written (see L{backlogAge}).
        """
        return backlogAge(self._counter, self.committed, self.backlog()[0], now)
