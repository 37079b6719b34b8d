"""
The journal as a queue backend and a Twisted service.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mixingest.journal.fsync import FsyncPolicy, defaultSync
from mixingest.journal.reader import JournalReader, deleteConsumedSegments, listQueues
from mixingest.journal.writer import DEFAULT_SEGMENT_SIZE, JournalWriter
from mixingest.queues.base import QueueUnavailable, validQueueName

__all__ = ["Journal", "JournalLocked"]

log = Logger()


class JournalLocked(Exception):
    """
    Another journal (in this process or another) has the directory open:
    two writers would interleave records.
    """


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
    ) -> None:
        """
        @param policy: when an append counts as durable;
            L{FsyncPolicy.always} by default.
        @param segmentSize: rotate segments before they pass this many bytes.
        @param reactor: the reactor that the writer thread reports to.
        @param clock: for fsync intervals and write retries; C{reactor} by
            default.
        @param sync: makes segment data durable; tests replace it.
        """
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = cast(IReactorFromThreads, globalReactor)
        self.dataDir = os.path.abspath(dataDir)
        self.policy = policy if policy is not None else FsyncPolicy.always()
        self.segmentSize = segmentSize
        self._reactor = reactor
        self._clock = clock
        self._sync = sync
        self._writers: Dict[str, JournalWriter] = {}
        self._pool: Optional[ThreadPool] = None
        self._lockFD = -1

    def startService(self) -> None:
        """
        Lock the directory (creating it if needed) and start the writer
        thread.

        @raise JournalLocked: if another journal holds the directory.
        """
        os.makedirs(self.dataDir, exist_ok=True)
        fd = os.open(os.path.join(self.dataDir, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalLocked(f"journal directory {self.dataDir} is in use") from None
        self._lockFD = fd
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="mixingest-journal")
        self._pool.start()
        Service.startService(self)

    def stopService(self) -> Deferred[None]:
        """
        Refuse new appends, flush and close every queue, then stop the
        thread and unlock.  Failures are logged: shutdown goes on.
        """
        Service.stopService(self)
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
        os.close(self._lockFD)
        self._lockFD = -1

    def put(self, queue: str, items: Sequence[bytes]) -> Deferred[None]:
        """
        Append C{items} to C{queue}, creating the queue on first use.

        @return: fires once the items are stored under the fsync policy;
            fails with L{QueueUnavailable} if they are not (journal stopped,
            or the disk failed), with L{ValueError} for a bad queue name or
            item.
        """
        writer = self._writers.get(queue)
        if writer is None:
            if not self.running or self._pool is None:
                return fail(QueueUnavailable("the journal is not running"))
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
        return writer.append(items)

    def flush(self) -> Deferred[None]:
        """
        @return: fires once everything appended to any queue so far is
            fsynced; fails if any queue's flush failed.
        """
        flushed = DeferredList(
            [w.flush() for w in self._writers.values()], fireOnOneErrback=True, consumeErrors=True
        )
        return flushed.addCallbacks(lambda _: None, lambda f: f.value.subFailure)

    def ready(self) -> bool:
        """
        Running, and no queue is failing its writes.
        """
        return bool(self.running) and all(w.healthy for w in self._writers.values())

    def status(self) -> Mapping[str, Any]:
        return {
            "backend": "journal",
            "ready": self.ready(),
            "path": self.dataDir,
            "fsync": str(self.policy),
            "segmentSize": self.segmentSize,
            "queues": {name: w.status() for name, w in sorted(self._writers.items())},
        }

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
