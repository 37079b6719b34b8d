"""
Tests for exactly-once delivery into Redis: the Lua scripts of
L{mixingest.queues.redis_scripts}, writes in doubt and their fence in
L{mixingest.queues.redis.RedisQueue}, the durability options, and a real
C{redis-server} frozen under load behind store-and-forward.
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.protocols.portforward import ProxyFactory
from twisted.python.failure import Failure

from mixingest.errors import InDoubt, QueueUnavailable
from mixingest.journal import Journal
from mixingest.queues import redis_scripts as scripts
from mixingest.queues.base import ResolvableQueue
from mixingest.queues.forwarding import ForwardingQueue
from mixingest.queues.redis import RedisQueue
from mixingest.queues.urls import makeQueue, parseQueueURL
from tests.servers import (
    RedisServer,
    redisServer,
    startRedis,
    waitAOFRedisBinary,
    waitUntil,
)

__all__ = ["redisServer"]  # the fixture, for pytest to find

STALL = 1.5
"""Seconds the server is frozen in the stall tests: three write timeouts."""


def makeQueueOn(host: str, port: int, **kwargs: Any) -> RedisQueue:
    kwargs.setdefault("writeTimeout", 1.0)
    kwargs.setdefault("reconnectInitialDelay", 0.05)
    kwargs.setdefault("reconnectMaxDelay", 0.2)
    endpoint = HostnameEndpoint(reactor, host, port, timeout=2)
    return RedisQueue(endpoint, reactor, address=f"test:{port}", **kwargs)


async def started(queue: RedisQueue) -> RedisQueue:
    queue.startService()
    await waitUntil(queue.ready, what="a Redis connection")
    return queue


@pytest_twisted.async_yield_fixture
async def redisQueue(redisServer: RedisServer) -> AsyncIterator[RedisQueue]:
    queue = await started(makeQueueOn(redisServer.host, redisServer.port, prefix="mx:"))
    yield queue
    await queue.stopService()


class Proxy:
    """
    A TCP forwarder in front of Redis, as any intermediary (a proxy, a TLS
    terminator, a NAT) can be: when the client aborts its connection, the
    proxy closes its own to Redis in order, after the bytes already sent.

    It makes the stall tests deterministic.  Without it, a client that
    aborts (RST) a connection to a frozen Linux server makes the kernel drop
    the commands the server had not yet read, so a late write happens only
    when the freeze lands after Redis read a command and before it answered
    (likely under load with C{appendfsync always}, as on the real daemon,
    but not certain).
    """

    def __init__(self, server: RedisServer) -> None:
        self.port = reactor.listenTCP(  # type: ignore[attr-defined]
            0, ProxyFactory(server.host, server.port), interface="127.0.0.1"
        )

    @property
    def number(self) -> int:
        return int(self.port.getHost().port)

    def close(self) -> Any:
        return self.port.stopListening()


@pytest.fixture
def proxy(redisServer: RedisServer) -> Iterator[Proxy]:
    p = Proxy(redisServer)
    try:
        yield p
    finally:
        p.close()


def lateCommand(queue: RedisQueue, name: str, items: list[bytes], first: int) -> list[Any]:
    """The push script's C{EVAL} for a direct batch, as the queue sent it."""
    args = scripts.pushArgs(queue.prefix, name, queue.runId, 3600, items, first=first)
    return ["EVAL", scripts.PUSH, 3, *args]


def test_isResolvable() -> None:
    queue = RedisQueue(HostnameEndpoint(reactor, "127.0.0.1", 1), reactor, address="test")
    assert isinstance(queue, ResolvableQueue)


# -- the scripts


@pytest_twisted.ensureDeferred
async def test_directBatchStoredOnce(redisServer: RedisServer, redisQueue: RedisQueue) -> None:
    """
    A direct batch that reaches Redis a second time (a late command, a
    resend) adds nothing: its numbers are not above the mark.
    """
    await redisQueue.put("events", [b"a", b"b"])
    assert redisServer.command(*lateCommand(redisQueue, "events", [b"a", b"b"], 1)) == 0
    await redisQueue.put("events", [b"c"])
    assert redisServer.items("mx:events") == [b"a", b"b", b"c"]
    mark = f"mx:mixingest:hwm:{redisQueue.runId}:events"
    assert redisServer.command("GET", mark) == b"3"
    ttl = redisServer.command("TTL", mark)
    assert isinstance(ttl, int) and 7 * 24 * 3600 - 60 < ttl <= 7 * 24 * 3600
    status = redisQueue.status()
    assert (status["stored"], status["duplicatesSkipped"]) == (3, 0)
    assert len(status["runId"]) == 16


@pytest_twisted.ensureDeferred
async def test_journaledResendAddsOnlyTheTail(
    redisServer: RedisServer, redisQueue: RedisQueue
) -> None:
    """
    A journal batch resent after a crash is stored once, and a longer
    resend (more was journaled meanwhile) adds only its new tail; journal
    numbers need not be consecutive.
    """
    await redisQueue.putJournaled("events", [b"a", b"b"], "j1", [10, 12])
    await redisQueue.putJournaled("events", [b"a", b"b", b"c", b"d"], "j1", [10, 12, 13, 20])
    await redisQueue.putJournaled("events", [b"b", b"c"], "j1", [12, 13])
    assert redisServer.items("mx:events") == [b"a", b"b", b"c", b"d"]
    assert redisServer.command("GET", "mx:mixingest:hwm:j1:events") == b"20"
    status = redisQueue.status()
    assert (status["stored"], status["duplicatesSkipped"]) == (4, 4)
    with pytest.raises(ValueError, match="2 items but 1 sequence numbers"):
        await redisQueue.putJournaled("events", [b"x", b"y"], "j1", [30])


@pytest_twisted.ensureDeferred
async def test_marksPerProducerAndList(redisServer: RedisServer, redisQueue: RedisQueue) -> None:
    await redisQueue.putJournaled("events", [b"j1"], "j1", [5])
    await redisQueue.putJournaled("events", [b"j2"], "j2", [5])
    await redisQueue.putJournaled("people", [b"j1p"], "j1", [5])
    await redisQueue.put("events", [b"direct"])
    await redisQueue.putJournaled("events", [b"j1 again"], "j1", [5])
    assert redisServer.items("mx:events") == [b"j1", b"j2", b"direct"]
    assert redisServer.items("mx:people") == [b"j1p"]


@pytest_twisted.ensureDeferred
async def test_bigBatchesInChunks(redisServer: RedisServer, redisQueue: RedisQueue) -> None:
    """
    Lua's C{unpack} takes about 8000 values: the script pushes in chunks.
    """
    items = [b"%d" % i for i in range(20000)]
    await redisQueue.put("events", items)
    await redisQueue.putJournaled("people", items, "j1", list(range(20000)))
    more = items + [b"%d" % i for i in range(20000, 25000)]
    await redisQueue.putJournaled("people", more, "j1", list(range(25000)))
    assert redisServer.command("LLEN", "mx:events") == 20000
    assert redisServer.items("mx:people") == more


@pytest_twisted.ensureDeferred
async def test_scriptReloaded(redisServer: RedisServer, redisQueue: RedisQueue) -> None:
    """
    A server that lost its script cache (flushed, restarted behind a proxy,
    failed over) is sent the script again.
    """
    await redisQueue.put("events", [b"1"])
    redisServer.command("SCRIPT", "FLUSH")
    await redisQueue.put("events", [b"2"])
    assert redisServer.items("mx:events") == [b"1", b"2"]


@pytest_twisted.ensureDeferred
async def test_tcpNoDelay(redisQueue: RedisQueue) -> None:
    """Nagle's algorithm would hold each small command back for an ACK."""
    for conn in redisQueue._factory.pool:
        handle = conn.transport.getHandle()
        assert handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# -- failures


def recorder(order: list[tuple[str, type | None]], name: str) -> Any:
    def record(result: object) -> None:
        order.append((name, type(result.value) if isinstance(result, Failure) else None))

    return record


@pytest_twisted.ensureDeferred
async def test_errorAnswerIsNotInDoubt(redisServer: RedisServer, redisQueue: RedisQueue) -> None:
    """
    Redis refusing a write (out of memory) stored nothing: a plain failure,
    the puts that waited behind it fail after it, and the list is not
    blocked.
    """
    await redisQueue.put("events", [b"before"])
    redisServer.command("CONFIG", "SET", "maxmemory", "1")
    try:
        order: list[tuple[str, type | None]] = []
        puts = [redisQueue.put("events", [name.encode()]) for name in "ABC"]
        for name, d in zip("ABC", puts):
            d.addBoth(recorder(order, name))
        await gatherResults(puts)
    finally:
        redisServer.command("CONFIG", "SET", "maxmemory", "0")
    assert order == [("A", QueueUnavailable), ("B", QueueUnavailable), ("C", QueueUnavailable)]
    await redisQueue.put("events", [b"after"])
    assert redisServer.items("mx:events") == [b"before", b"after"]
    assert redisQueue.status()["inDoubt"] == []


@pytest_twisted.ensureDeferred
async def test_inDoubtFencedAndResolved(redisServer: RedisServer) -> None:
    """
    A write that Redis does not answer in time fails in doubt, the puts
    waiting behind it fail after it, and the list takes no put until a
    fence settled the write.  C{resolve} gives the fence's answer, always
    the same, also from a later run; and the late command, if it ever
    comes, adds nothing.
    """
    queue = await started(makeQueueOn(redisServer.host, redisServer.port, writeTimeout=0.3))
    try:
        await queue.put("events", [b"before"])
        order: list[tuple[str, type | None]] = []
        failures: dict[str, Failure] = {}
        redisServer.pause()
        try:
            puts = [queue.put("events", [name.encode()]) for name in "ABC"]
            for name, d in zip("ABC", puts):
                d.addErrback(lambda f, name=name: failures.setdefault(name, f))
                d.addBoth(recorder(order, name))
            await gatherResults(puts)
            with pytest.raises(QueueUnavailable, match="in doubt"):
                await queue.put("events", [b"D"])
            with pytest.raises(QueueUnavailable, match="in doubt"):
                await queue.putJournaled("events", [b"D"], "j1", [1])
            assert queue.status()["inDoubt"] == ["events"]
        finally:
            redisServer.resume()
        assert order == [("A", InDoubt), ("B", QueueUnavailable), ("C", QueueUnavailable)]
        marker = failures["A"].value.marker
        await waitUntil(lambda: not queue.status()["inDoubt"], what="the fence")
        status = queue.status()
        stored = b"A" in redisServer.items("events")
        assert (status["foundStored"], status["fenced"]) == ((1, 0) if stored else (0, 1))
        assert await queue.resolve("events", marker) is stored
        assert await queue.resolve("events", marker) is stored
        late = lateCommand(queue, "events", [b"A"], json.loads(marker)["seq"])
        assert redisServer.command(*late) == 0
        await queue.put("events", [b"E"])
        assert redisServer.items("events") == [b"before", *([b"A"] if stored else []), b"E"]
    finally:
        await queue.stopService()
    later = await started(makeQueueOn(redisServer.host, redisServer.port))
    try:
        assert await later.resolve("events", marker) is stored
        with pytest.raises(ValueError, match="marker is for queue 'events'"):
            await later.resolve("people", marker)
    finally:
        await later.stopService()


@pytest_twisted.ensureDeferred
async def test_lateCommandFencedOff(redisServer: RedisServer, proxy: Proxy) -> None:
    """
    Through a proxy, the command that timed out does reach Redis once it
    thaws: whether it lands before or after the fence, the batch is in the
    list at most once and the answer matches the list.
    """
    queue = await started(makeQueueOn("127.0.0.1", proxy.number, writeTimeout=0.3, poolSize=1))
    try:
        await queue.put("events", [b"before"])
        redisServer.pause()
        try:
            with pytest.raises(InDoubt) as e:
                await queue.put("events", [b"A"])
            await deferLater(reactor, 0.2)
        finally:
            redisServer.resume()
        await waitUntil(lambda: not queue.status()["inDoubt"], what="the fence")
        stored = await queue.resolve("events", e.value.marker)
        await queue.put("events", [b"E"])
        assert redisServer.items("events") == [b"before", *([b"A"] if stored else []), b"E"]
    finally:
        await queue.stopService()


# -- durability options


@pytest_twisted.ensureDeferred
async def test_replicasAcknowledge(redisServer: RedisServer, tmp_path: Path) -> None:
    """
    With C{replicas=1}, every acknowledged write is on the replica: each is
    followed by C{WAIT 1} on its connection.
    """
    replica = startRedis(tmp_path / "replica", replicaOf=redisServer)
    queue = await started(makeQueueOn(redisServer.host, redisServer.port, replicas=1))
    try:
        waits = redisServer.commandCalls("wait")
        for i in range(5):
            await queue.put("events", [b"%d" % i])
            assert replica.items("events") == [b"%d" % j for j in range(i + 1)]
        assert redisServer.commandCalls("wait") == waits + 5
    finally:
        await queue.stopService()
        replica.stop()


@pytest_twisted.ensureDeferred
async def test_replicasMissing(redisServer: RedisServer, tmp_path: Path) -> None:
    """
    With no replica to acknowledge it, a write is in doubt (it is on the
    primary only), and it stays in doubt until a replica has it: a fence
    that called it stored from the primary's memory would have its
    journaled copy skipped while the batch is on one machine only.  Once a
    replica is there, the fence settles it as stored.
    """
    queue = await started(
        makeQueueOn(redisServer.host, redisServer.port, replicas=1, writeTimeout=0.2)
    )
    replica = None
    try:
        with pytest.raises(InDoubt, match="0 of 1 replicas") as e:
            await queue.put("events", [b"x"])
        with pytest.raises(QueueUnavailable, match="0 of 1 replicas"):
            await queue.resolve("events", e.value.marker)
        assert queue.status()["inDoubt"]
        replica = startRedis(tmp_path / "replica", replicaOf=redisServer)
        # The fence retries by itself; it succeeds once the replica has
        # acknowledged (not at once: the link may be up before that).
        await waitUntil(lambda: not queue.status()["inDoubt"], timeout=30, what="the fence")
        assert queue.status()["foundStored"] == 1
        assert replica.items("events") == [b"x"]
    finally:
        await queue.stopService()
        if replica is not None:
            replica.stop()


def serverVersion(server: RedisServer) -> tuple[int, ...]:
    info = server.command("INFO", "server")
    assert isinstance(info, bytes)
    for line in info.decode().splitlines():
        if line.startswith("redis_version:"):
            return tuple(int(x) for x in line.split(":")[1].split(".")[:2])
    raise AssertionError("no redis_version")


@pytest_twisted.ensureDeferred
async def test_waitAOFNeeds72(redisServer: RedisServer) -> None:
    """
    C{?wait=aof} on a server without C{WAITAOF} is refused loudly: one
    error in the log, puts fail naming the version, the queue is not ready.
    """
    if serverVersion(redisServer) >= (7, 2):
        pytest.skip("this redis-server has WAITAOF: see test_waitAOF")
    errors: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.error:
            errors.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    queue = makeQueueOn(redisServer.host, redisServer.port, waitAOF=True)
    queue.startService()
    try:
        await waitUntil(lambda: queue.status()["state"] == "unsupported", what="the version")
        await waitUntil(lambda: queue.status()["connections"] == 2, what="both connections")
        assert not queue.ready()
        with pytest.raises(QueueUnavailable, match=r"needs Redis 7\.2 .* Redis 7\.0"):
            await queue.put("events", [b"x"])
        assert redisServer.items("events") == []
        assert len([e for e in errors if "WAITAOF" in e]) == 1
    finally:
        globalLogPublisher.removeObserver(observe)
        await queue.stopService()


@pytest.fixture
def waitAOFRedis(tmp_path: Path) -> Iterator[RedisServer]:
    """
    A running C{redis-server} 7.2 or later, with Redis's default fsync
    policy (C{everysec}): C{WAITAOF} is what makes a write durable there.
    """
    server = RedisServer(waitAOFRedisBinary(), tmp_path / "redis-waitaof", appendfsync="everysec")
    server.directory.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_waitAOF(waitAOFRedis: RedisServer) -> None:
    """
    With C{?wait=aof} a put is acknowledged after C{WAITAOF} on the
    connection that wrote it (what it proves against a power cut:
    tests/test_redis_power_loss.py).  Under C{everysec} C{WAITAOF} waits
    for Redis's next fsync, up to a second: the write timeout must leave
    it that long.
    """
    assert serverVersion(waitAOFRedis) >= (7, 2)
    queue = await started(
        makeQueueOn(waitAOFRedis.host, waitAOFRedis.port, waitAOF=True, writeTimeout=3.0)
    )
    try:
        await queue.put("events", [b"x", b"y"])
        await queue.put("events", [b"z"])
        assert waitAOFRedis.commandCalls("waitaof") == 2
        assert waitAOFRedis.items("events") == [b"x", b"y", b"z"]
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_waitAOFWithoutAppendonly(waitAOFRedis: RedisServer) -> None:
    """
    A server whose append-only file is off cannot fsync anything:
    C{WAITAOF} fails, so the put is not acknowledged (in doubt: the items
    are in memory only) and the configuration error is logged once.  The
    fence cannot settle it either: finding the batch in Redis's memory is
    not finding it stored, since its journaled copy would then be skipped.
    The control: without C{?wait=aof} the same server acknowledges the put.
    """
    waitAOFRedis.command("CONFIG", "SET", "appendonly", "no")
    errors: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") == LogLevel.error:
            errors.append(formatEvent(event))

    plain = await started(makeQueueOn(waitAOFRedis.host, waitAOFRedis.port))
    try:
        await plain.put("plain", [b"acknowledged, not durable"])
    finally:
        await plain.stopService()
    globalLogPublisher.addObserver(observe)
    queue = await started(makeQueueOn(waitAOFRedis.host, waitAOFRedis.port, waitAOF=True))
    try:
        with pytest.raises(InDoubt, match="WAITAOF failed"):
            await queue.put("events", [b"x"])
        assert waitAOFRedis.items("events") == [b"x"]
        # The put's WAITAOF, then at least two fences' (each retried).
        await waitUntil(lambda: waitAOFRedis.commandCalls("waitaof") >= 3, what="the fences")
        status = queue.status()
        assert (status["foundStored"], status["fenced"]) == (0, 0)
        assert len(status["inDoubt"]) == 1
        with pytest.raises(QueueUnavailable, match="in doubt"):
            await queue.put("events", [b"y"])
        assert len([e for e in errors if "WAITAOF failed" in e]) == 1, errors
    finally:
        globalLogPublisher.removeObserver(observe)
        await queue.stopService()


# -- a frozen Redis under load, behind store-and-forward


def event(producer: str, n: int) -> bytes:
    return json.dumps({"p": producer, "n": n}).encode()


async def produceThroughStall(
    queue: ForwardingQueue, server: RedisServer, lists: tuple[str, ...], perList: int
) -> dict[str, dict[str, list[bytes]]]:
    """
    C{perList} producers per list put numbered events one batch at a time,
    each waiting for its acknowledgement, while the server is frozen for
    L{STALL} seconds, then a little longer.

    @return: the acknowledged events per list, per producer, in order.
    """
    acked: dict[str, dict[str, list[bytes]]] = {
        name: {f"{name}-{i}": [] for i in range(perList)} for name in lists
    }
    done = False

    async def produce(name: str, producer: str) -> None:
        n = 0
        while not done:
            batch = [event(producer, n + i) for i in range(1 + n % 3)]
            await queue.put(name, batch)
            acked[name][producer].extend(batch)
            n += len(batch)
            await deferLater(reactor, 0.005)

    producers = [
        Deferred.fromCoroutine(produce(name, producer))
        for name, byProducer in acked.items()
        for producer in byProducer
    ]
    await waitUntil(
        lambda: all(len(events) >= 10 for byP in acked.values() for events in byP.values()),
        what="events acknowledged before the stall",
    )
    server.pause()
    try:
        await deferLater(reactor, STALL)
    finally:
        server.resume()
    await deferLater(reactor, 0.5)
    done = True
    await gatherResults(producers)
    return acked


def assertExactlyOnce(server: RedisServer, acked: dict[str, dict[str, list[bytes]]]) -> None:
    for name, byProducer in acked.items():
        stored = server.items(name)
        counts = Counter(stored)
        duplicates = [item for item, count in counts.items() if count > 1]
        assert duplicates == [], f"{len(duplicates)} duplicated in {name}"
        for producer, events in byProducer.items():
            mine = [item for item in stored if json.loads(item)["p"] == producer]
            assert mine == events, (
                f"{producer}: stored {len(mine)} of {len(events)} or out of order"
            )
        assert len(stored) == sum(len(events) for events in byProducer.values())


@pytest.mark.parametrize("path", ["proxy", "direct"])
@pytest_twisted.ensureDeferred
async def test_stallExactlyOnce(
    redisServer: RedisServer, proxy: Proxy, tmp_path: Path, path: str
) -> None:
    """
    Redis frozen past the write timeout while six producers put events
    through store-and-forward, built as C{makeQueue} builds it: every
    acknowledged event is in Redis exactly once, each producer's in order.
    Writes in doubt are fenced or found stored; their journaled copies are
    skipped or forwarded accordingly.
    """
    port = proxy.number if path == "proxy" else redisServer.port
    journal = Journal(str(tmp_path / "journal"), reactor=reactor)
    queue = makeQueue(parseQueueURL(f"redis://127.0.0.1:{port}/0?timeout=0.5"), journal, reactor)
    assert isinstance(queue, ForwardingQueue)
    queue.startService()
    try:
        await waitUntil(queue.remote.ready, what="a Redis connection")
        acked = await produceThroughStall(queue, redisServer, ("events", "people"), 3)

        def forwarded() -> bool:
            status = queue.status()
            return not status["diverted"] and not status["remote"]["inDoubt"]

        try:
            await waitUntil(forwarded, timeout=30, what="the journal to be forwarded")
        except AssertionError as e:
            raise AssertionError(f"{e}; status: {json.dumps(queue.status())}") from None
        remote = queue.status()["remote"]
        assert remote["doubted"] >= 1, "the stall caught no write in flight"
        assert remote["fenced"] + remote["foundStored"] == remote["doubted"]
        assertExactlyOnce(redisServer, acked)
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_stallControl(redisServer: RedisServer, proxy: Proxy) -> None:
    """
    The control: with a plain C{RPUSH} that is sent again after its
    timeout, as before the scripts, the same stall stores a batch twice.
    """
    client = txredisapi.lazyConnection("127.0.0.1", proxy.number, replyTimeout=0.5)
    try:
        await client.rpush("events", "before")
        redisServer.pause()
        try:
            with pytest.raises(txredisapi.TimeoutError):
                await client.rpush("events", "A")
            await deferLater(reactor, STALL - 0.5)
        finally:
            redisServer.resume()
        deadline = time.monotonic() + 10
        while True:
            try:
                await client.rpush("events", "A")
                break
            except txredisapi.ConnectionError:
                assert time.monotonic() < deadline, "no reconnection"
                await deferLater(reactor, 0.05)
        await waitUntil(lambda: len(redisServer.items("events")) == 3, what="the late command")
        assert redisServer.items("events") == [b"before", b"A", b"A"]
    finally:
        await client.disconnect()
