"""
Tests for L{mixingest.queues.redis.RedisQueue} against a real
C{redis-server}.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_twisted
import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher

from mixingest.errors import QueueUnavailable
from mixingest.queues import redis_scripts as scripts
from mixingest.queues.base import EventQueue
from mixingest.queues.redis import HEAD_CACHE, RedisQueue, _Protocol
from tests.servers import RedisServer, redisServer, startRedis, waitUntil

__all__ = ["redisServer"]  # the fixture, for pytest to find

SCRIPTS = Path(__file__).parent.parent / "scripts"


def makeRedisQueue(server: RedisServer, *, unix: bool = False, **kwargs: Any) -> RedisQueue:
    endpoint: Any
    if unix:
        endpoint = UNIXClientEndpoint(reactor, server.unixSocket, timeout=2)
    else:
        endpoint = HostnameEndpoint(reactor, server.host, server.port, timeout=2)
    kwargs.setdefault("writeTimeout", 1.0)
    kwargs.setdefault("reconnectInitialDelay", 0.05)
    kwargs.setdefault("reconnectMaxDelay", 0.2)
    return RedisQueue(endpoint, reactor, address=f"test:{server.port}", **kwargs)


@pytest_twisted.async_yield_fixture
async def redisQueue(redisServer: RedisServer) -> AsyncIterator[RedisQueue]:
    queue = makeRedisQueue(redisServer, prefix="mx:")
    queue.startService()
    await waitUntil(queue.ready, what="a Redis connection")
    yield queue
    await queue.stopService()


def test_isEventQueue() -> None:
    queue = RedisQueue(HostnameEndpoint(reactor, "127.0.0.1", 1), reactor, address="test")
    assert isinstance(queue, EventQueue)
    assert not queue.ready()
    assert queue.status()["state"] == "connecting"


@pytest_twisted.ensureDeferred
async def test_putAppendsInOrder(redisServer: RedisServer, redisQueue: RedisQueue) -> None:
    """
    Each queue is a list named prefix + queue, appended at the tail, so
    C{LPOP} reads the events in the order they were acknowledged; payloads
    are carried byte for byte.
    """
    await redisQueue.put("events", [b'{"event":"a"}', b'{"event":"b"}'])
    await redisQueue.put("events", [b'{"event":"\xc3\xa9"}'])
    await redisQueue.put("people", [b"\x00\xff\r\n"])
    await redisQueue.put("people", [])
    assert redisServer.items("mx:events") == [
        b'{"event":"a"}',
        b'{"event":"b"}',
        b'{"event":"\xc3\xa9"}',
    ]
    assert redisServer.items("mx:people") == [b"\x00\xff\r\n"]
    assert redisServer.command("LPOP", "mx:events") == b'{"event":"a"}'
    status = redisQueue.status()
    assert status["state"] == "up"
    assert status["healthy"] is True
    assert status["stored"] == 4
    assert status["failed"] == 0


@pytest_twisted.ensureDeferred
async def test_concurrentPutsShareCommands(redisServer: RedisServer) -> None:
    """
    Puts for a list that arrive while a write to it is in flight go out
    together in the next one (one script call), in arrival order, up to
    C{maxItemsPerCommand}.
    """
    queue = makeRedisQueue(redisServer, maxItemsPerCommand=50)
    queue.startService()
    try:
        await waitUntil(queue.ready, what="a Redis connection")
        redisServer.command("CONFIG", "RESETSTAT")
        await gatherResults([queue.put("events", [b"%d" % i]) for i in range(200)])
        assert redisServer.items("events") == [b"%d" % i for i in range(200)]
        # The first goes alone; the 199 that waited go as 50 + 50 + 50 + 49.
        assert redisServer.commandCalls("evalsha") == 5
        assert redisServer.commandCalls("rpush") == 5
    finally:
        await queue.stopService()


def encodingCases() -> list[tuple[object, ...]]:
    """Commands as mixingest sends them, and the argument types txredisapi takes."""
    items = [
        b'{"event":"\xc3\xa9t\xc3\xa9"}',
        b"\x00\xff\r\n$*",
        b"",
        b"x" * (HEAD_CACHE + 5),
        b"y" * 300,
        b"z" * 300,
    ]
    push = scripts.pushArgs("mx:", "évents", "run1", 60, items, first=7)
    journaled = scripts.pushArgs("", "q", "journal:1", 60, items[:2], seqs=[3, 9])
    return [
        ("EVALSHA", scripts.PUSH_SHA, 3, *push),
        ("EVAL", scripts.PUSH, 3, *journaled),
        ("SET", "ключ", 1.5, -7, bytearray(b"\x01\x02"), 2**64),
        ("PING",),
        (),
    ]


@pytest.mark.parametrize("args", encodingCases())
def test_commandEncodingAsTxredisapi(args: tuple[object, ...]) -> None:
    """
    The protocol's own command encoder builds exactly the bytes txredisapi
    builds for the same arguments: non-ASCII text, binary and empty items,
    lengths past the cache of length lines, numbers and bytearrays.
    """
    ours = _Protocol()
    theirs = txredisapi.RedisProtocol()
    assert ours._build_command(*args) == theirs._build_command(*args)
    assert ours._build_command(*args) == theirs._build_command(*args)  # cached lengths


def test_itemsSkipTheArgumentEncoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Items (bytes) go into the request as they are: only the other arguments
    pass through txredisapi's per-argument encoder, whose cost per item is
    what made a batch's write dear.
    """
    calls: list[object] = []
    encode = txredisapi.RedisProtocol._encode_value

    def counted(self: Any, arg: object) -> bytes:
        calls.append(arg)
        return encode(self, arg)

    monkeypatch.setattr(txredisapi.RedisProtocol, "_encode_value", counted)
    items = [b"%d" % i for i in range(50)]
    _Protocol()._build_command("EVALSHA", scripts.PUSH_SHA, 3, "k1", "k2", "k3", 60, 50, 1, *items)
    assert calls == ["EVALSHA", scripts.PUSH_SHA, 3, "k1", "k2", "k3", 60, 50, 1]


@pytest_twisted.ensureDeferred
async def test_itemsOfEverySizeStored(redisServer: RedisServer, redisQueue: RedisQueue) -> None:
    """Items around and past the cached length lines reach Redis byte for byte."""
    items = [bytes(range(256)) * (size // 256) + b"\xff" * (size % 256) for size in SIZES]
    await redisQueue.put("sizes", items)
    await redisQueue.put("sizes", items[::-1])
    assert redisServer.items("mx:sizes") == items + items[::-1]


SIZES = [0, 1, 9, 10, 99, 100, 300, HEAD_CACHE - 1, HEAD_CACHE, HEAD_CACHE + 1, 100_000]


@pytest_twisted.ensureDeferred
async def test_unixSocketAndDatabase(redisServer: RedisServer) -> None:
    queue = makeRedisQueue(redisServer, unix=True, dbid=3)
    queue.startService()
    try:
        await waitUntil(queue.ready, what="a Redis connection")
        await queue.put("events", [b"1", b"2"])
        assert redisServer.items("events", db=3) == [b"1", b"2"]
        assert redisServer.items("events") == []
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_password(tmp_path: Path) -> None:
    server = startRedis(tmp_path, password="s3cret")
    good = makeRedisQueue(server, password="s3cret")
    bad = makeRedisQueue(server, password="wrong")
    good.startService()
    bad.startService()
    try:
        await waitUntil(good.ready, what="an authenticated connection")
        await good.put("events", [b"x"])
        assert server.items("events") == [b"x"]
        await waitUntil(
            lambda: bad.status()["state"] == "refused", what="the bad password to be refused"
        )
        assert not bad.ready()
        with pytest.raises(QueueUnavailable, match="not connected"):
            await bad.put("events", [b"y"])
    finally:
        await good.stopService()
        await bad.stopService()
        server.stop()


@pytest_twisted.ensureDeferred
async def test_downFailsFastAndRecovers(redisServer: RedisServer, redisQueue: RedisQueue) -> None:
    """
    While Redis is down a put fails at once, not after a timeout (the
    store-and-forward layer is waiting to journal it); when Redis is back
    the pool reconnects by itself.
    """
    await redisQueue.put("events", [b"before"])
    redisServer.stop()
    await waitUntil(lambda: not redisQueue.ready(), what="the pool to notice")
    assert redisQueue.status()["state"] == "down"
    started = time.monotonic()
    with pytest.raises(QueueUnavailable, match="not connected"):
        await redisQueue.put("events", [b"lost"])
    assert time.monotonic() - started < 0.5  # the write timeout is 1 s
    redisServer.start()
    await waitUntil(redisQueue.ready, what="the pool to reconnect")
    assert redisQueue.status()["state"] == "up"
    await redisQueue.put("events", [b"after"])
    assert redisServer.items("mx:events") == [b"before", b"after"]
    assert redisQueue.status()["failed"] == 1


@pytest_twisted.ensureDeferred
async def test_writeTimeout(redisServer: RedisServer) -> None:
    """
    A Redis that accepts the command but does not answer (frozen) fails the
    put after the write timeout, and the pool reconnects once it answers.
    """
    queue = makeRedisQueue(redisServer, writeTimeout=0.3, poolSize=1)
    queue.startService()
    try:
        await waitUntil(queue.ready, what="a Redis connection")
        redisServer.pause()
        try:
            started = time.monotonic()
            with pytest.raises(QueueUnavailable):
                await queue.put("events", [b"late"])
            assert 0.25 < time.monotonic() - started < 2
        finally:
            redisServer.resume()
        await waitUntil(queue.ready, what="the pool to reconnect")
        # The frozen write was in doubt: the list takes writes again once it
        # is settled, which the queue does as soon as Redis answers.
        await waitUntil(lambda: not queue.status()["inDoubt"], what="the doubt settled")
        await queue.put("events", [b"fine"])
        assert redisServer.items("events")[-1] == b"fine"
    finally:
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_reconnectAfterSetupTimeout(redisServer: RedisServer) -> None:
    """
    A reconnection whose C{SELECT} times out (Redis still frozen) is retried:
    txredisapi alone would stop reconnecting for good, as after a wrong
    password.
    """
    messages: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        messages.append(formatEvent(event) or "")

    queue = makeRedisQueue(redisServer, writeTimeout=0.3, poolSize=1)
    queue.startService()
    globalLogPublisher.addObserver(observe)
    try:
        await waitUntil(queue.ready, what="a Redis connection")
        redisServer.pause()
        try:
            with pytest.raises(QueueUnavailable):
                await queue.put("events", [b"frozen"])
            await waitUntil(
                lambda: any("could not set dbid" in m for m in messages),
                what="a reconnection to time out in SELECT",
            )
        finally:
            redisServer.resume()
        await waitUntil(queue.ready, what="the pool to reconnect")
        # The frozen write was in doubt: the list takes writes again once it
        # is settled, which the queue does as soon as Redis answers.
        await waitUntil(lambda: not queue.status()["inDoubt"], what="the doubt settled")
        await queue.put("events", [b"fine"])
        assert queue.status()["state"] == "up"
    finally:
        globalLogPublisher.removeObserver(observe)
        await queue.stopService()


@pytest_twisted.ensureDeferred
async def test_stopFinishesAcceptedPuts(redisServer: RedisServer) -> None:
    """
    C{stopService} sends what was accepted before it, including puts that
    were waiting behind a write, and refuses what comes after.
    """
    queue = makeRedisQueue(redisServer)
    queue.startService()
    await waitUntil(queue.ready, what="a Redis connection")
    puts = [queue.put("events", [b"%d" % i]) for i in range(10)]
    stopped = queue.stopService()
    with pytest.raises(QueueUnavailable, match="stopping"):
        await queue.put("events", [b"late"])
    await gatherResults(puts)
    await stopped
    assert redisServer.items("events") == [b"%d" % i for i in range(10)]
    assert queue.status()["connections"] == 0


@pytest_twisted.ensureDeferred
async def test_consumerScript(redisServer: RedisServer) -> None:
    """
    C{scripts/consume-redis} handles what a previous run left in its
    processing list first, then the queue in order, and leaves both empty.
    """
    redisServer.command("RPUSH", "mx:events", b'{"n":1}', b'{"n":2}', b'{"n":3}')
    redisServer.command("RPUSH", "mx:events:processing:w1", b'{"n":0}')
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        [
            str(SCRIPTS / "consume-redis"),
            redisServer.url,
            "events",
            "--prefix=mx:",
            "--consumer=w1",
            "--wait=0.1",
            "--exit-when-empty",
        ],
        env=dict(os.environ),
    )
    assert code == 0, err
    assert out.splitlines() == [b'{"n":0}', b'{"n":1}', b'{"n":2}', b'{"n":3}']
    assert b"consumed 4 events" in err
    assert redisServer.items("mx:events") == []
    assert redisServer.items("mx:events:processing:w1") == []
