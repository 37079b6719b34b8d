"""
Appending to a journal queue: group commit on a writer thread.

L{JournalWriter} lives in the reactor thread and owns the batching: while
one write (and fsync) runs on the journal's single writer thread, every
append that arrives is queued, and the next write takes them all at once.
Under C{fsync=always} this means one thread hop and one fsync per group,
however many requests wait on it.  L{SegmentWriter} does the blocking file
work on that thread; only one call into it runs at a time.

Failure handling: when a write or an fsync fails, nothing about the
current segment's unwritten tail can be trusted (after a failed fsync Linux
may drop the dirty pages and report success next time).  So the writer
fails the appends of that group I{and} every append queued behind it,
abandons the segment (closes it, or deletes it if it holds no records), and
refuses appends (L{QueueUnavailable}, C{ready()} false) until a probe, every
L{RETRY_DELAY} seconds, manages to start a fresh segment and fsync it.
Appending then continues in that new segment; bytes already in the old
one are never rewritten, so readers' positions stay valid and readers skip
any torn tail it was left with.  Records of a failed group that did reach
the disk whole may still be read: at-least-once, as for remote queues.
Under C{interval} and C{never}, appends are acknowledged before their
fsync: when an fsync then fails, the records acknowledged since the last
good one may be lost, and are counted (C{possiblyLost} in the status).

Recovery, when a queue is first written after a start, tells a torn tail
from damage in the middle of the newest segment: bytes with no intact
record after them are what a crash left mid-write and are cut off; damage
with intact records after it is logged and kept, and appends go on after
the last intact record.  A newest segment in format 1 is left as it is and
appends go to a new format 2 segment.
"""

from __future__ import annotations

import contextlib
import os
import time
from bisect import bisect_left
from typing import Callable, List, Optional, Sequence, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mixingest.errors import QueueUnavailable
from mixingest.journal.framing import (
    HEADER,
    HEADER_SIZE,
    INCOMPLETE,
    MAX_PAYLOAD,
    RECORD_HEADER_SIZE,
    V1_RECORD_HEADER_SIZE,
    JournalFormatError,
    SegmentScanner,
    Survey,
    encodeRecords,
    listSegments,
    segmentPath,
)
from mixingest.journal.fsync import FsyncPolicy, defaultSync, syncDirectory
from mixingest.journal.reader import highestCheckpointSeq

__all__ = ["DEFAULT_SEGMENT_SIZE", "RETRY_DELAY", "JournalWriter", "SegmentWriter"]

log = Logger()

MiB = 1024 * 1024
DEFAULT_SEGMENT_SIZE = 64 * MiB
"""
Segments are rotated before they would grow past this many bytes (unless a
single group is larger).
"""

RETRY_DELAY = 1.0
"""
Seconds between attempts to write again after a write or fsync failed.
"""
FSYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""
Upper bounds, in seconds, of the fsync latency histogram: from an SSD's
half millisecond to a stalled disk.
"""


class SegmentWriter:
    """
    The blocking half of a queue's writer: owns the open newest segment.

    Not thread-safe: the journal's writer thread calls it, one call at a
    time.  The counters are read from the reactor thread for status only.

    @ivar segments: segment files in the queue directory.
    @ivar bytes: their total size.
    @ivar nextSeq: the sequence number the next record gets.
    @ivar fsyncs: segment fsyncs attempted.
    @ivar fsyncFailures: how many of them failed.
    @ivar lastFsyncSeconds: how long the last one took; C{None} before one.
    @ivar fsyncBuckets: fsyncs by duration, one count per bound of
        L{FSYNC_BUCKETS} and one past the last (not cumulative), and
        C{fsyncSecondsTotal} their sum: C{/metrics}' histogram.
    """

    def __init__(
        self,
        queueDir: str,
        policy: FsyncPolicy,
        segmentSize: int,
        sync: Callable[[int], None] = defaultSync,
    ) -> None:
        """
        @param sync: makes a segment's written bytes durable, given its file
            descriptor (a parameter so that tests can count or fail fsyncs).
        """
        self.queueDir = queueDir
        self._policy = policy
        self._segmentSize = segmentSize
        self._sync = sync
        self._fd = -1
        self._base = -1
        self._size = 0
        self._records = 0
        self._dirty = False
        self._fresh = False
        self.segments = 0
        self.bytes = 0
        self.nextSeq = 0
        self.fsyncs = 0
        self.fsyncFailures = 0
        self.lastFsyncSeconds: Optional[float] = None
        self.fsyncBuckets = [0] * (len(FSYNC_BUCKETS) + 1)
        self.fsyncSecondsTotal = 0.0

    def commit(self, items: Sequence[bytes], sync: bool, markers: bool = True) -> None:
        """
        Append C{items} as records, then fsync if C{sync}.  Opens (and
        recovers) the newest segment first if needed, and rotates to a new
        segment before C{items} would take it past the size limit.

        On any error the segment is abandoned (see the module docstring)
        before the error propagates, except for a L{JournalFormatError}:
        that one stays until an operator deals with the segment.

        @param markers: whether C{items} may hold L{Marker}s (see
            L{encodeRecords}).
        """
        counted = False
        try:
            if self._fd < 0:
                self._open()
            if items:
                data = encodeRecords(items, self.nextSeq, markers)
                if self._records and self._size + len(data) > self._segmentSize:
                    self._rotate()  # the new segment is named nextSeq
                self._write(data)
                self._records += len(items)
                self.nextSeq += len(items)
                counted = True
            if sync and self._dirty:
                self._syncNow()
        except JournalFormatError:
            raise
        except BaseException:
            self._abandon(0 if counted else len(items))
            raise

    def close(self) -> None:
        """
        Close the segment; the next L{commit} opens and recovers it again.
        """
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def recount(self) -> List[int]:
        """
        Count segments and bytes again (after segments were deleted, say).

        @return: the segments' base sequence numbers, oldest first.
        """
        bases = listSegments(self.queueDir)
        self.segments = len(bases)
        self.bytes = sum(_sizeOrZero(segmentPath(self.queueDir, b)) for b in bases)
        return bases

    def _open(self) -> None:
        if self._fresh:
            bases = self.recount()
            self._create(max(self.nextSeq, bases[-1] + 1 if bases else 0))
            self._fresh = False
            return
        try:
            os.mkdir(self.queueDir, 0o700)
        except FileExistsError:
            pass
        else:
            if self._policy.syncsEver:
                syncDirectory(os.path.dirname(os.path.abspath(self.queueDir)))
        bases = self.recount()
        if bases:
            self._recover(bases[-1])
        else:
            self._create(0)

    def _recover(self, base: int) -> None:
        """
        Reopen the newest segment for appending, cutting off a torn tail (a
        record that was being written when the process or machine died) but
        keeping damage that has intact records after it.

        New records are numbered past the last intact one, past any number
        that the cut bytes could have held, and past every checkpoint: a
        power loss can take records that a reader had already returned, and
        their numbers must not be given to others (a remote that
        deduplicates by number would drop those).
        """
        path = segmentPath(self.queueDir, base)
        scanner = SegmentScanner(path)
        try:
            size = scanner.size()
            if scanner.header() == INCOMPLETE:
                survey = Survey(0, base)
            else:
                survey = scanner.survey(HEADER_SIZE, base)
        finally:
            scanner.close()
        for offset, length in survey.damaged:
            log.error(
                "journal {path}: {length} damaged bytes at offset {offset}; the records "
                "before and after them are kept",
                path=path,
                offset=offset,
                length=length,
            )
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._base = base
        self._records = survey.records
        end = survey.end
        # The cut bytes may have held records that a reader returned before
        # they were torn or damaged: skip every number they could have held.
        smallest = V1_RECORD_HEADER_SIZE + 1 if scanner.version == 1 else RECORD_HEADER_SIZE + 1
        cut = -(-(size - end) // smallest)
        self.nextSeq = max(survey.nextSeq + cut, highestCheckpointSeq(self.queueDir))
        if end < size:
            log.warn(
                "journal {path}: dropping {dropped} bytes of torn data at offset {offset} "
                "(no intact record after them); {records} records kept",
                path=path,
                dropped=size - end,
                offset=end,
                records=survey.records,
            )
            os.ftruncate(self._fd, end)
            self.bytes -= size - end
            self._dirty = True
        self._size = end
        if end == 0:
            self._write(HEADER)
        elif scanner.version != 2:
            # Never append to an older format: readers that opened it know
            # its version.  A new segment never takes an existing name.
            self.nextSeq = max(self.nextSeq, base + 1)
            self._rotate()

    def _create(self, base: int) -> None:
        self._fd = os.open(
            segmentPath(self.queueDir, base),
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND,
            0o600,
        )
        self._base = base
        self._size = 0
        self._records = 0
        self.nextSeq = base
        self.segments += 1
        self._write(HEADER)
        if self._policy.syncsEver:
            syncDirectory(self.queueDir)

    def _rotate(self) -> None:
        if self._dirty and self._policy.syncsEver:
            self._syncNow()
        self.close()
        self._create(self.nextSeq)

    def _syncNow(self) -> None:
        started = time.perf_counter()
        self.fsyncs += 1
        try:
            self._sync(self._fd)
        except BaseException:
            self.fsyncFailures += 1
            raise
        finally:
            took = self.lastFsyncSeconds = time.perf_counter() - started
            self.fsyncBuckets[bisect_left(FSYNC_BUCKETS, took)] += 1
            self.fsyncSecondsTotal += took
        self._dirty = False

    def _write(self, data: bytes | bytearray) -> None:
        done = 0
        try:
            done = os.write(self._fd, data)
            if done < len(data):
                view = memoryview(data)
                while done < len(data):
                    done += os.write(self._fd, view[done:])
        finally:
            self._size += done
            self.bytes += done
            self._dirty = self._dirty or done > 0

    def _abandon(self, unrecorded: int) -> None:
        """
        Give up the current segment after an error; the next L{commit}
        starts a fresh one, named past every sequence number that may
        already be on disk.

        @param unrecorded: records of the failed group not yet counted in
            L{nextSeq}, which may be on disk all the same.
        """
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self._base >= 0 and self._records == 0:
            # Nothing in it was ever acknowledged: do not leave an empty
            # segment behind for every failed attempt.
            try:
                os.unlink(segmentPath(self.queueDir, self._base))
            except OSError:
                pass
            else:
                self.segments -= 1
                self.bytes -= self._size
        # Never reuse the abandoned segment's name, even if it was deleted: a
        # reader may still have it open.
        self.nextSeq = max(self.nextSeq + unrecorded, self._base + 1)
        self._base = -1
        self._dirty = False
        self._fresh = True


def _sizeOrZero(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


class JournalWriter:
    """
    Appends to one queue of the journal; reactor-owned, no locks.

    The reactor thread only queues items and fires Deferreds; every write
    and fsync runs on C{pool}, whose single thread also serialises the work
    of the other queues.
    """

    def __init__(
        self,
        queueDir: str,
        pool: ThreadPool,
        policy: Optional[FsyncPolicy] = None,
        segmentSize: int = DEFAULT_SEGMENT_SIZE,
        reactor: Optional[IReactorFromThreads] = None,
        clock: Optional[IReactorTime] = None,
        sync: Callable[[int], None] = defaultSync,
    ) -> None:
        """
        @param pool: the journal's writer thread pool, one thread.
        @param policy: when appends are durable; L{FsyncPolicy.always} by
            default.
        @param reactor: delivers the writer thread's results.
        @param clock: times fsyncs under C{interval} and retries after
            failures; C{reactor} by default.
        @param sync: see L{SegmentWriter}.
        """
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = cast(IReactorFromThreads, globalReactor)
        if policy is None:
            policy = FsyncPolicy.always()
        if segmentSize < HEADER_SIZE + 1:
            raise ValueError(f"segment size {segmentSize} is too small")
        self.queue = os.path.basename(queueDir)
        self.files = SegmentWriter(queueDir, policy, segmentSize, sync)
        self._pool = pool
        self._reactor = reactor
        self._clock = clock if clock is not None else cast(IReactorTime, reactor)
        self._policy = policy
        self._items: List[bytes] = []
        self._markers = False
        self._waiters: List[Deferred[None]] = []
        self._flushers: List[Deferred[None]] = []
        self._busy = False
        self._syncDue = False
        self._syncCall: Optional[IDelayedCall] = None
        self._retryCall: Optional[IDelayedCall] = None
        self._closing = False
        self.healthy = True
        self.lastError: Optional[str] = None
        self.appended = 0
        self.possiblyLost = 0
        self._unsynced = 0

    def append(self, items: Sequence[bytes]) -> Deferred[None]:
        """
        Append C{items} in order.

        @param items: payloads; a L{Marker} among them is written as a
            marker record.
        @return: fires with C{None} once the items are stored under the
            policy, or fails with L{QueueUnavailable}; with L{ValueError}
            for an item that is not non-empty C{bytes} of at most
            L{MAX_PAYLOAD}.  Cancelling it does not take the items back.
        """
        if not self.healthy or self._closing:
            return fail(self._unavailable())
        markers = False
        for item in items:
            if type(item) is not bytes:
                markers = True
                if not isinstance(item, bytes):
                    return fail(_badItem(item))
            if not 0 < len(item) <= MAX_PAYLOAD:
                return fail(_badItem(item))
        if not items:
            return succeed(None)
        self._items += items
        self._markers = self._markers or markers
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        if not self._busy:
            self._startGroup()
        return d

    def flush(self) -> Deferred[None]:
        """
        @return: fires once everything appended so far is fsynced, whatever
            the policy.
        """
        if not self.healthy:
            return fail(self._unavailable())
        d: Deferred[None] = Deferred()
        self._flushers.append(d)
        self._syncDue = True
        if not self._busy:
            self._startGroup()
        return d

    def close(self) -> Deferred[None]:
        """
        Refuse new appends, flush what was accepted and close the segment.

        @return: fires when closed; fails if the final flush did.
        """
        self._closing = True
        if self._retryCall is not None:
            self._retryCall.cancel()
            self._retryCall = None
        flushed = self.flush() if self.healthy else succeed(None)

        def closeFile(result: object) -> Deferred[object]:
            if self._syncCall is not None:
                self._syncCall.cancel()
                self._syncCall = None
            closed = deferToThreadPool(self._reactor, self._pool, self.files.close)
            return closed.addCallback(lambda _: result)

        return flushed.addBoth(closeFile)

    def status(self) -> dict[str, object]:
        """
        A JSON-able snapshot.  C{unsynced}: acknowledged records not yet
        fsynced; C{possiblyLost}: acknowledged records that a failed fsync
        may have lost; C{fsyncs} counts attempts, failed ones included.
        """
        files = self.files
        return {
            "healthy": self.healthy,
            "segments": files.segments,
            "bytes": files.bytes,
            "appended": self.appended,
            "pending": len(self._items),
            "lastError": self.lastError,
            "unsynced": self._unsynced,
            "possiblyLost": self.possiblyLost,
            "fsyncs": files.fsyncs,
            "fsyncFailures": files.fsyncFailures,
            "lastFsyncSeconds": files.lastFsyncSeconds,
            "fsyncBuckets": list(files.fsyncBuckets),
            "fsyncSecondsTotal": files.fsyncSecondsTotal,
        }

    def _unavailable(self) -> QueueUnavailable:
        if self._closing:
            return QueueUnavailable(f"journal queue {self.queue} is closed")
        return QueueUnavailable(f"journal queue {self.queue} cannot be written: {self.lastError}")

    def _startGroup(self) -> None:
        """
        Hand everything queued to the writer thread as one group.
        """
        items, waiters, flushers = self._items, self._waiters, self._flushers
        self._items, self._waiters, self._flushers = [], [], []
        markers, self._markers = self._markers, False
        sync = self._syncDue or self._policy.syncsEveryAppend
        self._syncDue = False
        self._busy = True
        d = deferToThreadPool(self._reactor, self._pool, self.files.commit, items, sync, markers)
        d.addCallbacks(
            self._committed,
            self._failed,
            callbackArgs=(len(items), sync, waiters, flushers),
            errbackArgs=(waiters, flushers, self.files.fsyncFailures),
        )

    def _committed(
        self,
        _: None,
        count: int,
        synced: bool,
        waiters: List[Deferred[None]],
        flushers: List[Deferred[None]],
    ) -> None:
        self._busy = False
        self.appended += count
        # A group that asked for an fsync made everything before it durable.
        self._unsynced = 0 if synced else self._unsynced + count
        if not self.healthy:
            self.healthy = True
            log.info("journal queue {queue}: writable again", queue=self.queue)
        if count and not synced and self._policy.interval is not None and self._syncCall is None:
            self._syncCall = self._clock.callLater(self._policy.interval, self._syncSoon)
        # Start the next group before running callbacks: the thread works
        # while the reactor answers.
        if self._items or self._syncDue:
            self._startGroup()
        for d in waiters:
            if not d.called:  # it may have been cancelled
                d.callback(None)
        for d in flushers:
            if not d.called:
                d.callback(None)

    def _failed(
        self,
        failure: Failure,
        waiters: List[Deferred[None]],
        flushers: List[Deferred[None]],
        fsyncFailuresBefore: int,
    ) -> None:
        self._busy = False
        self.healthy = False
        message = f"{failure.value.__class__.__name__}: {failure.value}"
        if self.files.fsyncFailures > fsyncFailuresBefore and self._unsynced:
            # After a failed fsync the kernel may have dropped those pages.
            self.possiblyLost += self._unsynced
            log.error(
                "journal queue {queue}: {count} acknowledged records may be lost: "
                "fsync failed: {error}",
                queue=self.queue,
                count=self._unsynced,
                error=message,
            )
        # The segment is abandoned either way: nothing will fsync it again.
        self._unsynced = 0
        if message != self.lastError:
            log.failure(
                "journal queue {queue}: write failed; refusing appends until a retry works",
                failure,
                queue=self.queue,
            )
        self.lastError = message
        if self._syncCall is not None:
            self._syncCall.cancel()
            self._syncCall = None
        waiters += self._waiters
        flushers += self._flushers
        self._items, self._waiters, self._flushers = [], [], []
        self._syncDue = False
        if not self._closing:
            self._retryCall = self._clock.callLater(RETRY_DELAY, self._retry)
        error = QueueUnavailable(f"journal queue {self.queue} cannot be written: {message}")
        error.__cause__ = failure.value
        for d in waiters:
            if not d.called:
                d.errback(error)
        for d in flushers:
            if not d.called:
                d.errback(error)

    def _syncSoon(self) -> None:
        self._syncCall = None
        self._syncDue = True
        if not self._busy:
            self._startGroup()

    def _retry(self) -> None:
        """
        Probe: start a fresh segment and fsync it; success makes the writer
        healthy again.
        """
        self._retryCall = None
        self._syncSoon()


def _badItem(item: object) -> ValueError:
    return ValueError(
        f"journal items must be non-empty bytes of at most {MAX_PAYLOAD}, not {item!r:.60}"
    )
