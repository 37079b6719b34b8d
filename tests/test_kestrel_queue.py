"""
Tests for L{mixingest.queues.kestrel.KestrelQueue}.

Wire format against a real C{memcached}; Kestrel semantics against the
in-test double (L{tests.kestrel_double}) on loopback and, when
C{MIXINGEST_KESTREL=host:port} is set, the tests a real Kestrel can take
part in also run against it.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue

from mixingest.errors import QueueUnavailable
from mixingest.queues.base import EventQueue
from mixingest.queues.kestrel import KestrelQueue
from tests.kestrel_double import KestrelDouble, deleteQueue, drain
from tests.servers import MemcachedServer, freePort, memcachedServer, waitUntil

__all__ = ["memcachedServer"]  # the fixture, for pytest to find

REAL_KESTREL = os.environ.get("MIXINGEST_KESTREL")
SCRIPTS = Path(__file__).parent.parent / "scripts"


def makeKestrelQueue(*addresses: tuple[str, int], **kwargs: Any) -> KestrelQueue:
    kwargs.setdefault("writeTimeout", 1.0)
    kwargs.setdefault("connectTimeout", 1.0)
    kwargs.setdefault("backoff", lambda attempt: 0.05)
    return KestrelQueue(list(addresses), reactor, **kwargs)


def serverStates(queue: KestrelQueue) -> list[str]:
    return [s["state"] for s in queue.status()["servers"]]


@pytest_twisted.async_yield_fixture
async def double() -> AsyncIterator[KestrelDouble]:
    server = KestrelDouble()
    server.listen()
    yield server
    await server.stop()


@pytest_twisted.async_yield_fixture
async def double2() -> AsyncIterator[KestrelDouble]:
    server = KestrelDouble()
    server.listen()
    yield server
    await server.stop()


@pytest.fixture(params=["double", "real"])
def kestrel(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    """
    The address of a Kestrel: the double, and a real one when configured.
    """
    if request.param == "real":
        if not REAL_KESTREL:
            pytest.skip("set MIXINGEST_KESTREL=host:port to also run against a real Kestrel")
        host, _, port = REAL_KESTREL.rpartition(":")
        yield (host, int(port))
    else:
        server = KestrelDouble()
        server.listen()
        yield server.address
        server.stop()


@pytest_twisted.async_yield_fixture
async def queueName(kestrel: tuple[str, int]) -> AsyncIterator[str]:
    """
    A fresh queue name, deleted afterwards: a real Kestrel is shared.
    """
    name = f"mixingest-test-{uuid.uuid4().hex[:12]}"
    yield name
    await deleteQueue(kestrel, name)


async def started(queue: KestrelQueue, servers: int) -> KestrelQueue:
    queue.startService()
    await waitUntil(
        lambda: sum(s["state"] == "up" for s in queue.status()["servers"]) == servers,
        what=f"{servers} Kestrel servers up",
    )
    return queue


def test_isEventQueue() -> None:
    assert isinstance(makeKestrelQueue(("127.0.0.1", 1)), EventQueue)


def test_needsServers() -> None:
    with pytest.raises(ValueError):
        KestrelQueue([], reactor)


# -- against the double and a real Kestrel


@pytest_twisted.ensureDeferred
async def test_batchesStoredInOrder(kestrel: tuple[str, int], queueName: str) -> None:
    """
    A batch is pipelined to one server and acknowledged once every item is
    C{STORED}; a single server keeps the queue's order.
    """
    queue = await started(makeKestrelQueue(kestrel), 1)
    try:
        await queue.put(queueName, [b'{"n":1}'])
        await queue.put(queueName, [b'{"n":%d}' % n for n in range(2, 60)])
        await queue.put(queueName, [])
        await queue.put(queueName, [b'{"e":"\xc3\xa9 \\r\\n"}'])
        assert await drain(kestrel, queueName) == [
            *(b'{"n":%d}' % n for n in range(1, 60)),
            b'{"e":"\xc3\xa9 \\r\\n"}',
        ]
        assert queue.status()["servers"][0]["stored"] == 60
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_twoServersOneDown(kestrel: tuple[str, int], queueName: str) -> None:
    """
    A server that refuses connections is marked down and every write goes
    to the healthy one.
    """
    dead = ("127.0.0.1", freePort())
    queue = makeKestrelQueue(dead, kestrel)
    queue.startService()
    try:
        await waitUntil(
            lambda: serverStates(queue) == ["down", "up"], what="one server down, one up"
        )
        assert queue.ready()
        for n in range(20):
            await queue.put(queueName, [b"%d" % n])
        assert await drain(kestrel, queueName) == [b"%d" % n for n in range(20)]
        down = queue.status()["servers"][0]
        assert down["healthy"] is False
        assert "connect failed" in down["reason"]
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_consumerScript(
    kestrel: tuple[str, int], double2: KestrelDouble, queueName: str
) -> None:
    """
    C{scripts/consume-kestrel} reads every server of the cluster with
    C{/open} and C{/close}, and confirms everything it printed.
    """
    queue = await started(makeKestrelQueue(kestrel, double2.address), 2)
    try:
        await queue.put(queueName, [b'{"n":1}', b'{"n":2}'])
        await queue.put(queueName, [b'{"n":3}'])
    finally:
        await queue.stopService()
    url = "kestrel://" + ",".join(f"{host}:{port}" for host, port in (kestrel, double2.address))
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        [str(SCRIPTS / "consume-kestrel"), url, queueName, "--wait-ms=100", "--exit-when-empty"],
        env=dict(os.environ),
    )
    assert code == 0, err
    assert sorted(out.splitlines()) == [b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert b"consumed 3 events" in err
    assert await drain(kestrel, queueName) == []
    assert double2.items(queueName) == []


# -- Kestrel's failure semantics, reproduced by the double


@pytest_twisted.ensureDeferred
async def test_wireFormat(double: KestrelDouble) -> None:
    """
    Exactly C{set <queue> 0 0 <bytes>}: lower case, single spaces, no
    C{noreply}, as a strict Kestrel-compatible server demands.
    """
    queue = await started(makeKestrelQueue(double.address), 1)
    try:
        await queue.put("events", [b"abc", b"{}"])
        await queue.put("my_queue-2", [b"x" * 1000])
    finally:
        await queue.stopService()
    assert double.lines == [b"set events 0 0 3", b"set events 0 0 2", b"set my_queue-2 0 0 1000"]


@pytest_twisted.ensureDeferred
async def test_doubleIsStrict(double: KestrelDouble) -> None:
    """
    The double refuses what a strict server would, so the wire format test
    above means something.
    """
    proto = await _raw(double)
    try:
        for line, answer in [
            (b"SET events 0 0 1\r\n", b"ERROR\r\n"),
            (b"set events  0 0 1\r\n", b"CLIENT_ERROR bad command line\r\n"),
            (b"set events 0 0 1 noreply\r\n", b"CLIENT_ERROR bad command line\r\n"),
            (b"set ev.ents 0 0 1\r\n", b"CLIENT_ERROR bad command line\r\n"),
            (b"set events 0 0 1\r\nxy\r\n", b"CLIENT_ERROR bad data chunk\r\n"),
        ]:
            assert await proto.ask(line) == answer
    finally:
        proto.transport.loseConnection()
    assert double.items("events") == []


@pytest_twisted.ensureDeferred
async def test_doubleReturnsOpenItem(double: KestrelDouble) -> None:
    """
    The premise of the consumer's reliable read, as Kestrel implements it:
    an item opened but not confirmed goes back to the head of its queue when
    the reader's connection drops.
    """
    double.queue(b"events").extend([b"a", b"b"])
    proto = await _raw(double)
    assert await proto.ask(b"get events/open\r\n") == b"VALUE events 0 1\r\n"
    assert double.items("events") == [b"b"]
    proto.transport.loseConnection()
    await waitUntil(
        lambda: double.items("events") == [b"a", b"b"], what="the open item to come back"
    )


@pytest_twisted.ensureDeferred
async def test_notStoredFails(double: KestrelDouble) -> None:
    """
    C{NOT_STORED} (a full queue here) is not an acknowledgement: the batch
    fails, but the server is healthy and stays in rotation.
    """
    double.maxItems = 3
    queue = await started(makeKestrelQueue(double.address), 1)
    try:
        with pytest.raises(QueueUnavailable, match=r"2 items not stored.*NOT_STORED"):
            await queue.put("events", [b"1", b"2", b"3", b"4", b"5"])
        assert double.items("events") == [b"1", b"2", b"3"]
        assert serverStates(queue) == ["up"]
        assert queue.status()["servers"][0]["refused"] == 2
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_notStoredRetriedOnAnotherServer(
    double: KestrelDouble, double2: KestrelDouble
) -> None:
    """
    Another server's queue may have room: only the refused items are sent
    there, so nothing is stored twice.
    """
    double.maxItems = 2
    queue = await started(makeKestrelQueue(double.address, double2.address), 2)
    try:
        await queue.put("events", [b"1", b"2", b"3", b"4", b"5"])
        assert double.items("events") == [b"1", b"2"]
        assert double2.items("events") == [b"3", b"4", b"5"]
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_shuttingDown(double: KestrelDouble) -> None:
    double.shuttingDown = True
    queue = await started(makeKestrelQueue(double.address), 1)
    try:
        with pytest.raises(QueueUnavailable, match="NOT_STORED"):
            await queue.put("events", [b"1"])
        assert double.items("events") == []
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_serverErrorMarksDown(double: KestrelDouble, double2: KestrelDouble) -> None:
    """
    C{SERVER_ERROR} (a read-only Kestrel, which then hangs up) fails the
    server: it is marked down and the batch goes to the other one.
    """
    double.readOnly = True
    queue = await started(
        makeKestrelQueue(double.address, double2.address, backoff=lambda n: 30.0), 2
    )
    try:
        await queue.put("events", [b"1", b"2"])
        assert double.items("events") == []
        assert double2.items("events") == [b"1", b"2"]
        first = queue.status()["servers"][0]
        assert first["state"] == "down"
        assert "ServerError" in first["reason"]
        await queue.put("events", [b"3"])
        assert double2.items("events") == [b"1", b"2", b"3"]
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_vanishMidPipeline(double: KestrelDouble) -> None:
    """
    A server that hangs up in the middle of a pipelined batch acknowledged
    only part of it: the batch fails, the server is down until it is
    reachable again after the backoff.
    """
    double.vanishAfterSets = 2
    queue = await started(makeKestrelQueue(double.address), 1)
    try:
        with pytest.raises(QueueUnavailable, match="3 items not stored"):
            await queue.put("events", [b"1", b"2", b"3", b"4", b"5"])
        assert double.items("events") == [b"1", b"2"]
        assert not queue.ready()
        double.vanishAfterSets = None
        await waitUntil(queue.ready, what="the server to come back after the backoff")
        await queue.put("events", [b"6"])
        assert double.items("events") == [b"1", b"2", b"6"]
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_vanishMidPipelineTwoServers(double: KestrelDouble, double2: KestrelDouble) -> None:
    """
    The items the vanished server did not acknowledge are retried on the
    other one, and the put succeeds.
    """
    double.vanishAfterSets = 2
    queue = await started(makeKestrelQueue(double.address, double2.address), 2)
    try:
        await queue.put("events", [b"1", b"2", b"3", b"4", b"5"])
        assert double.items("events") == [b"1", b"2"]
        assert double2.items("events") == [b"3", b"4", b"5"]
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_slowServerTimesOut(double: KestrelDouble) -> None:
    double.delay = 5.0
    queue = await started(makeKestrelQueue(double.address, writeTimeout=0.3), 1)
    try:
        begin = time.monotonic()
        with pytest.raises(QueueUnavailable, match="TimeoutError"):
            await queue.put("events", [b"1"])
        assert 0.25 < time.monotonic() - begin < 2
        assert serverStates(queue) == ["down"]
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_slowServerBypassed(double: KestrelDouble, double2: KestrelDouble) -> None:
    """
    A write that times out on a slow server is retried on another; the slow
    one then sits out its backoff instead of costing every write a timeout.
    """
    double.delay = 5.0
    queue = await started(
        makeKestrelQueue(double.address, double2.address, writeTimeout=0.3, backoff=lambda n: 30.0),
        2,
    )
    try:
        begin = time.monotonic()
        await queue.put("events", [b"1"])
        assert time.monotonic() - begin < 2
        assert double2.items("events") == [b"1"]
        assert serverStates(queue) == ["down", "up"]
        for n in range(2, 6):
            await queue.put("events", [b"%d" % n])
        assert double.setsReceived == 1
        assert double2.items("events") == [b"1", b"2", b"3", b"4", b"5"]
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_serverComesBack(double: KestrelDouble, double2: KestrelDouble) -> None:
    """
    A server that went away is written to again once it is back: writes are
    spread over both.
    """
    queue = await started(makeKestrelQueue(double.address, double2.address), 2)
    try:
        await double2.stop()
        await waitUntil(
            lambda: serverStates(queue) == ["up", "down"], what="the stopped server to be down"
        )
        for n in range(4):
            await queue.put("events", [b"%d" % n])
        assert double.items("events") == [b"0", b"1", b"2", b"3"]
        double2.listen()
        await waitUntil(lambda: serverStates(queue) == ["up", "up"], what="the server to be back")
        for n in range(4, 8):
            await queue.put("events", [b"%d" % n])
        assert len(double.items("events")) == 6
        assert len(double2.items("events")) == 2
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_noServerUp() -> None:
    queue = makeKestrelQueue(("127.0.0.1", freePort()))
    queue.startService()
    try:
        await waitUntil(lambda: serverStates(queue) == ["down"], what="the server to be down")
        assert not queue.ready()
        with pytest.raises(QueueUnavailable, match="no healthy server"):
            await queue.put("events", [b"1"])
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_stopFinishesPutsInFlight(double: KestrelDouble) -> None:
    double.delay = 0.1
    queue = await started(makeKestrelQueue(double.address), 1)
    put = queue.put("events", [b"1", b"2"])
    stopped = queue.stopService()
    with pytest.raises(QueueUnavailable, match="stopping"):
        await queue.put("events", [b"3"])
    await put
    await stopped
    assert double.items("events") == [b"1", b"2"]
    await waitUntil(lambda: not double.connections, what="the connections to close")


# -- wire format against a real memcached


@pytest_twisted.ensureDeferred
async def test_memcachedAcceptsSet(memcachedServer: MemcachedServer) -> None:
    """
    A real memcache server stores exactly what the client sends: each
    C{set} answers C{STORED} and a C{get} returns the bytes (a memcache key
    holds one value, so the last item of a batch wins).
    """
    queue = await started(makeKestrelQueue((memcachedServer.host, memcachedServer.port)), 1)
    try:
        await queue.put("events", [b'{"event":"one"}'])
        assert memcachedServer.get("events") == b'{"event":"one"}'
        await queue.put("events", [b"a", b"bb", b'{"e":"\xc3\xa9"}'])
        assert memcachedServer.get("events") == b'{"e":"\xc3\xa9"}'
        big = b'{"p":"' + b"x" * 200_000 + b'"}'
        await queue.put("my_queue-2", [big])
        assert memcachedServer.get("my_queue-2") == big
        assert queue.status()["servers"][0]["stored"] == 5
    finally:
        await queue.stopService()


class _RawClient:
    """Sends raw bytes and returns the next reply line, for the strictness test."""

    def __init__(self, transport: Any, lines: Any) -> None:
        self.transport = transport
        self._lines = lines

    async def ask(self, data: bytes) -> bytes:
        self.transport.write(data)
        return bytes(await self._lines.get())


async def _raw(double: KestrelDouble) -> _RawClient:
    from twisted.internet.defer import DeferredQueue
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.protocols.basic import LineReceiver

    lines: DeferredQueue[bytes] = DeferredQueue()

    class Lines(LineReceiver):
        def lineReceived(self, line: bytes) -> None:
            lines.put(line + b"\r\n")

    host, port = double.address
    proto = await connectProtocol(TCP4ClientEndpoint(reactor, host, port), Lines())
    return _RawClient(proto.transport, lines)
