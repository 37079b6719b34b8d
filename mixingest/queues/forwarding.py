# -*- test-case-name: tests.test_forwarding -*-
"""
Store-and-forward: a remote queue (Redis, Kestrel) backed by the local
journal, so that an event is acknowledged whenever it is durably stored
somewhere and the remote gets every event eventually.

A put goes to the remote.  If the remote refuses, fails or times out, the
batch is appended to the journal under the same queue name and the put
succeeds once it is journaled.  From then on the queue is I{diverted}: its new
puts go to the journal too, behind the ones already there, so the remote
receives the queue in order and nothing is sent twice in an ordinary outage.
A forwarder drains diverted queues into the remote when it is healthy again,
oldest first, and advances a durable reader checkpoint only after the
remote acknowledged, so a crash at any moment costs at most a re-send of the
batch in flight, never a loss.  When a queue's journal is empty again, it is
no longer diverted and its puts go straight to the remote.

Journal reads, checkpoint commits and segment deletion are blocking file
IO, so they run in a thread; all the state here lives on the reactor thread.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Mapping, Protocol, Sequence, TypeVar

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from mixingest.queues.base import EventQueue, QueueUnavailable, validQueueName

__all__ = ["ForwardingQueue", "Journal", "JournalReader"]

T = TypeVar("T")

DEFAULT_CHECKPOINT = "forwarder"
"""The name of the forwarder's checkpoint in every queue of the journal."""


class JournalReader(Protocol):
    """
    What the forwarder needs from L{mixingest.journal.JournalReader}: blocking
    calls, made from a thread.
    """

    def read(self, maxItems: int, maxBytes: int) -> list[tuple[Any, bytes]]: ...

    def commit(self, position: Any) -> None: ...

    def backlog(self) -> tuple[int, int]: ...

    def close(self) -> None: ...


class Journal(EventQueue, Protocol):
    """
    What the forwarder needs from L{mixingest.journal.Journal} besides
    L{EventQueue}.
    """

    def queues(self) -> list[str]: ...

    def reader(self, queue: str, checkpointName: str) -> JournalReader: ...

    def deleteConsumed(self, queue: str) -> Deferred[Any]: ...


class ForwardingQueue(Service):
    """
    An L{EventQueue} that puts into C{remote} and falls back to C{journal}.

    It owns both: C{startService} starts the journal then the remote, and
    C{stopService} stops the forwarder, waits for the puts in flight (which
    may still need the journal), then stops the remote and the journal.
    """

    _log = Logger()

    def __init__(
        self,
        remote: EventQueue,
        journal: Journal,
        clock: IReactorTime,
        *,
        checkpointName: str = DEFAULT_CHECKPOINT,
        batchItems: int = 1000,
        batchBytes: int = 4 * 1024 * 1024,
        pollInterval: float = 0.5,
        backoff: Callable[[int], float] | None = None,
        runInThread: Callable[..., Deferred[Any]] = deferToThread,
    ) -> None:
        """
        @param clock: schedules the forwarder's waits.
        @param batchItems: most journal items forwarded per remote put.
        @param batchBytes: most journal bytes forwarded per remote put.
        @param pollInterval: how often, in seconds, the forwarder checks
            whether an unhealthy remote is healthy again (a cheap local
            check: no traffic to the remote).
        @param backoff: seconds to wait after the Nth consecutive failed
            forward before retrying the same batch.
        @param runInThread: runs a blocking call off the reactor thread and
            returns a Deferred of its result.
        """
        self.remote = remote
        self.journal = journal
        self._clock = clock
        self._checkpointName = checkpointName
        self._batchItems = batchItems
        self._batchBytes = batchBytes
        self._pollInterval = pollInterval
        self._backoff = backoff or backoffPolicy(
            initialDelay=0.25, maxDelay=30.0, factor=2.0, jitter=lambda: random.uniform(0, 0.25)
        )
        self._runInThread = runInThread

        # Until the startup scan knows which queues have a journal backlog,
        # every put goes to the journal: that can only be in order.
        self._scanned = False
        self._diverted: set[str] = set()
        self._journaling: dict[str, int] = {}
        self._journaled: dict[str, int] = {}
        self._backlog: dict[str, int] = {}
        self._readers: dict[str, JournalReader] = {}
        self._unsent: dict[str, list[tuple[Any, bytes]]] = {}
        self._segments: dict[str, int] = {}
        self._turn = 0
        self._inFlight: set[Deferred[None]] = set()

        self._state = "stopped"
        self._reason = ""
        self._failures = 0
        self._forwarded = 0
        self._loop: Deferred[None] | None = None
        self._pause: tuple[Deferred[None], IDelayedCall | None] | None = None
        self._stopping = False

    # -- service

    def startService(self) -> None:
        """
        Start the journal (which may refuse: its directory is locked by
        another daemon), the remote, then the forwarder, which first scans
        the journal for what an earlier run left to forward.
        """
        self.journal.startService()
        self.remote.startService()
        super().startService()
        self._stopping = False
        self._scanned = False
        self._diverted.clear()
        self._unsent.clear()
        self._segments.clear()
        self._loop = Deferred.fromCoroutine(self._run())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        self._resume(interruptBackoff=True)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._loop is not None:
            await self._loop
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        await DeferredList(list(self._inFlight), consumeErrors=True)
        await maybeDeferred(self.remote.stopService)
        await maybeDeferred(self.journal.stopService)
        self._setState("stopped", "service stopped")

    # -- EventQueue

    def put(self, queue: str, items: Sequence[bytes]) -> Deferred[None]:
        """
        Put into the remote unless the queue is diverted or the remote is
        known to be down; on any failure of the remote, journal instead.
        """
        if not self.running:
            return fail(QueueUnavailable("store-and-forward queue is not running"))
        if not validQueueName(queue):
            # Checked here because a diverted queue must have a journal.
            return fail(ValueError(f"invalid queue name {queue!r}"))
        if not self._scanned or queue in self._diverted or not self.remote.ready():
            d = self._toJournal(queue, items)
        else:
            d = self.remote.put(queue, items)
            d.addErrback(self._remoteFailed, queue, items)
        self._inFlight.add(d)
        d.addBoth(self._settled, d)
        return d

    def ready(self) -> bool:
        return self.remote.ready() or self.journal.ready()

    def status(self) -> Mapping[str, Any]:
        return {
            "backend": "forwarding",
            "healthy": self.ready(),
            "forwarder": {
                "state": self._state,
                "reason": self._reason,
                "forwarded": self._forwarded,
                "failures": self._failures,
            },
            "diverted": sorted(self._diverted),
            "backlog": dict(sorted(self._backlog.items())),
            "remote": self.remote.status(),
            "journal": self.journal.status(),
        }

    # -- puts

    def _settled(self, result: T, d: Deferred[None]) -> T:
        self._inFlight.discard(d)
        return result

    def _remoteFailed(self, failure: Failure, queue: str, items: Sequence[bytes]) -> Deferred[None]:
        self._log.debug(
            "Remote put to {queue} failed, journaling {count} items: {reason}",
            queue=queue,
            count=len(items),
            reason=failure.getErrorMessage(),
        )
        return self._toJournal(queue, items)

    def _toJournal(self, queue: str, items: Sequence[bytes]) -> Deferred[None]:
        if queue not in self._diverted:
            self._diverted.add(queue)
            self._log.warn("Queue {queue} diverted to the journal", queue=queue)
        self._journaling[queue] = self._journaling.get(queue, 0) + 1
        d = self.journal.put(queue, items)

        def journaled(result: T) -> T:
            self._journaling[queue] -= 1
            if not isinstance(result, Failure):
                self._journaled[queue] = self._journaled.get(queue, 0) + 1
                self._backlog[queue] = self._backlog.get(queue, 0) + len(items)
            self._resume(interruptBackoff=False)
            return result

        return d.addBoth(journaled)

    # -- forwarder

    async def _run(self) -> None:
        """
        The forwarder: one batch at a time, queues in turn.  Every error is
        caught, logged and followed by a backoff, so the loop ends only when
        the service stops.
        """
        while not self._stopping:
            try:
                await self._step()
            except Exception:
                self._failures += 1
                self._log.failure("Forwarder step failed")
                self._setState("waiting", "forwarder error")
                await self._wait(self._backoff(self._failures))

    async def _step(self) -> None:
        if not self._scanned:
            self._setState("scanning", "reading journal backlog")
            found = await self._runInThread(self._scanJournal)
            for queue, (reader, backlog) in sorted(found.items()):
                self._readers[queue] = reader
                self._backlog[queue] = backlog
                if backlog:
                    self._diverted.add(queue)
                    self._log.info(
                        "Queue {queue} has {backlog} items in the journal to forward",
                        queue=queue,
                        backlog=backlog,
                    )
            self._scanned = True
            # What a previous run forwarded but had no time to delete.
            await DeferredList([self.journal.deleteConsumed(q) for q in found], consumeErrors=True)
            return
        queue = self._nextQueue()
        if queue is None:
            self._setState("idle", "nothing to forward")
            await self._wait(None)
            return
        if not self.remote.ready():
            self._setState("waiting", "remote unavailable")
            await self._wait(self._pollInterval)
            return
        await self._forward(queue)

    def _nextQueue(self) -> str | None:
        queues = sorted(self._diverted)
        if not queues:
            return None
        self._turn = (self._turn + 1) % len(queues)
        return queues[self._turn]

    async def _forward(self, queue: str) -> None:
        """
        Forward the next batch of C{queue}, or end its diversion if the
        journal holds nothing more for it.
        """
        batch = self._unsent.get(queue)
        if batch is None:
            generation = self._journaled.get(queue, 0)
            reader = await self._reader(queue)
            batch = await self._runInThread(reader.read, self._batchItems, self._batchBytes)
            if not batch:
                # A journal put that finished after the read began may not
                # have been seen, and one still running certainly was not.
                if (
                    self._journaling.get(queue, 0) == 0
                    and self._journaled.get(queue, 0) == generation
                ):
                    self._diverted.discard(queue)
                    self._backlog[queue] = 0
                    self._log.info(
                        "Queue {queue} forwarded: puts go to the remote again", queue=queue
                    )
                return
            self._unsent[queue] = batch
        self._setState("forwarding", f"forwarding {queue}")
        try:
            await self.remote.put(queue, [payload for _, payload in batch])
        except Exception as e:
            self._failures += 1
            self._setState("waiting", f"remote put failed: {e}")
            await self._wait(self._backoff(self._failures))
            return
        self._failures = 0
        position = batch[-1][0]
        self._backlog[queue] = await self._runInThread(self._commit, self._readers[queue], position)
        del self._unsent[queue]
        self._forwarded += len(batch)
        if position.segment != self._segments.setdefault(queue, position.segment):
            # The checkpoint moved into a newer segment: the older ones may
            # now be behind every checkpoint, so the disk space comes back.
            self._segments[queue] = position.segment
            await self.journal.deleteConsumed(queue)

    async def _reader(self, queue: str) -> JournalReader:
        reader = self._readers.get(queue)
        if reader is None:
            reader = await self._runInThread(self.journal.reader, queue, self._checkpointName)
            self._readers[queue] = reader
        return reader

    def _scanJournal(self) -> dict[str, tuple[JournalReader, int]]:
        """
        (In a thread.)  A reader for every queue in the journal, at this
        forwarder's checkpoint, and the number of items after it.
        """
        found = {}
        for queue in self.journal.queues():
            reader = self.journal.reader(queue, self._checkpointName)
            found[queue] = (reader, reader.backlog()[0])
        return found

    @staticmethod
    def _commit(reader: JournalReader, position: Any) -> int:
        """
        (In a thread.)  Checkpoint past what the remote acknowledged and say
        how many items are left.
        """
        reader.commit(position)
        return reader.backlog()[0]

    def _setState(self, state: str, reason: str) -> None:
        if state != self._state:
            self._log.info(
                "Forwarder {state}: {reason}",
                state=state,
                reason=reason,
            )
        self._state = state
        self._reason = reason

    def _wait(self, seconds: float | None) -> Deferred[None]:
        """
        Sleep for C{seconds}, or until new journal items arrive if C{None};
        stopping the service ends any sleep.
        """
        if self._stopping:
            return succeed(None)
        d: Deferred[None] = Deferred()
        call = (
            None
            if seconds is None
            else self._clock.callLater(seconds, self._resume, interruptBackoff=True)
        )
        self._pause = (d, call)
        return d

    def _resume(self, interruptBackoff: bool) -> None:
        if self._pause is None:
            return
        d, call = self._pause
        if call is not None and not interruptBackoff:
            return
        self._pause = None
        if call is not None and call.active():
            call.cancel()
        d.callback(None)
