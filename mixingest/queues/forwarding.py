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

Exactly once, where the remote allows it (L{ResolvableQueue}: Redis).  The
forwarder sends each journaled item with the journal's identity and the
item's sequence number, and the remote stores only items past the highest
number it already has from that journal, so a batch resent after a crash
(acknowledged, but its checkpoint not yet written) is stored once.  A direct
put that failed I{in doubt} (sent, then no answer: the remote may still
apply it) is journaled behind a I{marker} naming it; when the forwarder
reaches the marker it asks the remote to settle it, which also fences the
late command off, and skips the copy if the remote had stored it.  The
forwarder sends only what is durable in the journal (it flushes first), so
that no number it sent can be reused after a power loss.

A checkpoint write that fails (a full disk) never causes a resend: the
acknowledged position is kept in memory and written again with backoff,
forwarding goes on meanwhile, and the segments before that position, all
safe in the remote, are deleted so that the disk has room for the
checkpoint.

Journal reads, checkpoint commits and segment deletion are blocking file
IO, so they run in a thread; all the state here lives on the reactor thread.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections import deque
from typing import Any, Callable, Mapping, Protocol, Sequence, TypeVar
from zlib import crc32

import attrs
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python.failure import Failure

from mixingest.errors import InDoubt, QueueUnavailable
from mixingest.journal.framing import Marker
from mixingest.naming import validQueueName
from mixingest.queues.base import EventQueue, ResolvableQueue

__all__ = ["ForwardingQueue", "Spool", "SpoolReader", "inDoubtMarker"]

T = TypeVar("T")

DEFAULT_CHECKPOINT = "forwarder"
"""The name of the forwarder's checkpoint in every queue of the journal."""


def inDoubtMarker(remoteMarker: bytes, items: Sequence[bytes]) -> bytes:
    """
    The journal marker written before the copy of a put that failed in
    doubt: the remote's own marker, and the count and CRC of the copy, so
    that the forwarder skips exactly those records and nothing else (a copy
    torn by a crash does not match, and is forwarded).
    """
    return json.dumps(
        {
            "remote": base64.b64encode(remoteMarker).decode("ascii"),
            "count": len(items),
            "crc": _itemsCRC(items),
        },
        separators=(",", ":"),
    ).encode("ascii")


def _itemsCRC(items: Sequence[bytes]) -> int:
    crc = 0
    for item in items:
        crc = crc32(item, crc)
    return crc


class SpoolReader(Protocol):
    """
    What the forwarder needs from L{mixingest.journal.JournalReader}: blocking
    calls, made from a thread.
    """

    def read(self, maxItems: int, maxBytes: int, markers: bool) -> list[tuple[Any, bytes]]: ...

    def commit(self, position: Any) -> None: ...

    def backlog(self) -> tuple[int, int]: ...

    def backlogAge(self, now: float) -> float: ...

    def close(self) -> None: ...


class Spool(EventQueue, Protocol):
    """
    What the forwarder needs from L{mixingest.journal.Journal} besides
    L{EventQueue}.
    """

    source: str

    def put(
        self, queue: str, items: Sequence[bytes], marker: bytes | None = None
    ) -> Deferred[None]: ...

    def flush(self, queue: str | None = None) -> Deferred[None]: ...

    def queues(self) -> list[str]: ...

    def reader(self, queue: str, checkpointName: str) -> SpoolReader: ...

    def deleteConsumed(self, queue: str) -> Deferred[Any]: ...

    def deleteBefore(self, queue: str, segment: int, owner: str) -> Deferred[Any]: ...


@attrs.define
class _QueueTotals:
    """Events of one queue, since the start."""

    forwarded: int = 0
    failed: int = 0
    journaled: int = 0


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
        journal: Spool,
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
        # When the records of the backlog were journaled, oldest first, as
        # [time, records] runs: the lag in seconds is the oldest's age.
        self._journaledAt: dict[str, deque[list[float]]] = {}
        self._queueTotals: dict[str, _QueueTotals] = {}
        self._readers: dict[str, SpoolReader] = {}
        # Read from the journal (and flushed) but not yet settled with the
        # remote, oldest first; markers included.
        self._pending: dict[str, list[tuple[Any, bytes]]] = {}
        # Acknowledged by the remote, checkpoint not yet durable.
        self._uncommitted: dict[str, Any] = {}
        self._commitFailures: dict[str, int] = {}
        self._commitRetryAt: dict[str, float] = {}
        self._segments: dict[str, int] = {}
        self._turn = 0
        self._inFlight: set[Deferred[None]] = set()
        # Remote puts in flight per queue, and the journal puts of that
        # queue waiting for them to settle, so the journal keeps put order.
        self._remoteBusy: dict[str, int] = {}
        self._behindRemote: dict[str, list[Deferred[None]]] = {}

        self._state = "stopped"
        self._reason = ""
        self._failures = 0
        self._forwarded = 0
        self._skipped = 0
        self._checkpointFailures = 0
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
        self._pending.clear()
        self._uncommitted.clear()
        self._commitFailures.clear()
        self._commitRetryAt.clear()
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
        # A last try for checkpoints that were failing: what they cover
        # would otherwise be sent again after the restart.
        for queue in sorted(self._uncommitted):
            await self._commitPosition(queue)
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
            self._divert(queue)
            if self._remoteBusy.get(queue):
                # An earlier put of this queue is still with the remote: if
                # it fails, its copy must reach the journal first.
                behind: Deferred[None] = Deferred()
                self._behindRemote.setdefault(queue, []).append(behind)
                d = behind.addCallback(lambda _: self._toJournal(queue, items))
            else:
                d = self._toJournal(queue, items)
        else:
            self._remoteBusy[queue] = self._remoteBusy.get(queue, 0) + 1
            d = self.remote.put(queue, items)
            d.addCallbacks(
                self._remoteStored,
                self._remoteFailed,
                callbackArgs=(queue,),
                errbackArgs=(queue, items),
            )
        self._inFlight.add(d)
        d.addBoth(self._settled, d)
        return d

    def ready(self) -> bool:
        """
        Whether a put now would be taken: by the journal, or by the remote
        as long as no queue has to go through the journal.
        """
        return self.journal.ready() or (self.remote.ready() and not self._diverted)

    def status(self) -> Mapping[str, Any]:
        return {
            "backend": "forwarding",
            "healthy": self.ready(),
            "forwarder": {
                "state": self._state,
                "reason": self._reason,
                "forwarded": self._forwarded,
                "queues": self._queueStatus(),
                "skippedInDoubt": self._skipped,
                "failures": self._failures,
                "checkpointFailures": self._checkpointFailures,
                "uncommitted": sorted(self._uncommitted),
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

    def _remoteStored(self, result: None, queue: str) -> None:
        self._remoteDone(queue)

    def _remoteDone(self, queue: str) -> None:
        """
        A remote put of C{queue} settled (stored, or its copy handed to the
        journal): once none is left, the journal puts waiting behind them go.
        """
        left = self._remoteBusy[queue] - 1
        if left:
            self._remoteBusy[queue] = left
            return
        del self._remoteBusy[queue]
        for behind in self._behindRemote.pop(queue, []):
            behind.callback(None)

    def _remoteFailed(self, failure: Failure, queue: str, items: Sequence[bytes]) -> Deferred[None]:
        self._log.debug(
            "Remote put to {queue} failed, journaling {count} items: {reason}",
            queue=queue,
            count=len(items),
            reason=failure.getErrorMessage(),
        )
        marker = None
        if isinstance(failure.value, InDoubt):
            marker = inDoubtMarker(failure.value.marker, items)
        self._divert(queue)
        journaled = self._toJournal(queue, items, marker)
        self._remoteDone(queue)
        return journaled

    def _divert(self, queue: str) -> None:
        if queue not in self._diverted:
            self._diverted.add(queue)
            self._log.warn("Queue {queue} diverted to the journal", queue=queue)

    def _toJournal(
        self, queue: str, items: Sequence[bytes], marker: bytes | None = None
    ) -> Deferred[None]:
        self._journaling[queue] = self._journaling.get(queue, 0) + 1
        d = self.journal.put(queue, items, marker)

        def journaled(result: T) -> T:
            self._journaling[queue] -= 1
            if not isinstance(result, Failure):
                self._journaled[queue] = self._journaled.get(queue, 0) + 1
                self._backlog[queue] = self._backlog.get(queue, 0) + len(items)
                self._totals(queue).journaled += len(items)
                self._noteJournaled(queue, self._clock.seconds(), len(items) + (marker is not None))
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
            now = self._clock.seconds()
            for queue, (reader, backlog, age) in sorted(found.items()):
                self._readers[queue] = reader
                self._backlog[queue] = backlog
                self._journaledAt.pop(queue, None)
                if backlog:
                    self._noteJournaled(queue, now - age, backlog)
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
        now = self._clock.seconds()
        for queue, at in sorted(self._commitRetryAt.items()):
            if at <= now:
                await self._commitPosition(queue)
        queue = self._nextQueue()
        if queue is None:
            if self._commitRetryAt:
                self._setState("waiting", self._reason)
                await self._wait(max(0.0, min(self._commitRetryAt.values()) - now))
            else:
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
        Settle the next batch of C{queue} with the remote (send it, or
        resolve an in-doubt marker), or end its diversion if the journal
        holds nothing more for it.
        """
        pending = self._pending.get(queue)
        if not pending:
            generation = self._journaled.get(queue, 0)
            reader = await self._reader(queue)
            batch = await self._runInThread(reader.read, self._batchItems, self._batchBytes, True)
            if not batch:
                # A journal put that finished after the read began may not
                # have been seen, and one still running certainly was not.
                if (
                    self._journaling.get(queue, 0) == 0
                    and self._journaled.get(queue, 0) == generation
                    and not self._remoteBusy.get(queue)
                ):
                    self._diverted.discard(queue)
                    self._backlog[queue] = 0
                    self._journaledAt.pop(queue, None)
                    self._log.info(
                        "Queue {queue} forwarded: puts go to the remote again", queue=queue
                    )
                return
            pending = self._pending[queue] = batch
            # Only what is durable is sent: a remote that deduplicates by
            # sequence number must never see a number that a power loss
            # could give to another item.
            await self.journal.flush(queue)
        self._setState("forwarding", f"forwarding {queue}")
        if isinstance(pending[0][1], Marker):
            await self._settleMarker(queue, pending)
            return
        end = next(
            (i for i, (_, payload) in enumerate(pending) if isinstance(payload, Marker)),
            len(pending),
        )
        chunk = pending[:end]
        items = [payload for _, payload in chunk]
        try:
            if isinstance(self.remote, ResolvableQueue):
                seqs = [position.seq - 1 for position, _ in chunk]
                await self.remote.putJournaled(queue, items, self.journal.source, seqs)
            else:
                await self.remote.put(queue, items)
        except Exception as e:
            self._totals(queue).failed += len(chunk)
            await self._remoteError(f"remote put failed: {e}")
            return
        self._failures = 0
        del pending[:end]
        self._forwarded += len(chunk)
        self._totals(queue).forwarded += len(chunk)
        await self._acknowledged(queue, chunk[-1][0])

    async def _settleMarker(self, queue: str, pending: list[tuple[Any, bytes]]) -> None:
        """
        Settle the in-doubt put that the marker at the head of C{pending}
        names: skip its copy if the remote stored it, else forward the copy.
        """
        position, marker = pending[0]
        try:
            fields = json.loads(marker)
            count, crc = int(fields["count"]), int(fields["crc"])
            remoteMarker = base64.b64decode(fields["remote"], validate=True)
        except (ValueError, KeyError, TypeError):
            self._log.error(
                "Queue {queue}: unreadable in-doubt marker {marker!r}; forwarding what follows",
                queue=queue,
                marker=marker[:200],
            )
            del pending[0]
            await self._acknowledged(queue, position)
            return
        reader = await self._reader(queue)
        while len(pending) < count + 1:
            more = await self._runInThread(
                reader.read, count + 1 - len(pending), self._batchBytes, True
            )
            if not more:
                break
            pending.extend(more)
            await self.journal.flush(queue)
        copy = pending[1 : count + 1]
        intact = (
            len(copy) == count
            and not any(isinstance(payload, Marker) for _, payload in copy)
            and _itemsCRC([payload for _, payload in copy]) == crc
        )
        if not intact or not isinstance(self.remote, ResolvableQueue):
            self._log.warn(
                "Queue {queue}: the copy after an in-doubt marker is {what}; forwarding it",
                queue=queue,
                what="incomplete" if not intact else "for a remote that cannot settle it",
            )
            del pending[0]
            await self._acknowledged(queue, position)
            return
        try:
            stored = await self.remote.resolve(queue, remoteMarker)
        except ValueError as e:
            self._log.error(
                "Queue {queue}: the remote cannot settle in-doubt marker {marker!r} ({error}); "
                "forwarding what follows",
                queue=queue,
                marker=marker[:200],
                error=e,
            )
            del pending[0]
            await self._acknowledged(queue, position)
            return
        except Exception as e:
            await self._remoteError(f"settling an in-doubt put failed: {e}")
            return
        self._failures = 0
        if stored:
            self._log.info(
                "Queue {queue}: an in-doubt put of {count} items was stored; skipping its copy",
                queue=queue,
                count=count,
            )
            del pending[: count + 1]
            self._skipped += count
            await self._acknowledged(queue, copy[-1][0] if copy else position)
        else:
            del pending[0]
            await self._acknowledged(queue, position)

    async def _remoteError(self, reason: str) -> None:
        self._failures += 1
        self._setState("waiting", reason)
        await self._wait(self._backoff(self._failures))

    async def _acknowledged(self, queue: str, position: Any) -> None:
        """
        Everything up to C{position} is settled with the remote: commit it,
        unless a commit of this queue is failing and waits for its retry.
        """
        self._uncommitted[queue] = position
        if queue not in self._commitRetryAt:
            await self._commitPosition(queue)

    async def _commitPosition(self, queue: str) -> None:
        """
        Write the checkpoint of C{queue} at its acknowledged position.  On
        failure, keep the position (what it covers is never sent again),
        retry later with backoff, and delete the segments before it so that
        a full disk gets room for the checkpoint.
        """
        position = self._uncommitted[queue]
        try:
            backlog = await self._runInThread(self._commit, self._readers[queue], position)
        except Exception as e:
            self._checkpointFailures += 1
            failures = self._commitFailures[queue] = self._commitFailures.get(queue, 0) + 1
            delay = self._backoff(failures)
            self._commitRetryAt[queue] = self._clock.seconds() + delay
            reason = f"checkpoint write for {queue} failed: {e}; retrying in {delay:.1f}s"
            if failures == 1:
                self._log.error(
                    "Forwarder: {reason} (what the remote acknowledged is not sent again)",
                    reason=reason,
                )
            self._setState("waiting", reason)
            try:
                await self.journal.deleteBefore(queue, position.segment, self._checkpointName)
            except Exception:
                self._log.failure("Forwarder: deleting forwarded segments of {queue} failed")
            return
        if self._commitFailures.pop(queue, None) is not None:
            self._log.info("Forwarder: the checkpoint of {queue} is written again", queue=queue)
        self._commitRetryAt.pop(queue, None)
        del self._uncommitted[queue]
        self._backlog[queue] = backlog
        self._consumedTo(queue, backlog)
        if position.segment != self._segments.setdefault(queue, position.segment):
            # The checkpoint moved into a newer segment: the older ones may
            # now be behind every checkpoint, so the disk space comes back.
            self._segments[queue] = position.segment
            await self.journal.deleteConsumed(queue)

    async def _reader(self, queue: str) -> SpoolReader:
        reader = self._readers.get(queue)
        if reader is None:
            reader = await self._runInThread(self.journal.reader, queue, self._checkpointName)
            self._readers[queue] = reader
        return reader

    def _scanJournal(self) -> dict[str, tuple[SpoolReader, int, float]]:
        """
        (In a thread.)  A reader for every queue in the journal, at this
        forwarder's checkpoint, the number of items after it and about how
        long ago the first of them was written.
        """
        found = {}
        now = time.time()
        for queue in self.journal.queues():
            reader = self.journal.reader(queue, self._checkpointName)
            found[queue] = (reader, reader.backlog()[0], reader.backlogAge(now))
        return found

    def _totals(self, queue: str) -> _QueueTotals:
        totals = self._queueTotals.get(queue)
        if totals is None:
            totals = self._queueTotals[queue] = _QueueTotals()
        return totals

    def _noteJournaled(self, queue: str, when: float, records: int) -> None:
        runs = self._journaledAt.setdefault(queue, deque())
        runs.append([when, records])

    def _consumedTo(self, queue: str, backlog: int) -> None:
        """
        The backlog of C{queue} is down to C{backlog} records: forget the
        oldest journaled runs beyond it, so the oldest left dates the lag.
        """
        runs = self._journaledAt.get(queue)
        if not runs:
            return
        excess = sum(run[1] for run in runs) - backlog
        while runs and excess >= runs[0][1]:
            excess -= runs.popleft()[1]
        if runs and excess > 0:
            runs[0][1] -= excess
        if not runs or not backlog:
            del self._journaledAt[queue]

    def _queueStatus(self) -> dict[str, dict[str, float]]:
        """
        Per queue: events forwarded, events in forwarding attempts that
        failed (counted again at each retry), events journaled instead of
        put to the remote, and the age in seconds of the oldest event
        waiting to be forwarded (0 when none waits).
        """
        now = self._clock.seconds()
        queues = {}
        for queue in sorted(set(self._queueTotals) | set(self._backlog)):
            totals = self._totals(queue)
            runs = self._journaledAt.get(queue)
            queues[queue] = {
                "forwarded": totals.forwarded,
                "failed": totals.failed,
                "journaled": totals.journaled,
                "lagSeconds": round(max(0.0, now - runs[0][0]), 3) if runs else 0.0,
            }
        return queues

    @staticmethod
    def _commit(reader: SpoolReader, position: Any) -> int:
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
