"""
Tests for L{mixingest.queues.forwarding.ForwardingQueue}: store-and-forward
over the real journal, into an in-memory remote whose failures the tests
control, into a real C{redis-server} stopped and restarted under load, and
into the Kestrel double.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest
import pytest_twisted
from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.task import deferLater

from mixingest.errors import InDoubt, QueueUnavailable
from mixingest.journal import FsyncPolicy, Journal
from mixingest.queues.base import EventQueue
from mixingest.queues.forwarding import ForwardingQueue
from mixingest.queues.kestrel import KestrelQueue
from mixingest.queues.redis import RedisQueue
from tests.kestrel_double import KestrelDouble
from tests.servers import RedisServer, redisServer, waitUntil

__all__ = ["redisServer"]  # the fixture, for pytest to find


class FakeRemote(Service):
    """
    An in-memory remote queue that fails on demand.

    @ivar failing: puts fail with L{QueueUnavailable} and C{ready()} is false.
    @ivar hold: if set, puts are stored only once it fires.
    @ivar puts: every batch it was given, acknowledged or not.
    """

    def __init__(self) -> None:
        self.failing = False
        self.hold: Deferred[None] | None = None
        self.items: dict[str, list[bytes]] = {}
        self.puts: list[tuple[str, list[bytes]]] = []
        self.stopped = False

    def put(self, queue: str, items: Sequence[bytes]) -> Deferred[None]:
        self.puts.append((queue, list(items)))
        if self.failing:
            return fail(QueueUnavailable("fake remote is down"))
        if self.hold is not None:
            return self.hold.addCallback(lambda _: self.items.setdefault(queue, []).extend(items))
        self.items.setdefault(queue, []).extend(items)
        return succeed(None)

    def ready(self) -> bool:
        return not self.failing

    def status(self) -> Mapping[str, Any]:
        return {"backend": "fake", "healthy": self.ready()}

    def stopService(self) -> None:
        super().stopService()
        self.stopped = True


def makeJournal(path: Path, **kwargs: Any) -> Journal:
    return Journal(str(path / "journal"), FsyncPolicy.never(), reactor=reactor, **kwargs)


def makeForwarding(remote: EventQueue, journal: Journal, **kwargs: Any) -> ForwardingQueue:
    kwargs.setdefault("pollInterval", 0.02)
    kwargs.setdefault("backoff", lambda attempt: 0.02)
    return ForwardingQueue(remote, journal, reactor, **kwargs)


async def started(queue: ForwardingQueue) -> ForwardingQueue:
    queue.startService()
    await waitUntil(
        lambda: queue.status()["forwarder"]["state"] != "scanning", what="the journal scan"
    )
    return queue


def drained(queue: ForwardingQueue) -> bool:
    status = queue.status()
    return not status["diverted"] and not any(status["backlog"].values())


def items(prefix: bytes, count: int, start: int = 0, pad: int = 0) -> list[bytes]:
    return [b'{"%s":%d,"pad":"%s"}' % (prefix, n, b"x" * pad) for n in range(start, start + count)]


def test_isEventQueue(tmp_path: Path) -> None:
    assert isinstance(makeForwarding(FakeRemote(), makeJournal(tmp_path)), EventQueue)


@pytest_twisted.ensureDeferred
async def test_healthyRemoteDirect(tmp_path: Path) -> None:
    """
    While the remote is healthy, puts go straight to it and the journal
    stays empty.
    """
    remote = FakeRemote()
    journal = makeJournal(tmp_path)
    queue = await started(makeForwarding(remote, journal))
    try:
        await queue.put("events", items(b"a", 3))
        assert remote.items == {"events": items(b"a", 3)}
        assert journal.queues() == []
        assert queue.status()["forwarder"]["state"] == "idle"
        assert queue.ready()
    finally:
        await queue.stopService()
    assert remote.stopped
    assert not journal.running


@pytest_twisted.ensureDeferred
async def test_outageAndRecovery(tmp_path: Path) -> None:
    """
    During an outage puts are journaled and acknowledged; the queue stays
    diverted until the forwarder has caught up, then puts go direct again.
    The remote gets everything once, in order.
    """
    remote = FakeRemote()
    queue = await started(makeForwarding(remote, makeJournal(tmp_path), batchItems=7))
    try:
        await queue.put("events", items(b"n", 5))
        remote.failing = True
        for n in range(5, 50, 5):
            await queue.put("events", items(b"n", 5, n))
        await queue.put("other", [b"o"])
        status = queue.status()
        assert status["diverted"] == ["events", "other"]
        assert status["backlog"] == {"events": 45, "other": 1}
        assert status["forwarder"]["state"] == "waiting"
        assert queue.ready()
        remote.failing = False
        await waitUntil(lambda: drained(queue), what="the journal to be forwarded")
        await queue.put("events", items(b"n", 5, 50))
        assert remote.items == {"events": items(b"n", 55), "other": [b"o"]}
        assert queue.status()["forwarder"]["forwarded"] == 46
        # The forwarder sent batches of at most 7 items.
        assert max(len(batch) for _, batch in remote.puts) == 7
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_backlogKeepsOrder(tmp_path: Path) -> None:
    """
    With a backlog in the journal, a new put goes behind it even though the
    remote is healthy: the remote never sees a later event first.
    """
    remote = FakeRemote()
    remote.failing = True
    queue = await started(makeForwarding(remote, makeJournal(tmp_path)))
    try:
        await queue.put("events", items(b"n", 3))
        remote.hold = Deferred()
        remote.failing = False
        await waitUntil(lambda: remote.puts, what="the forwarder to send")
        await queue.put("events", items(b"n", 3, 3))
        assert len(remote.puts) == 1
        assert queue.status()["diverted"] == ["events"]
        remote.hold.callback(None)
        await waitUntil(lambda: drained(queue), what="the journal to be forwarded")
        assert remote.items == {"events": items(b"n", 6)}
    finally:
        await queue.stopService()


class ShiftedClock:
    """
    The reactor's clock, C{shift} seconds ahead: time passes for the lag
    without the test waiting for it.
    """

    def __init__(self) -> None:
        self.shift = 0.0

    def seconds(self) -> float:
        return reactor.seconds() + self.shift

    def callLater(self, delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
        return reactor.callLater(delay, f, *args, **kwargs)

    def getDelayedCalls(self) -> Any:
        return reactor.getDelayedCalls()


def perQueue(queue: ForwardingQueue, name: str = "events") -> dict[str, float]:
    return queue.status()["forwarder"]["queues"][name]


@pytest_twisted.ensureDeferred
async def test_perQueueTotalsAndLag(tmp_path: Path) -> None:
    """
    Per queue: what was journaled, what failed to forward and what was
    forwarded; the lag is the age of the oldest event not yet forwarded,
    and it moves to the next oldest as batches are acknowledged.
    """
    remote = FakeRemote()
    clock = ShiftedClock()
    queue = ForwardingQueue(
        remote,
        makeJournal(tmp_path),
        clock,
        pollInterval=0.02,
        backoff=lambda _: 0.02,
        batchItems=5,
    )
    await started(queue)
    first, second = Deferred[None](), Deferred[None]()
    try:
        remote.failing = True
        await queue.put("events", items(b"n", 5))
        clock.shift += 30
        await queue.put("events", items(b"n", 5, 5))
        assert 30 <= perQueue(queue)["lagSeconds"] < 35
        assert perQueue(queue)["journaled"] == 10
        # The remote says it is ready but refuses: attempts fail, counted.
        remote.ready = lambda: True  # type: ignore[method-assign]
        await waitUntil(lambda: perQueue(queue)["failed"] >= 10, what="failed attempts")
        remote.hold = first
        remote.failing = False
        sent = len(remote.puts)
        await waitUntil(lambda: len(remote.puts) > sent, what="the first batch sent")
        assert remote.puts[-1][1] == items(b"n", 5)
        remote.hold = second
        first.callback(None)
        await waitUntil(lambda: queue.status()["backlog"]["events"] == 5, what="the first ack")
        assert perQueue(queue)["lagSeconds"] < 5, "the lag moved to the second put"
        assert perQueue(queue)["forwarded"] == 5
        remote.hold = None
        second.callback(None)
        await waitUntil(lambda: drained(queue), what="the rest forwarded")
        assert perQueue(queue) == {
            "forwarded": 10,
            "failed": perQueue(queue)["failed"],
            "journaled": 10,
            "lagSeconds": 0.0,
        }
    finally:
        for held in (first, second):
            if not held.called:
                held.callback(None)
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_lagOfLeftoversDatesFromTheirSegment(tmp_path: Path) -> None:
    """
    After a restart, the lag of what an earlier run journaled counts from
    when its segment was written, not from the restart.
    """
    remote = FakeRemote()
    remote.failing = True
    first = await started(makeForwarding(remote, makeJournal(tmp_path)))
    await first.put("events", items(b"n", 3))
    await first.stopService()
    for name in os.listdir(tmp_path / "journal" / "events"):
        if name.endswith(".seg"):
            path = tmp_path / "journal" / "events" / name
            old = path.stat().st_mtime - 600
            os.utime(path, (old, old))
    second = await started(makeForwarding(remote, makeJournal(tmp_path)))
    try:
        assert 600 <= perQueue(second)["lagSeconds"] < 700
    finally:
        await second.stopService()


@pytest_twisted.ensureDeferred
async def test_restartForwardsLeftovers(tmp_path: Path) -> None:
    """
    What one run journaled and did not forward, the next run forwards from
    its checkpoint, and deletes the segments once they are consumed.
    """
    remote = FakeRemote()
    remote.failing = True
    first = await started(makeForwarding(remote, makeJournal(tmp_path, segmentSize=1024)))
    for n in range(0, 100, 10):
        await first.put("events", items(b"n", 10, n, pad=100))
    await first.stopService()
    segments = lambda: sorted(os.listdir(tmp_path / "journal" / "events"))  # noqa: E731
    assert len([s for s in segments() if s.endswith(".seg")]) > 3

    remote = FakeRemote()
    remote.failing = True
    second = await started(
        makeForwarding(remote, makeJournal(tmp_path, segmentSize=1024), batchItems=10)
    )
    try:
        assert second.status()["backlog"] == {"events": 100}
        assert second.status()["diverted"] == ["events"]
        remote.failing = False
        await waitUntil(lambda: drained(second), what="the leftovers to be forwarded")
        assert remote.items == {"events": items(b"n", 100, pad=100)}
        await waitUntil(
            lambda: len([s for s in segments() if s.endswith(".seg")]) == 1,
            what="the consumed segments to be deleted",
        )
    finally:
        await second.stopService()

    third = await started(makeForwarding(FakeRemote(), makeJournal(tmp_path)))
    try:
        assert third.status()["diverted"] == []
        assert third.status()["backlog"] == {"events": 0}
    finally:
        await third.stopService()


def failingCommits(journal: Journal, failing: list[bool], attempts: list[Any]) -> None:
    """
    Make the checkpoint writes of C{journal}'s readers fail with ENOSPC
    while C{failing[0]} is true, recording every attempt.
    """
    realReader = journal.reader

    def reader(name: str, checkpointName: str) -> Any:
        inner = realReader(name, checkpointName)
        commit = inner.commit

        def maybeFail(position: Any) -> None:
            attempts.append(position)
            if failing[0]:
                raise OSError(28, "No space left on device")
            commit(position)

        inner.commit = maybeFail  # type: ignore[method-assign]
        return inner

    journal.reader = reader  # type: ignore[method-assign]


@pytest_twisted.ensureDeferred
async def test_failingCheckpointNeverResends(tmp_path: Path) -> None:
    """
    A checkpoint write that keeps failing after the remote acknowledged (a
    full disk) is retried on its own: nothing the remote acknowledged is
    sent again, the status says why the forwarder waits, and the
    checkpoint lands once the disk works.  (The old forwarder resent the
    batch on every retry: a flood of duplicates.)
    """
    remote = FakeRemote()
    remote.failing = True
    journal = makeJournal(tmp_path)
    queue = await started(makeForwarding(remote, journal, batchItems=3))
    failing, attempts = [True], []
    failingCommits(journal, failing, attempts)
    try:
        await queue.put("events", items(b"n", 10))
        remote.failing = False
        await waitUntil(lambda: len(attempts) >= 6, what="several failed checkpoint writes")
        status = queue.status()["forwarder"]
        assert "checkpoint write for events failed" in status["reason"]
        assert status["checkpointFailures"] >= 5
        assert status["uncommitted"] == ["events"]
        assert remote.items == {"events": items(b"n", 10)}
        failing[0] = False
        await waitUntil(lambda: drained(queue), what="the journal to be forwarded")
        await waitUntil(
            lambda: not queue.status()["forwarder"]["uncommitted"], what="the checkpoint"
        )
        assert remote.items == {"events": items(b"n", 10)}
    finally:
        await queue.stopService()
    with journal.reader("events", "forwarder") as reader:
        assert reader.committed is not None
        assert reader.read(10, 1 << 20) == []


@pytest_twisted.ensureDeferred
async def test_failingCheckpointFreesForwardedSegments(tmp_path: Path) -> None:
    """
    While the checkpoint cannot be written, the segments before the
    acknowledged position are deleted all the same (they are safe in the
    remote), which is what gives a full disk room for the checkpoint.
    """
    remote = FakeRemote()
    remote.failing = True
    journal = makeJournal(tmp_path, segmentSize=512)
    queue = await started(makeForwarding(remote, journal, batchItems=5))
    failing, attempts = [True], []
    failingCommits(journal, failing, attempts)
    try:
        for n in range(0, 40, 4):
            await queue.put("events", items(b"n", 4, start=n, pad=40))
        queueDir = tmp_path / "journal" / "events"
        before = len(list(queueDir.glob("*.seg")))
        remote.failing = False
        await waitUntil(lambda: drained(queue), what="the journal to be forwarded")
        after = len(list(queueDir.glob("*.seg")))
        assert before > 3
        assert after < before
        assert remote.items == {"events": items(b"n", 40, pad=40)}
    finally:
        failing[0] = False
        await queue.stopService()
    # The stop wrote the checkpoint at last: a restart sends nothing again.
    again = FakeRemote()
    restarted = await started(makeForwarding(again, makeJournal(tmp_path, segmentSize=512)))
    try:
        await waitUntil(lambda: drained(restarted), what="the restarted forwarder")
        assert again.items == {}
    finally:
        await restarted.stopService()


@pytest_twisted.ensureDeferred
async def test_putsJournaledInPutOrder(tmp_path: Path) -> None:
    """
    A put that has to go to the journal while an earlier put of its queue
    is still with the remote waits for that one: if the earlier one fails,
    its copy is journaled first, so the remote still gets them in order.
    """
    remote = FakeRemote()
    queue = await started(makeForwarding(remote, makeJournal(tmp_path)))
    try:
        remote.hold = Deferred()
        first = queue.put("events", items(b"a", 2))
        remote.failing = True  # the connection is lost with "a" in flight
        second = queue.put("events", items(b"b", 2))
        remote.hold.errback(QueueUnavailable("connection lost"))
        remote.hold = None
        await gatherResults([first, second])
        remote.failing = False
        await waitUntil(lambda: drained(queue), what="the journal to be forwarded")
        assert remote.items == {"events": items(b"a", 2) + items(b"b", 2)}
    finally:
        await queue.stopService()


class ResolvingRemote(FakeRemote):
    """
    A remote that settles in-doubt puts and deduplicates journaled items
    by sequence number, as the Redis queue does.

    @ivar doubt: the next direct put fails in doubt; if C{"stored"}, the
        remote stored it all the same (a command applied late).
    @ivar marks: the highest sequence number stored, by (source, queue).
    """

    def __init__(self) -> None:
        super().__init__()
        self.doubt: str | None = None
        self.settled: dict[bytes, bool] = {}
        self.resolved: list[bytes] = []
        self.marks: dict[tuple[str, str], int] = {}
        self.journaled: list[tuple[str, list[int]]] = []

    def put(self, queue: str, items: Sequence[bytes]) -> Deferred[None]:
        if self.doubt is None or self.failing:
            return super().put(queue, items)
        marker = b"doubt-%d" % len(self.settled)
        self.settled[marker] = self.doubt == "stored"
        if self.doubt == "stored":
            self.items.setdefault(queue, []).extend(items)
        self.doubt = None
        return fail(InDoubt("no answer in time", marker))

    def putJournaled(
        self, queue: str, items: Sequence[bytes], source: str, seqs: Sequence[int]
    ) -> Deferred[None]:
        self.journaled.append((source, list(seqs)))
        if self.failing:
            return fail(QueueUnavailable("fake remote is down"))
        mark = self.marks.get((source, queue), -1)
        fresh = [item for item, seq in zip(items, seqs) if seq > mark]
        self.items.setdefault(queue, []).extend(fresh)
        self.marks[(source, queue)] = max(mark, *seqs)
        return succeed(None)

    def resolve(self, queue: str, marker: bytes) -> Deferred[bool]:
        self.resolved.append(marker)
        return succeed(self.settled[marker])


@pytest.mark.parametrize("outcome", ["stored", "lost"])
@pytest_twisted.ensureDeferred
async def test_inDoubtPutSettled(tmp_path: Path, outcome: str) -> None:
    """
    A direct put that fails in doubt is journaled behind a marker; the
    forwarder asks the remote to settle it and skips the copy if the
    remote had stored it, else forwards it: either way, once, in order.
    """
    remote = ResolvingRemote()
    queue = await started(makeForwarding(remote, makeJournal(tmp_path)))
    try:
        await queue.put("events", items(b"a", 2))
        remote.doubt = outcome
        await queue.put("events", items(b"b", 2))
        await queue.put("events", items(b"c", 2))
        await waitUntil(lambda: drained(queue), what="the journal to be forwarded")
        assert remote.items == {"events": items(b"a", 2) + items(b"b", 2) + items(b"c", 2)}
        assert remote.resolved == [b"doubt-0"]
        assert queue.status()["forwarder"]["skippedInDoubt"] == (2 if outcome == "stored" else 0)
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_inDoubtMarkerSurvivesRestart(tmp_path: Path) -> None:
    """
    The marker is in the journal, so a daemon that restarts before
    forwarding still settles the in-doubt put, and the marker never
    reaches a consumer of the journal.
    """
    remote = ResolvingRemote()
    first = await started(makeForwarding(remote, makeJournal(tmp_path)))
    remote.doubt = "stored"
    inDoubt = first.put("events", items(b"b", 3))
    remote.failing = True  # before the forwarder could settle it
    await inDoubt
    await first.put("events", items(b"c", 1))
    assert remote.resolved == []
    await first.stopService()
    with makeJournal(tmp_path).reader("events") as reader:
        assert [item for _, item in reader] == items(b"b", 3) + items(b"c", 1)
    remote.failing = False
    second = await started(makeForwarding(remote, makeJournal(tmp_path)))
    try:
        await waitUntil(lambda: drained(second), what="the journal to be forwarded")
        assert remote.items == {"events": items(b"b", 3) + items(b"c", 1)}
        assert remote.resolved == [b"doubt-0"]
    finally:
        await second.stopService()


@pytest_twisted.ensureDeferred
async def test_forwardedWithJournalSequenceNumbers(tmp_path: Path) -> None:
    """
    A remote that deduplicates is sent the journal's identity and each
    item's sequence number, so a batch resent after a crash between the
    remote's acknowledgement and the checkpoint is stored once.
    """
    remote = ResolvingRemote()
    remote.failing = True
    journal = makeJournal(tmp_path)
    queue = await started(makeForwarding(remote, journal, batchItems=4))
    failing, attempts = [True], []
    failingCommits(journal, failing, attempts)
    await queue.put("events", items(b"n", 6))
    remote.failing = False
    await waitUntil(lambda: remote.items.get("events") == items(b"n", 6), what="the forward")
    # Even the stop's last try fails: as after a crash, nothing was
    # checkpointed.
    await queue.stopService()
    source = journal.source
    assert source
    again = await started(makeForwarding(remote, makeJournal(tmp_path), batchItems=4))
    try:
        await waitUntil(lambda: drained(again), what="the journal to be forwarded again")
        assert remote.items == {"events": items(b"n", 6)}
        sources = {sent for sent, _ in remote.journaled}
        assert sources == {source}
        seqs = [seq for _, batch in remote.journaled for seq in batch]
        assert seqs[: len(seqs) // 2] == seqs[len(seqs) // 2 :]
    finally:
        await again.stopService()


@pytest_twisted.ensureDeferred
async def test_journalFailurePropagates(tmp_path: Path) -> None:
    """
    With the remote down and the journal failing, the put fails: nothing is
    acknowledged that is not stored.  The queue is diverted only until the
    forwarder finds nothing to forward.
    """
    remote = FakeRemote()
    remote.failing = True
    journal = makeJournal(tmp_path)
    queue = await started(makeForwarding(remote, journal))
    realPut = journal.put
    journal.put = lambda q, batch, marker=None: fail(  # type: ignore[method-assign]
        QueueUnavailable("disk failed")
    )
    try:
        with pytest.raises(QueueUnavailable, match="disk failed"):
            await queue.put("events", [b"x"])
        journal.put = realPut  # type: ignore[method-assign]
        remote.failing = False
        await waitUntil(lambda: drained(queue), what="the diversion to end")
        await queue.put("events", [b"y"])
        assert remote.items == {"events": [b"y"]}
        with pytest.raises(ValueError):
            await queue.put("bad/name", [b"x"])
    finally:
        await queue.stopService()
    with pytest.raises(QueueUnavailable, match="not running"):
        await queue.put("events", [b"x"])


@pytest_twisted.ensureDeferred
async def test_stopDuringBackoff(tmp_path: Path) -> None:
    """
    Stopping ends a long backoff at once, and stops the remote and the
    journal after the forwarder.
    """
    remote = FakeRemote()
    journal = makeJournal(tmp_path)
    queue = await started(makeForwarding(remote, journal, backoff=lambda n: 3600.0))
    remote.failing = True
    await queue.put("events", [b"x"])
    remote.failing = False

    def failNext(q: str, batch: Sequence[bytes]) -> Deferred[None]:
        return fail(QueueUnavailable("refused"))

    remote.put = failNext  # type: ignore[method-assign]
    await waitUntil(lambda: queue.status()["forwarder"]["failures"] == 1, what="a failed forward")
    stopping = queue.stopService()
    await gatherResults([stopping, deferLater(reactor, 0)])
    assert queue.status()["forwarder"]["state"] == "stopped"
    assert remote.stopped
    assert not journal.running


@pytest_twisted.ensureDeferred
async def test_redisOutageUnderLoad(redisServer: RedisServer, tmp_path: Path) -> None:
    """
    Producers put without pause while Redis is stopped and restarted: every
    acknowledged event reaches the Redis list exactly once, and each
    producer's events stay in the order they were acknowledged.
    """
    remote = RedisQueue(
        HostnameEndpoint(reactor, redisServer.host, redisServer.port, timeout=1),
        reactor,
        address="test",
        writeTimeout=0.5,
        reconnectInitialDelay=0.05,
        reconnectMaxDelay=0.2,
    )
    queue = await started(makeForwarding(remote, makeJournal(tmp_path), batchItems=50))
    await waitUntil(remote.ready, what="Redis connected")
    acked: dict[int, list[bytes]] = {p: [] for p in range(4)}
    putsEach = 150

    async def producer(p: int) -> None:
        for n in range(putsEach):
            batch = [b'{"p":%d,"n":%d,"i":%d}' % (p, n, i) for i in range(n % 3 + 1)]
            await queue.put("events", batch)
            acked[p].extend(batch)

    async def outage() -> None:
        await waitUntil(lambda: min(map(len, acked.values())) > 50, what="some load")
        redisServer.stop()
        await waitUntil(
            lambda: queue.status()["diverted"] == ["events"], what="the queue to be diverted"
        )
        await deferLater(reactor, 0.2)
        redisServer.start()

    try:
        await gatherResults(
            [Deferred.fromCoroutine(producer(p)) for p in range(4)]
            + [Deferred.fromCoroutine(outage())]
        )
        await waitUntil(lambda: drained(queue), timeout=20, what="the journal to be forwarded")
        assert queue.status()["forwarder"]["forwarded"] > 0
    finally:
        await queue.stopService()
    stored = redisServer.items("events")
    everything = [item for batch in acked.values() for item in batch]
    assert len(stored) == len(everything) == len(set(stored))
    assert set(stored) == set(everything)
    for p, mine in acked.items():
        assert [item for item in stored if item.startswith(b'{"p":%d,' % p)] == mine


@pytest_twisted.ensureDeferred
async def test_kestrelOutage(tmp_path: Path) -> None:
    """
    The same through a Kestrel server that goes away and comes back.
    """
    double = KestrelDouble()
    double.listen()
    remote = KestrelQueue([double.address], reactor, writeTimeout=0.5, backoff=lambda n: 0.05)
    queue = await started(makeForwarding(remote, makeJournal(tmp_path)))
    try:
        await waitUntil(remote.ready, what="Kestrel connected")
        await queue.put("events", items(b"n", 10))
        await double.stop()
        await queue.put("events", items(b"n", 10, 10))
        assert queue.status()["diverted"] == ["events"]
        double.listen()
        await waitUntil(lambda: drained(queue), what="the journal to be forwarded")
        await queue.put("events", items(b"n", 10, 20))
        assert double.items("events") == items(b"n", 30)
    finally:
        await queue.stopService()
        await double.stop()
