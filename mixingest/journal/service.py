"""
The journal as a queue backend and a Twisted service.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mixingest.errors import QueueUnavailable
from mixingest.journal.framing import Marker, checkFormats, listSegments, segmentPath
from mixingest.journal.fsync import FsyncPolicy, defaultSync, syncDirectory
from mixingest.journal.locks import exclusiveLock
from mixingest.journal.reader import (
    JournalReader,
    SegmentCounter,
    deleteConsumedSegments,
    deleteSegmentsBefore,
    listCheckpoints,
    listQueues,
)
from mixingest.journal.retention import (
    REFUSE,
    QueueRetention,
    RetentionPolicy,
    enforce,
    measureGroups,
)
from mixingest.journal.writer import DEFAULT_SEGMENT_SIZE, JournalWriter
from mixingest.naming import validQueueName

__all__ = [
    "AUTO_SHARE",
    "Journal",
    "JournalFull",
    "JournalLocked",
    "RetentionExceeded",
    "autoMaxBytes",
    "makePrivateDirectories",
]

AUTO_SHARE = 0.9
"""
Without C{--max-journal-bytes}, the journal may grow to this share of the
space it had at start (its own segments plus the free space of its file
system), so that it refuses events while the disk still has room for
checkpoints, logs and everything else on it.
"""

FULL_RETRY_AFTER = 30
"""Seconds a client is asked to wait when the journal is over its bound."""

log = Logger()


class JournalLocked(Exception):
    """
    Another journal (in this process or another) has the directory open:
    two writers would interleave records.
    """


SEGMENTS_PER_BOUND = 8
"""
Segments are at most this fraction of the journal's bound, so that the
newest segment of each queue, which stays after it is forwarded, is a small
part of it.
"""

MIN_SEGMENT_SIZE = 64 * 1024


def makePrivateDirectories(path: str, durable: bool) -> None:
    """
    Create C{path} and its missing parents, private to the daemon's user;
    if C{durable}, make each new entry durable by fsyncing its parent, or
    a power cut on the first run takes the whole journal with it, however
    carefully the segments in it were fsynced.
    """
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue
        if durable:
            syncDirectory(os.path.dirname(directory))


class JournalFull(QueueUnavailable):
    """
    The journal holds C{maxBytes} or more: refused before the disk fills.
    """


class RetentionExceeded(QueueUnavailable):
    """
    The queue holds more than C{--retention-bytes} or C{--retention-age}
    allow for a group that has not read it, under C{--retention-policy
    refuse}: new events are refused until the group catches up.
    """


def autoMaxBytes(dataDir: str, used: int) -> int:
    """
    The default bound on the journal's size: L{AUTO_SHARE} of what it may
    use (C{used} bytes it holds, plus the free space on its file system).
    """
    stats = os.statvfs(dataDir)
    return int((used + stats.f_bavail * stats.f_frsize) * AUTO_SHARE)


def _queueBytes(queueDir: str) -> int:
    total = 0
    for base in listSegments(queueDir):
        with contextlib.suppress(FileNotFoundError):
            total += os.stat(segmentPath(queueDir, base)).st_size
    return total


class Journal(Service):
    """
    The embedded durable queue: one directory per queue under C{dataDir},
    one L{JournalWriter} per queue, all writing on one dedicated thread.

    Only one journal may use a directory at a time (an exclusive C{flock} on
    C{dataDir/lock}, taken by L{startService}); readers need no lock.
    """

    def __init__(
        self,
        dataDir: str,
        policy: Optional[FsyncPolicy] = None,
        segmentSize: int = DEFAULT_SEGMENT_SIZE,
        reactor: Optional[IReactorFromThreads] = None,
        clock: Optional[IReactorTime] = None,
        sync: Callable[[int], None] = defaultSync,
        maxBytes: Optional[int] = None,
        retention: Optional[RetentionPolicy] = None,
        retentionInterval: float = 10.0,
    ) -> None:
        """
        @param policy: when an append counts as durable;
            L{FsyncPolicy.always} by default.
        @param segmentSize: rotate segments before they pass this many bytes.
        @param maxBytes: refuse appends (L{JournalFull}) while the segments
            of all queues add up to this many bytes or more; C{None} for
            L{autoMaxBytes}, worked out when the service starts.
        @param reactor: the reactor that the writer thread reports to.
        @param clock: for fsync intervals and write retries; C{reactor} by
            default.
        @param sync: makes segment data durable; tests replace it.
        @param retention: journal-only mode: every C{retentionInterval}
            seconds, delete the segments every group has passed and apply
            these limits (see L{enforceRetention}); C{None} when the
            store-and-forward service owns the journal and deletes what it
            forwarded.
        """
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = cast(IReactorFromThreads, globalReactor)
        self.dataDir = os.path.abspath(dataDir)
        self.policy = policy if policy is not None else FsyncPolicy.always()
        self.segmentSize = self._segmentSizeAsked = segmentSize
        self._reactor = reactor
        self._clock = clock
        self._sync = sync
        self._writers: Dict[str, JournalWriter] = {}
        self._pool: Optional[ThreadPool] = None
        self._lockFD = -1
        self._maxBytes = maxBytes
        self.maxBytes = 0 if maxBytes is None else maxBytes
        self._bytesAtStart: Dict[str, int] = {}
        self.retention = retention
        self._retentionLoop: Optional[LoopingCall] = None
        self._retentionInterval = retentionInterval
        self._counters: Dict[str, SegmentCounter] = {}
        self._statsPool: Optional[ThreadPool] = None
        self._refusing: Dict[str, str] = {}
        self.groups: Dict[str, Dict[str, Dict[str, Any]]] = {}
        """Each queue's groups' L{groupStatus}, as the last retention pass found them."""
        self.droppedSegments = 0
        self.droppedBytes = 0
        self.expiredGroups = 0
        self.source = ""
        """
        This journal's durable identity (kept in C{DATA_DIR/journal-id}): a
        remote that deduplicates what it is sent from here keys on it.
        """

    def startService(self) -> None:
        """
        Lock the directory (creating it if needed), check that every
        segment is in a format this version reads, and start the writer
        thread.

        @raise JournalLocked: if another journal holds the directory.
        @raise JournalFormatError: for a segment of an unknown format: the
            daemon must not start and skip it silently.
        """
        makePrivateDirectories(self.dataDir, durable=self.policy.syncsEver)
        fd = exclusiveLock(os.path.join(self.dataDir, "lock"))
        if fd is None:
            raise JournalLocked(f"journal directory {self.dataDir} is in use")
        try:
            checkFormats(self.dataDir)
            self.source = self._loadSource()
        except BaseException:
            os.close(fd)
            raise
        self._lockFD = fd
        self._bytesAtStart = {
            queue: _queueBytes(os.path.join(self.dataDir, queue)) for queue in self.queues()
        }
        if self._maxBytes is None:
            self.maxBytes = autoMaxBytes(self.dataDir, sum(self._bytesAtStart.values()))
        # The newest segment of a queue is never deleted, even once it is
        # all forwarded: keep it small beside the bound, or a drained
        # journal could stay over it.
        self.segmentSize = min(
            self._segmentSizeAsked, max(MIN_SEGMENT_SIZE, self.maxBytes // SEGMENTS_PER_BOUND)
        )
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="mixingest-journal")
        self._pool.start()
        Service.startService(self)
        if self.retention is not None:
            self._statsPool = ThreadPool(minthreads=1, maxthreads=1, name="mixingest-journal-stats")
            self._statsPool.start()
            loop = self._retentionLoop = LoopingCall(self._retentionPass)
            loop.clock = cast(IReactorTime, self._clock or self._reactor)
            loop.start(self._retentionInterval, now=True)

    def _retentionPass(self) -> Deferred[None]:
        """
        One periodic L{enforceRetention}: a failure is logged and the next
        pass tries again.
        """

        def failed(f: Failure) -> None:
            log.failure("journal retention pass failed", f)

        return self.enforceRetention().addCallbacks(lambda _: None, failed)

    def _loadSource(self) -> str:
        """
        Read this directory's identity, creating it (durably) the first time.
        """
        path = os.path.join(self.dataDir, "journal-id")
        try:
            with open(path, encoding="ascii") as f:
                source = f.read().strip()
        except FileNotFoundError:
            source = ""
        if source:
            return source
        source = secrets.token_hex(8)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, source.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        syncDirectory(self.dataDir)
        return source

    def stopService(self) -> Deferred[None]:
        """
        Refuse new appends, flush and close every queue, then stop the
        thread and unlock.  Failures are logged: shutdown goes on.
        """
        Service.stopService(self)
        if self._retentionLoop is not None and self._retentionLoop.running:
            self._retentionLoop.stop()
        writers = list(self._writers.values())
        self._writers.clear()
        closed = DeferredList([w.close() for w in writers], consumeErrors=True)
        return closed.addCallback(self._stopped, writers)

    def _stopped(self, results: List[Tuple[bool, Any]], writers: List[JournalWriter]) -> None:
        for writer, (ok, result) in zip(writers, results):
            if not ok:
                assert isinstance(result, Failure)
                log.failure("journal queue {queue}: final flush failed", result, queue=writer.queue)
        if self._pool is not None:
            self._pool.stop()
            self._pool = None
        if self._statsPool is not None:
            self._statsPool.stop()
            self._statsPool = None
        os.close(self._lockFD)
        self._lockFD = -1

    def put(
        self, queue: str, items: Sequence[bytes], marker: Optional[bytes] = None
    ) -> Deferred[None]:
        """
        Append C{items} to C{queue}, creating the queue on first use.

        @param marker: written just before the items, in the same append,
            as a marker record: readers skip it unless they ask for markers
            (store-and-forward notes there what the remote may already hold).
        @return: fires once the items are stored under the fsync policy;
            fails with L{QueueUnavailable} if they are not (journal stopped,
            the disk failed, or L{JournalFull}), with L{ValueError} for a bad
            queue name or item.
        """
        if not self.running or self._pool is None:
            return fail(QueueUnavailable("the journal is not running"))
        refusing = self._refusing.get(queue)
        if refusing:
            return fail(
                RetentionExceeded(
                    f"queue {queue} holds {refusing} for a consumer group that has not read "
                    "it (--retention-policy refuse); retry later"
                )
            )
        if self.full():
            return fail(
                JournalFull(
                    f"the journal holds {self.bytes()} bytes, over its bound of "
                    f"{self.maxBytes} (--max-journal-bytes); retry later"
                )
            )
        writer = self._writers.get(queue)
        if writer is None:
            if not validQueueName(queue):
                return fail(ValueError(f"invalid queue name {queue!r}"))
            writer = self._writers[queue] = JournalWriter(
                os.path.join(self.dataDir, queue),
                self._pool,
                self.policy,
                self.segmentSize,
                self._reactor,
                self._clock,
                self._sync,
            )
        if marker is not None:
            items = [Marker(marker), *items]
        return writer.append(items)

    def bytes(self) -> int:
        """
        The size of every queue's segments: the writers' figures for the
        queues written since the start, the start's count for the others.
        """
        total = sum(
            size for queue, size in self._bytesAtStart.items() if queue not in self._writers
        )
        for queue, writer in self._writers.items():
            files = writer.files
            total += files.bytes if files.segments else self._bytesAtStart.get(queue, 0)
        return total

    def full(self) -> bool:
        """
        Whether the journal is at or over its bound and refuses appends.
        """
        return self.bytes() >= self.maxBytes

    def flush(self, queue: Optional[str] = None) -> Deferred[None]:
        """
        @param queue: flush only this queue.
        @return: fires once everything appended to C{queue} (or to any
            queue) so far is fsynced; fails if any queue's flush failed.
        """
        if queue is not None:
            writers = [self._writers[queue]] if queue in self._writers else []
        else:
            writers = list(self._writers.values())
        flushed = DeferredList(
            [w.flush() for w in writers], fireOnOneErrback=True, consumeErrors=True
        )
        return flushed.addCallbacks(lambda _: None, lambda f: f.value.subFailure)

    def ready(self) -> bool:
        """
        Running, under its bound, and no queue is failing its writes.
        """
        return (
            bool(self.running)
            and not self.full()
            and not self._refusing
            and all(w.healthy for w in self._writers.values())
        )

    def status(self) -> Mapping[str, Any]:
        size = self.bytes()
        return {
            "backend": "journal",
            "ready": self.ready(),
            "path": self.dataDir,
            "fsync": str(self.policy),
            "segmentSize": self.segmentSize,
            "bytes": size,
            "maxBytes": self.maxBytes,
            "full": size >= self.maxBytes,
            "queues": {name: w.status() for name, w in sorted(self._writers.items())},
            "groups": self.groups,
            "retention": None if self.retention is None else self._retentionStatus(),
        }

    def _retentionStatus(self) -> Mapping[str, Any]:
        assert self.retention is not None
        return {
            "maxBytes": self.retention.maxBytes,
            "maxAge": self.retention.maxAge,
            "policy": self.retention.policy,
            "groupExpiry": self.retention.groupExpiry,
            "refusing": dict(self._refusing),
            "droppedSegments": self.droppedSegments,
            "droppedBytes": self.droppedBytes,
            "expiredGroups": self.expiredGroups,
        }

    def enforceRetention(self) -> Deferred[Dict[str, QueueRetention]]:
        """
        On the writer thread, for every queue: expire idle groups, delete
        the segments that every group has passed and apply the retention
        limits (see L{enforce}); then, on the reactor, refuse appends to the
        queues over a limit under C{refuse}; then measure each group's lag
        on a thread of its own (counting records reads segments, which
        appends must not wait for) and publish it in L{status}.

        @return: fires with each queue's L{QueueRetention} once the groups
            are measured.
        """
        policy = self.retention
        if policy is None:
            return fail(ValueError("this journal has no retention policy"))
        if self._pool is None or self._statsPool is None:
            return fail(QueueUnavailable("the journal is not running"))
        writers = dict(self._writers)
        statsPool = self._statsPool

        def run() -> Dict[str, QueueRetention]:
            now = time.time()
            results = {}
            for queue in self.queues():
                queueDir = os.path.join(self.dataDir, queue)
                result = results[queue] = enforce(queueDir, policy, now)
                writer = writers.get(queue)
                if (result.consumed or result.dropped) and writer is not None:
                    writer.files.recount()
            return results

        def measure(queues: List[str]) -> Dict[str, Dict[str, Dict[str, Any]]]:
            now = time.time()
            groups = {}
            for queue in queues:
                queueDir = os.path.join(self.dataDir, queue)
                counter = self._counters.setdefault(queue, SegmentCounter(queueDir))
                found = measureGroups(counter, now)
                if found:
                    groups[queue] = found
            return groups

        def published(groups: Dict[str, Dict[str, Dict[str, Any]]]) -> None:
            self.groups = groups

        def limit(results: Dict[str, QueueRetention]) -> Deferred[Dict[str, QueueRetention]]:
            self._refusing = {
                queue: r.over for queue, r in results.items() if r.over and policy.policy == REFUSE
            }
            for r in results.values():
                self.droppedSegments += len(r.dropped)
                self.droppedBytes += r.droppedBytes
                self.expiredGroups += len(r.expired)
            measured = deferToThreadPool(self._reactor, statsPool, measure, list(results))
            return measured.addCallback(published).addCallback(lambda _: results)

        return deferToThreadPool(self._reactor, self._pool, run).addCallback(limit)

    def queues(self) -> List[str]:
        """
        @return: the queues that exist on disk, written by this process or
            an earlier one (a quick directory listing).
        """
        return listQueues(self.dataDir)

    def reader(self, queue: str, checkpointName: Optional[str] = None) -> JournalReader:
        """
        @return: a blocking reader of C{queue}; use it from a thread.
        """
        if not validQueueName(queue):
            raise ValueError(f"invalid queue name {queue!r}")
        return JournalReader(os.path.join(self.dataDir, queue), checkpointName)

    def deleteConsumed(self, queue: str) -> Deferred[List[int]]:
        """
        Delete the segments of C{queue} that every checkpoint has read past
        (see L{deleteConsumedSegments}), on the writer thread.

        @return: fires with the deleted segments' base sequence numbers.
        """
        if not validQueueName(queue):
            return fail(ValueError(f"invalid queue name {queue!r}"))
        if self._pool is None:
            return fail(QueueUnavailable("the journal is not running"))
        writer = self._writers.get(queue)

        def delete() -> List[int]:
            deleted = deleteConsumedSegments(os.path.join(self.dataDir, queue))
            if deleted and writer is not None:
                writer.files.recount()
            return deleted

        return deferToThreadPool(self._reactor, self._pool, delete)

    def deleteBefore(self, queue: str, segment: int, owner: str) -> Deferred[List[int]]:
        """
        Delete the segments of C{queue} older than C{segment}, on the
        writer thread, when the caller is the queue's only reader and knows
        that everything in them is safe elsewhere although its checkpoint
        could not be written (a full disk): freeing them is what lets the
        checkpoint land.  A later reader whose checkpoint names a deleted
        segment continues at the next one.  Nothing is deleted if the queue
        has a checkpoint other than C{owner}.

        @return: fires with the deleted segments' base sequence numbers.
        """
        if not validQueueName(queue):
            return fail(ValueError(f"invalid queue name {queue!r}"))
        if self._pool is None:
            return fail(QueueUnavailable("the journal is not running"))
        queueDir = os.path.join(self.dataDir, queue)
        writer = self._writers.get(queue)

        def delete() -> List[int]:
            if set(listCheckpoints(queueDir)) - {owner}:
                return []
            deleted = deleteSegmentsBefore(queueDir, segment)
            if deleted:
                if writer is not None:
                    writer.files.recount()
                log.warn(
                    "journal {queueDir}: deleted {count} forwarded segments before their "
                    "checkpoint could be written",
                    queueDir=queueDir,
                    count=len(deleted),
                )
            return deleted

        return deferToThreadPool(self._reactor, self._pool, delete)
