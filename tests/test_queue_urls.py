"""
Tests for L{mixingest.queues.urls}: every accepted form of C{--queue}, and
a clear error for the rest.
"""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock

from mixingest.queues.forwarding import ForwardingQueue
from mixingest.queues.kestrel import KestrelQueue
from mixingest.queues.redis import RedisQueue
from mixingest.queues.urls import (
    JournalTarget,
    KestrelTarget,
    RedisTarget,
    makeQueue,
    parseQueueURL,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("", JournalTarget()),
        ("journal", JournalTarget()),
        (" journal ", JournalTarget()),
        ("redis://localhost:6379/0", RedisTarget(host="localhost", port=6379, db=0)),
        ("redis://10.0.0.5:7000/3", RedisTarget(host="10.0.0.5", port=7000, db=3)),
        ("redis://cache", RedisTarget(host="cache", port=6379, db=0)),
        ("redis://cache/", RedisTarget(host="cache", port=6379, db=0)),
        ("REDIS://cache:1/2", RedisTarget(host="cache", port=1, db=2)),
        ("redis://[::1]:6380/1", RedisTarget(host="::1", port=6380, db=1)),
        ("redis://:s3cret@h:1/0", RedisTarget(host="h", port=1, password="s3cret")),
        ("redis://:p%40ss@h:1/0", RedisTarget(host="h", port=1, password="p@ss")),
        ("redis://:a@b@h:1/0", RedisTarget(host="h", port=1, password="a@b")),
        ("redis://alice:pw@h:1/0", RedisTarget(host="h", port=1, username="alice", password="pw")),
        ("redis+unix:///run/redis.sock", RedisTarget(path="/run/redis.sock")),
        ("redis+unix:///run/redis.sock?db=4", RedisTarget(path="/run/redis.sock", db=4)),
        ("redis+unix://:pw@/run/r.sock?db=1", RedisTarget(path="/run/r.sock", db=1, password="pw")),
        ("redis://h:1/0?timeout=0.5", RedisTarget(host="h", port=1, timeout=0.5)),
        ("redis://h?ttl=86400", RedisTarget(host="h", ttl=86400)),
        ("redis://h/2?replicas=1", RedisTarget(host="h", db=2, replicas=1)),
        ("redis://h?replicas=0", RedisTarget(host="h")),
        ("redis://h?wait=aof", RedisTarget(host="h", waitAOF=True)),
        (
            "redis://:pw@h:1/3?timeout=2&ttl=60&replicas=2&wait=aof",
            RedisTarget(
                host="h", port=1, db=3, password="pw", timeout=2.0, ttl=60, replicas=2, waitAOF=True
            ),
        ),
        (
            "redis+unix:///r.sock?db=1&timeout=3&replicas=1",
            RedisTarget(path="/r.sock", db=1, timeout=3.0, replicas=1),
        ),
        ("kestrel://k1:22133", KestrelTarget((("k1", 22133),))),
        ("kestrel://k1", KestrelTarget((("k1", 22133),))),
        ("kestrel://k1/", KestrelTarget((("k1", 22133),))),
        (
            "kestrel://k1:1, k2 ,[::1]:3",
            KestrelTarget((("k1", 1), ("k2", 22133), ("::1", 3))),
        ),
    ],
)
def test_parse(url: str, expected: object) -> None:
    assert parseQueueURL(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h", "expected 'journal'"),
        ("redis", "expected 'journal'"),
        ("journal://x", "expected 'journal'"),
        ("redis://h:0/0", "port must be a number from 1 to 65535, not '0'"),
        ("redis://h:65536", "port must be a number from 1 to 65535"),
        ("redis://h:abc/0", "not 'abc'"),
        ("redis://h:/0", "port must be"),
        ("redis://h/x", "database must be a number, not 'x'"),
        ("redis://h/-1", "database must be a number"),
        ("redis:///0", "missing host"),
        ("redis://h/0?db=1", "unknown parameter(s) db"),
        ("redis://h/0#x", "unexpected fragment"),
        ("redis://user@h/0", ":PASSWORD@"),
        ("redis://::1:6379/0", "brackets"),
        ("redis://[::1/0", "IPv6"),
        ("redis+unix://host/run/r.sock", "has no host"),
        ("redis+unix://", "missing the absolute path"),
        ("redis+unix:///r.sock?db=x", "database must be a number"),
        ("redis+unix:///r.sock?db=1&db=2", "more than once"),
        ("redis+unix:///r.sock?tls=1", "unknown parameter(s) tls"),
        ("redis://h?timeout=0", "timeout must be a number of seconds above 0"),
        ("redis://h?timeout=-1", "timeout must be"),
        ("redis://h?timeout=nan", "timeout must be"),
        ("redis://h?timeout=inf", "timeout must be"),
        ("redis://h?timeout=", "not ''"),
        ("redis://h?timeout=1&timeout=2", "timeout given more than once"),
        ("redis://h?ttl=0", "ttl must be a whole number of seconds, at least 1"),
        ("redis://h?ttl=1.5", "ttl must be"),
        ("redis://h?replicas=-1", "replicas must be a whole number"),
        ("redis://h?replicas=x", "replicas must be"),
        ("redis://h?wait=fsync", "wait must be 'aof', not 'fsync'"),
        ("redis://h?wait=", "wait must be 'aof'"),
        ("kestrel://", "expected kestrel://HOST"),
        ("kestrel://k1/events", "nothing else"),
        ("kestrel://k1,,k2", "missing host"),
        ("kestrel://k1:1,k1:1", "listed twice"),
        ("kestrel://k1:99999", "port must be"),
        ("kestrel://u:p@k1", "nothing else"),
    ],
)
def test_parseErrors(url: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parseQueueURL(url)
    assert message in str(e.value)
    assert str(e.value).startswith("--queue ")


def test_passwordNotInErrors() -> None:
    """
    An error message may be logged or shown on a terminal: it names the URL
    but never the password.
    """
    with pytest.raises(ValueError) as e:
        parseQueueURL("redis://:hunter2@h:0/0")
    assert "hunter2" not in str(e.value)
    assert "***" in str(e.value)


def test_passwordNotInOptionErrors() -> None:
    with pytest.raises(ValueError) as e:
        parseQueueURL("redis://:hunter2@h:1/0?timeout=never")
    assert "hunter2" not in str(e.value)
    assert "timeout must be" in str(e.value)


def test_passwordNotInRepr() -> None:
    target = parseQueueURL("redis://:hunter2@h:1/0")
    assert "hunter2" not in repr(target)
    assert isinstance(target, RedisTarget)
    assert "hunter2" not in target.address
    assert target.address == "redis://h:1/0"


class _Journal:
    """Stands in for the journal: L{makeQueue} only passes it along."""


def test_makeJournal() -> None:
    journal = _Journal()
    assert makeQueue(JournalTarget(), journal, MemoryReactorClock()) is journal  # type: ignore[arg-type]


def test_makeRedis() -> None:
    journal = _Journal()
    queue = makeQueue(
        parseQueueURL("redis://h:1/2"),
        journal,  # type: ignore[arg-type]
        MemoryReactorClock(),
        redisPrefix="mx:",
    )
    assert isinstance(queue, ForwardingQueue)
    assert queue.journal is journal
    assert isinstance(queue.remote, RedisQueue)
    assert queue.remote.prefix == "mx:"
    assert queue.remote.address == "redis://h:1/2"


def test_makeRedisOptions() -> None:
    """
    The URL's options reach the Redis queue; its timeout wins over the
    default write timeout.
    """
    url = "redis://h:1/0?timeout=0.25&ttl=3600&replicas=2&wait=aof"
    queue = makeQueue(parseQueueURL(url), _Journal(), MemoryReactorClock(), writeTimeout=9.0)  # type: ignore[arg-type]
    assert isinstance(queue, ForwardingQueue)
    assert isinstance(queue.remote, RedisQueue)
    status = queue.remote.status()
    assert (status["writeTimeout"], status["markTTL"], status["replicas"], status["waitAOF"]) == (
        0.25,
        3600,
        2,
        True,
    )
    plain = makeQueue(
        parseQueueURL("redis://h"), _Journal(), MemoryReactorClock(), writeTimeout=9.0
    )  # type: ignore[arg-type]
    assert isinstance(plain, ForwardingQueue)
    assert isinstance(plain.remote, RedisQueue)
    status = plain.remote.status()
    assert (status["writeTimeout"], status["markTTL"], status["replicas"], status["waitAOF"]) == (
        9.0,
        7 * 24 * 3600,
        0,
        False,
    )


def test_makeRedisUnix() -> None:
    queue = makeQueue(parseQueueURL("redis+unix:///r.sock?db=1"), _Journal(), MemoryReactorClock())  # type: ignore[arg-type]
    assert isinstance(queue, ForwardingQueue)
    assert isinstance(queue.remote, RedisQueue)
    assert queue.remote.address == "redis+unix:///r.sock?db=1"


def test_makeKestrel() -> None:
    queue = makeQueue(parseQueueURL("kestrel://a:1,b:2"), _Journal(), MemoryReactorClock())  # type: ignore[arg-type]
    assert isinstance(queue, ForwardingQueue)
    assert isinstance(queue.remote, KestrelQueue)
    assert [s["address"] for s in queue.remote.status()["servers"]] == ["a:1", "b:2"]


def test_redisPrefixWithKestrel() -> None:
    with pytest.raises(ValueError, match="redis-prefix"):
        makeQueue(parseQueueURL("kestrel://a"), _Journal(), MemoryReactorClock(), redisPrefix="x")  # type: ignore[arg-type]
