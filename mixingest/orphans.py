# -*- test-case-name: tests.test_orphans -*-
"""
Journals that a change of C{--workers} left without an owner.

A single process keeps its journal in C{DATA_DIR}; with C{--workers N}
worker K keeps its own in C{DATA_DIR/worker-K}.  So an acknowledged backlog
(events spooled while the remote queue was down) would be stranded by:

  - switching from one process to N: nobody opens C{DATA_DIR} itself;
  - fewer workers than before: nobody opens C{worker-K} for K >= N;
  - switching from N to one process: nobody opens any C{worker-K}.

With a remote queue, the process that starts (the parent of C{--workers
N}, or the single process) forwards each such I{orphan} with the same
store-and-forward code as its own journal: a L{ForwardingQueue} over the
orphan, whose checkpoint keeps the delivery exactly once (the journal's
identity lives in its directory, so the remote recognises a batch the
orphan's first owner already sent).  An orphan is adopted only if its
journal lock is free: one locked belongs to a live process.  Once it is
forwarded, the orphan is released (stopped and unlocked, left on disk).

A journal-only daemon has no remote to forward to and must not move events
between journals that consumers read with their own checkpoints: it leaves
orphans in place and says so in the log, once per orphan at start.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mixingest.journal import Journal, JournalLocked
from mixingest.journal.reader import listQueues
from mixingest.naming import WORKER_DIRECTORY
from mixingest.queues.urls import JournalTarget, makeQueue

__all__ = ["OrphanJournals", "forwarded", "makeOrphanService", "orphanDirectories"]

POLL_INTERVAL = 1.0
"""Seconds between checks of whether an adopted orphan is forwarded."""


def orphanDirectories(dataDir: str, workers: int) -> List[str]:
    """
    (Blocking: a few directory listings.)  The journal directories under
    C{dataDir} that no process of a daemon with C{workers} workers owns,
    sorted.

    @param workers: 1 for a single process, whose journal is C{dataDir};
        N > 1 for C{--workers N}, whose worker K owns C{dataDir/worker-K}.
    """
    try:
        names = os.listdir(dataDir)
    except FileNotFoundError:
        return []
    indexes = {
        name: int(match.group(1))
        for name in names
        if (match := WORKER_DIRECTORY.match(name)) is not None
        and os.path.isdir(os.path.join(dataDir, name))
    }
    owned = workers if workers > 1 else 0
    orphans = [
        os.path.join(dataDir, name)
        for name, index in sorted(indexes.items(), key=lambda kv: kv[1])
        if index >= owned
    ]
    if workers > 1 and set(listQueues(dataDir)) - set(indexes):
        orphans.insert(0, dataDir)
    return orphans


def forwarded(status: Mapping[str, Any]) -> bool:
    """
    Whether a L{ForwardingQueue}'s C{status()} says that its journal is
    forwarded: the startup scan is done, no queue is diverted and every
    checkpoint is written.
    """
    forwarder = status.get("forwarder", {})
    return (
        forwarder.get("state") == "idle"
        and not status.get("diverted")
        and not forwarder.get("uncommitted")
    )


class OrphanJournals(Service):
    """
    Finds the orphaned journals under C{DATA_DIR} when it starts; forwards
    each one it can lock until it is empty, or, without a remote queue,
    only names them in the log.

    @ivar adopted: the forwarder of each orphan being forwarded, by path.
    """

    log = Logger()

    def __init__(
        self,
        dataDir: str,
        workers: int,
        forwarderFor: Optional[Callable[[str], Any]],
        clock: IReactorTime,
        *,
        runInThread: Callable[..., Deferred[Any]] = deferToThread,
        pollInterval: float = POLL_INTERVAL,
    ) -> None:
        """
        @param workers: as for L{orphanDirectories}.
        @param forwarderFor: makes the store-and-forward queue (a service
            with C{status()}, whose C{startService} raises L{JournalLocked}
            if the directory is in use) over the journal in a directory;
            L{None} for a journal-only daemon.
        @param runInThread: runs the blocking directory scan off the reactor.
        """
        self.dataDir = os.path.abspath(dataDir)
        self.workers = workers
        self._forwarderFor = forwarderFor
        self._clock = clock
        self._runInThread = runInThread
        self._pollInterval = pollInterval
        self.adopted: Dict[str, Any] = {}
        self._releasing: Dict[str, Deferred[Any]] = {}
        self._poll: Optional[LoopingCall] = None

    def startService(self) -> None:
        super().startService()
        scan = self._runInThread(orphanDirectories, self.dataDir, self.workers)
        scan.addCallback(self._found)
        scan.addErrback(lambda f: self.log.failure("looking for orphaned journals", f))

    def _found(self, orphans: List[str]) -> None:
        if not self.running:  # stopped during the scan
            return
        for path in orphans:
            if self._forwarderFor is None:
                self.log.warn(
                    "{path} holds a journal no process of this daemon owns (left by a run with "
                    "another --workers); a journal-only daemon leaves it in place: read it with "
                    "python -m mixingest.journal cat {path} QUEUE",
                    path=path,
                )
                continue
            self._adopt(path, self._forwarderFor(path))
        if self.adopted:
            self._poll = LoopingCall(self._check)
            self._poll.clock = self._clock
            self._poll.start(self._pollInterval, now=False)

    def _adopt(self, path: str, forwarder: Any) -> None:
        try:
            forwarder.startService()
        except JournalLocked:
            self.log.info("{path} is an orphaned journal in use by another process", path=path)
            return
        except Exception:
            self.log.failure("adopting the orphaned journal {path}", path=path)
            return
        self.adopted[path] = forwarder
        self.log.info(
            "Forwarding {path}, a journal left by a run with another --workers", path=path
        )

    def _check(self) -> None:
        for path, forwarder in list(self.adopted.items()):
            if forwarded(forwarder.status()):
                del self.adopted[path]
                self._release(path, forwarder).addCallback(self._released, path)
        if not self.adopted and self._poll is not None and self._poll.running:
            self._poll.stop()

    def _released(self, _: object, path: str) -> None:
        self.log.info("{path} forwarded: orphaned journal released", path=path)

    def _release(self, path: str, forwarder: Any) -> Deferred[Any]:
        d = maybeDeferred(forwarder.stopService)
        d.addErrback(lambda f: self.log.failure("releasing {path}", f, path=path))
        self._releasing[path] = d

        def released(result: object) -> object:
            del self._releasing[path]
            return result

        return d.addBoth(released)

    def stopService(self) -> Deferred[Any]:
        """
        Stop forwarding: each adopted orphan keeps its checkpoint, and the
        next start adopts it again.
        """
        super().stopService()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        adopted, self.adopted = self.adopted, {}
        for path, forwarder in adopted.items():
            self._release(path, forwarder)
        return DeferredList(list(self._releasing.values()))


def makeOrphanService(options: Any, reactor: Any) -> OrphanJournals:
    """
    The L{OrphanJournals} of the daemon that C{twistd mixingest} C{options}
    describe: with a remote C{--queue}, forwarding each orphan to it as the
    daemon's own journal would be.
    """
    target = options["queue"]

    def forwarderFor(path: str) -> Any:
        journal = Journal(
            path, policy=options["fsync"], segmentSize=options["segment-size"], reactor=reactor
        )
        return makeQueue(target, journal, reactor, redisPrefix=options["redis-prefix"])

    return OrphanJournals(
        options["data-dir"],
        options["workers"],
        None if isinstance(target, JournalTarget) else forwarderFor,
        reactor,
    )
