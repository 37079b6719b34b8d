"""
Tests for the pipelined C{set} writer of L{mixingest.queues.kestrel}: its
wire bytes and its reading of the answers, over L{StringTransport} on a
L{Clock}, through L{_Server.store} (what L{KestrelQueue} calls).

The behaviour of a whole cluster against a live server is in
C{tests/test_kestrel_queue.py}.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IStreamClientEndpoint, ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mixingest.errors import QueueUnavailable
from mixingest.queues.kestrel import _KestrelProtocol, _Server
from tests.servers import MemcachedServer, memcachedServer, waitUntil
from tests.test_kestrel_queue import makeKestrelQueue

__all__ = ["memcachedServer"]  # the fixture, for pytest to find

TIMEOUT = 5.0

Result = tuple[list[bytes], "str | None"]


class RecordingTransport(StringTransport):
    """A transport that keeps each write apart, to count them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


@implementer(ITCPTransport)
class TCPTransport(RecordingTransport):
    """A transport that says it is TCP, and remembers its Nagle setting."""

    noDelay = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.noDelay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.noDelay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def loseWriteConnection(self) -> None:
        pass


def makeServer(clock: Clock) -> _Server:
    return _Server(
        "127.0.0.1",
        1,
        cast(IStreamClientEndpoint, object()),
        clock,
        1,
        TIMEOUT,
        lambda n: 30.0,
        Logger(),
    )


def connect(server: _Server, transport: StringTransport | None = None) -> _KestrelProtocol:
    proto = _KestrelProtocol(server, TIMEOUT)
    proto.makeConnection(transport or RecordingTransport())
    return proto


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(clock: Clock) -> _Server:
    return makeServer(clock)


def store(server: _Server, items: list[bytes], queue: bytes = b"events") -> Deferred[Result]:
    return Deferred.fromCoroutine(server.store(queue, items))


def result(d: Deferred[Result]) -> Result:
    results: list[Result] = []
    d.addCallback(results.append)
    assert results, "the store has not settled"
    return results[0]


def settled(d: Deferred[Any]) -> bool:
    return bool(d.called)


def test_oneWritePerBatch(server: _Server) -> None:
    """
    A batch goes out as one write holding every C{set}; the length prefix
    frames each item, so CR LF or an answer-like text inside one is data.
    """
    proto = connect(server)
    items = [b"abc", b'{"e":"\\r\\n"}', b"x\r\nSTORED\r\n", b"\x00\xff"]
    d = store(server, items)
    assert proto.transport.writes == [  # type: ignore[union-attr]
        b"set events 0 0 3\r\nabc\r\n"
        b'set events 0 0 12\r\n{"e":"\\r\\n"}\r\n'
        b"set events 0 0 11\r\nx\r\nSTORED\r\n\r\n"
        b"set events 0 0 2\r\n\x00\xff\r\n"
    ]
    assert not settled(d)
    proto.dataReceived(b"STORED\r\n" * 4)
    assert result(d) == ([], None)
    assert server.status()["stored"] == 4


def test_answersSplitAnywhere(server: _Server) -> None:
    """
    Answers arrive in whatever TCP chunks: fed one byte at a time, the batch
    settles on the last byte of its last answer, and not before.
    """
    proto = connect(server)
    d = store(server, [b"1", b"2", b"3"])
    answers = b"STORED\r\nNOT_STORED\r\nSTORED\r\n"
    for n in range(len(answers) - 1):
        proto.dataReceived(answers[n : n + 1])
        assert not settled(d), f"settled after {answers[: n + 1]!r}"
    proto.dataReceived(answers[-1:])
    assert result(d) == ([b"2"], "NOT_STORED")


def test_notStoredInTheMiddle(server: _Server) -> None:
    """
    C{NOT_STORED} refuses exactly the item it answers: the refused items
    are reported in order, the rest count as stored, the server stays up.
    """
    proto = connect(server)
    items = [b"0", b"1", b"2", b"3", b"4"]
    d = store(server, items)
    proto.dataReceived(b"STORED\r\nNOT_STORED\r\nSTORED\r\nNOT_STORED\r\nSTORED\r\n")
    assert result(d) == ([b"1", b"3"], "NOT_STORED")
    status = server.status()
    assert (status["stored"], status["refused"], status["failures"]) == (3, 2, 0)
    assert server.healthy()
    assert not proto.transport.disconnecting  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "answer, reason",
    [
        (b"CLIENT_ERROR bad data chunk", "ClientError: bad data chunk"),
        (b"ERROR", "NoSuchCommand"),
        (b"VALUE events 0 1", "UnexpectedReply"),
    ],
)
def test_errorMidBatch(server: _Server, answer: bytes, reason: str) -> None:
    """
    After an answer that may be out of step, nothing later on the
    connection can be matched to its C{set}: the answers before it count,
    every other pending item of this batch and the next is reported
    unstored, the connection is aborted and the server sits out its backoff.
    """
    proto = connect(server)
    first = store(server, [b"0", b"1", b"2", b"3"])
    second = store(server, [b"4", b"5"])
    proto.dataReceived(b"STORED\r\nNOT_STORED\r\n" + answer + b"\r\nSTORED\r\nSTORED\r\n")
    unstored, why = result(first)
    assert unstored == [b"1", b"2", b"3"]
    assert why is not None and why.startswith(reason)
    assert result(second)[0] == [b"4", b"5"]
    assert proto.transport.disconnected  # type: ignore[union-attr]
    status = server.status()
    assert (status["stored"], status["refused"], status["failures"]) == (1, 1, 2)
    assert not server.healthy()
    assert reason.split(":")[0] in status["reason"]


def test_serverErrorMidBatch(server: _Server) -> None:
    """
    C{SERVER_ERROR} fails its item and the server, but the stream stays in
    step (memcached goes on storing the next C{set}s): the answers after it
    still count, and the batch reports exactly the items not stored.
    """
    proto = connect(server)
    d = store(server, [b"0", b"1", b"2", b"3"])
    proto.dataReceived(b"STORED\r\nSERVER_ERROR object too large for cache\r\nSTORED\r\n")
    assert not settled(d)
    proto.dataReceived(b"NOT_STORED\r\n")
    unstored, why = result(d)
    assert unstored == [b"1", b"3"]
    assert why == "ServerError: object too large for cache"
    status = server.status()
    assert (status["stored"], status["refused"], status["failures"]) == (2, 1, 1)
    assert not server.healthy()


def test_serverErrorThenHangUp(server: _Server) -> None:
    """
    Kestrel hangs up after C{SERVER_ERROR}: the rest of the batch is
    unstored, and the server error, not the hang-up, is the reason given.
    """
    proto = connect(server)
    d = store(server, [b"0", b"1", b"2"])
    proto.dataReceived(b"SERVER_ERROR Server is read-only\r\n")
    proto.connectionLost(Failure(ConnectionLost("gone")))
    assert result(d) == ([b"0", b"1", b"2"], "ServerError: Server is read-only")
    assert "ServerError" in server.status()["reason"]


def test_timeoutWithPartialAnswers(server: _Server, clock: Clock) -> None:
    """
    The timeout counts from the last answer, not from the write: a batch
    that is being answered, however slowly, is not cut off; one that stops
    being answered for the timeout fails from its first unanswered item.
    """
    proto = connect(server)
    d = store(server, [b"0", b"1", b"2"])
    clock.advance(TIMEOUT - 1)
    proto.dataReceived(b"STORED\r\n")
    clock.advance(TIMEOUT - 1)
    assert not settled(d)
    assert not proto.transport.disconnecting  # type: ignore[union-attr]
    clock.advance(1)
    unstored, why = result(d)
    assert unstored == [b"1", b"2"]
    assert why is not None and why.startswith("TimeoutError")
    assert proto.transport.disconnected  # type: ignore[union-attr]
    assert not server.healthy()


def test_noTimerWhenIdle(server: _Server, clock: Clock) -> None:
    """
    Once everything is answered no timer is left: an idle connection never
    times out.
    """
    proto = connect(server)
    d = store(server, [b"0", b"1"])
    assert len(clock.getDelayedCalls()) == 1
    proto.dataReceived(b"STORED\r\nSTORED\r\n")
    assert result(d) == ([], None)
    assert clock.getDelayedCalls() == []


def test_storeFromAnAnswer(server: _Server, clock: Clock) -> None:
    """
    A batch stored from the callback of the batch just answered (the next
    put of the same caller) is timed by one timer, not by a stale one too.
    """
    proto = connect(server)
    later: list[Deferred[Result]] = []
    first = store(server, [b"0"])
    first.addCallback(lambda _: later.append(store(server, [b"1"])))
    proto.dataReceived(b"STORED\r\n")
    assert len(later) == 1
    assert len(clock.getDelayedCalls()) == 1
    proto.dataReceived(b"STORED\r\n")
    assert result(later[0]) == ([], None)
    assert clock.getDelayedCalls() == []


def test_pipelinedBatches(server: _Server) -> None:
    """
    Two batches written back to back share the answer stream: the answers
    are counted against the first until it is complete, then the second,
    even when one chunk straddles them.
    """
    proto = connect(server)
    first = store(server, [b"a", b"b"])
    second = store(server, [b"c", b"d", b"e"])
    assert len(proto.transport.writes) == 2  # type: ignore[union-attr]
    proto.dataReceived(b"STORED\r\nSTORED\r\nNOT_")
    assert result(first) == ([], None)
    assert not settled(second)
    proto.dataReceived(b"STORED\r\nSTORED\r\nSTORED\r\n")
    assert result(second) == ([b"c"], "NOT_STORED")


def test_connectionLostFailsPending(server: _Server) -> None:
    """
    A lost connection fails every pending batch from its first unanswered
    item, and the connection leaves the pool.
    """
    proto = connect(server)
    first = store(server, [b"a", b"b", b"c"])
    second = store(server, [b"d"])
    proto.dataReceived(b"STORED\r\n")
    proto.connectionLost(Failure(ConnectionLost("gone")))
    assert result(first)[0] == [b"b", b"c"]
    unstored, why = result(second)
    assert unstored == [b"d"]
    assert why is not None and why.startswith("ConnectionLost")
    assert server.status()["connections"] == 0
    assert server.status()["stored"] == 1


def test_leastBusyConnection(server: _Server) -> None:
    """
    A batch goes to the connection with the fewest unanswered items.
    """
    busy = connect(server)
    idle = connect(server)
    store(server, [b"a", b"b"])
    assert (len(busy.transport.writes), len(idle.transport.writes)) == (1, 0)  # type: ignore[union-attr]
    store(server, [b"c"])
    assert (len(busy.transport.writes), len(idle.transport.writes)) == (1, 1)  # type: ignore[union-attr]
    assert (busy.pending, idle.pending) == (2, 1)


def test_answerToNothing(server: _Server) -> None:
    """
    An answer when nothing is pending means the stream is out of step: the
    connection is dropped and leaves the pool at once.
    """
    proto = connect(server)
    proto.dataReceived(b"STORED\r\n")
    assert proto.transport.disconnected  # type: ignore[union-attr]
    assert server.status()["connections"] == 0
    unstored, why = result(store(server, [b"a"]))
    assert (unstored, why) == ([b"a"], "not connected")


def test_overlongLine(server: _Server) -> None:
    """An answer line that never ends is not buffered without bound."""
    proto = connect(server)
    d = store(server, [b"a"])
    proto.dataReceived(b"S" * 1000)
    assert not settled(d)
    proto.dataReceived(b"S" * 100)
    assert result(d)[0] == [b"a"]
    assert proto.transport.disconnected  # type: ignore[union-attr]


def test_noDelay(server: _Server) -> None:
    """
    Nagle's algorithm is off on a TCP connection: it would hold back a
    batch written while the previous one is unacknowledged.
    """
    transport = TCPTransport()
    connect(server, transport)
    assert transport.noDelay is True


@pytest_twisted.ensureDeferred
async def test_memcachedFramesByLength(memcachedServer: MemcachedServer) -> None:
    """
    A real memcache server reads each item by its length: an item holding
    CR LF and answer-like text is stored whole, and a too-large item's
    C{SERVER_ERROR} fails that item alone (memcached stores the next).
    """
    queue = makeKestrelQueue((memcachedServer.host, memcachedServer.port))
    queue.startService()
    try:
        await waitUntil(queue.ready, what="memcached connected")
        tricky = b"a\r\nSTORED\r\nset events 0 0 1\r\nb"
        await queue.put("events", [b"x", tricky])
        assert memcachedServer.get("events") == tricky
        with pytest.raises(QueueUnavailable, match=r"1 items not stored.*ServerError"):
            await queue.put("big", [b"1", b"y" * 2_000_000, b"3"])
        assert memcachedServer.get("big") == b"3"
        assert queue.status()["servers"][0]["stored"] == 4
    finally:
        await queue.stopService()
