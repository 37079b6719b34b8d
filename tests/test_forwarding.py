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

from mixingest.journal import FsyncPolicy, Journal
from mixingest.queues.base import EventQueue, QueueUnavailable
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


@pytest_twisted.ensureDeferred
async def test_failedCheckpointResends(tmp_path: Path) -> None:
    """
    If the checkpoint cannot be written after the remote acknowledged (the
    window a crash could hit), the batch is sent again: a duplicate, never
    a loss.
    """
    remote = FakeRemote()
    remote.failing = True
    journal = makeJournal(tmp_path)
    queue = await started(makeForwarding(remote, journal))
    realReader = journal.reader
    broken = []

    def reader(name: str, checkpointName: str) -> Any:
        inner = realReader(name, checkpointName)
        commit = inner.commit

        def failOnce(position: Any) -> None:
            if not broken:
                broken.append(position)
                raise OSError("disk full")
            commit(position)

        inner.commit = failOnce  # type: ignore[method-assign]
        return inner

    journal.reader = reader  # type: ignore[method-assign]
    try:
        await queue.put("events", items(b"n", 4))
        remote.failing = False
        await waitUntil(lambda: drained(queue), what="the journal to be forwarded")
        assert broken
        assert remote.items == {"events": items(b"n", 4) * 2}
    finally:
        await queue.stopService()


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
    journal.put = lambda q, batch: fail(QueueUnavailable("disk failed"))  # type: ignore[method-assign]
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
