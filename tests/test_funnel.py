"""
The funnel in memory, on a Clock: routing, in-flight accounting, dedupe at
the door, per-token rate limits and counters, backpressure and the drain.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mixingest.cleaning import CleanItem
from mixingest.dedupe import RecentInsertIds
from mixingest.errors import Overloaded, QueueUnavailable, RateLimited
from mixingest.funnel import BACKLOG_POLL_INTERVAL, Funnel, backlogOf
from mixingest.ratelimit import RateLimiter


class HeldQueue:
    """
    Records every put; stores at once, or holds writes until released, or
    fails them, as the test says.
    """

    def __init__(self) -> None:
        self.puts: List[Tuple[str, List[bytes]]] = []
        self.held: List[Deferred[None]] = []
        self.hold = False
        self.failWith: Optional[Exception] = None
        self.isReady = True
        self.backlog: Any = {}

    def put(self, queue: str, items: Sequence[bytes]) -> Deferred[None]:
        self.puts.append((queue, list(items)))
        if self.failWith is not None:
            return fail(self.failWith)
        if self.hold:
            d: Deferred[None] = Deferred()
            self.held.append(d)
            return d
        return succeed(None)

    def release(self) -> None:
        held, self.held = self.held, []
        for d in held:
            d.callback(None)

    def stored(self, queue: str = "events") -> List[bytes]:
        return [item for name, items in self.puts if name == queue for item in items]

    def ready(self) -> bool:
        return self.isReady

    def status(self) -> Mapping[str, Any]:
        return {"backend": "double", "backlog": self.backlog}

    def startService(self) -> None:
        pass

    def stopService(self) -> None:
        pass


def item(token: str = "tok", insertId: Optional[str] = None, payload: bytes = b"{}") -> CleanItem:
    return CleanItem(token, insertId, payload)


def result(d: Deferred[Any]) -> Any:
    out: List[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


class Harness:
    def __init__(self, **kwargs: Any) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.queue = HeldQueue()
        self.funnel = Funnel(self.queue, self.clock, **kwargs)
        self.funnel.startService()

    def store(self, endpoint: str, *items: CleanItem) -> Deferred[None]:
        return self.funnel.store(endpoint, list(items))

    def sample(self, name: str, **labels: str) -> Optional[float]:
        return self.funnel.metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_routing() -> None:
    h = Harness(routes={"noisy": "noisy_events"})
    result(h.store("track", item("noisy", payload=b"n")))
    result(h.store("import", item("tok", payload=b"t")))
    result(h.store("engage", item("noisy", payload=b"p")))
    result(h.store("groups", item("noisy", payload=b"g")))
    assert h.queue.puts == [
        ("noisy_events", [b"n"]),
        ("events", [b"t"]),
        ("people", [b"p"]),
        ("groups", [b"g"]),
    ]


def test_mixedRequestSplitsByQueueKeepingOrder() -> None:
    h = Harness(routes={"noisy": "noisy_events"})
    result(
        h.store(
            "track", item("a", payload=b"1"), item("noisy", payload=b"2"), item("a", payload=b"3")
        )
    )
    assert sorted(h.queue.puts) == [("events", [b"1", b"3"]), ("noisy_events", [b"2"])]


def test_mixedRequestFailsIfAnyQueueFails() -> None:
    h = Harness(routes={"noisy": "noisy_events"})
    h.queue.hold = True
    d = h.store("track", item("a"), item("noisy"))
    h.queue.held[0].callback(None)
    h.queue.held[1].errback(QueueUnavailable("down"))
    with pytest.raises(QueueUnavailable):
        result(d)


def test_inFlightPerQueue(h: Harness) -> None:
    h.queue.hold = True
    h.store("track", item(payload=b"abc"), item(payload=b"de"))
    h.store("engage", item(payload=b"x"))
    status = h.funnel.status()
    assert status["in_flight"] == {"events": 3, "writes": 2, "limit": h.funnel.maxInFlight}
    assert status["queues"]["events"]["in_flight"] == {"requests": 1, "events": 2, "bytes": 5}
    assert status["queues"]["people"]["in_flight"] == {"requests": 1, "events": 1, "bytes": 1}
    h.queue.release()
    events = h.funnel.status()["queues"]["events"]
    assert events["in_flight"] == {"requests": 0, "events": 0, "bytes": 0}
    assert events["stored"] == {"requests": 1, "events": 2, "bytes": 5}
    assert h.sample("mixingest_events_stored_total", queue="events") == 2
    assert h.sample("mixingest_events_in_flight", queue="events") == 0


def test_failedWriteIsCountedAndPropagated(h: Harness) -> None:
    h.queue.failWith = QueueUnavailable("down")
    with pytest.raises(QueueUnavailable):
        result(h.store("track", item(), item()))
    assert h.funnel.status()["queues"]["events"]["failed"] == {"requests": 1, "events": 2}
    assert h.funnel.status()["tokens"]["tok"]["1m"] == {"events": 0, "bytes": 0, "rejects": 2}
    assert h.funnel.eventsInFlight == 0


def test_writeLatencyObserved(h: Harness) -> None:
    h.queue.hold = True
    h.store("track", item())
    h.clock.advance(0.2)
    h.queue.release()
    assert h.sample("mixingest_queue_write_duration_seconds_count", queue="events") == 1
    assert h.sample("mixingest_queue_write_duration_seconds_sum", queue="events") == pytest.approx(
        0.2
    )
    assert h.sample("mixingest_queue_write_duration_seconds_bucket", queue="events", le="0.1") == 0


def test_dedupeAfterStored(h: Harness) -> None:
    result(h.store("track", item(insertId="a", payload=b"1")))
    result(
        h.store("track", item(insertId="a", payload=b"1 again"), item(insertId="b", payload=b"2"))
    )
    assert h.queue.stored() == [b"1", b"2"]
    assert h.funnel.recent.hits == 1
    result(h.store("track", item(insertId="a")))
    assert len(h.queue.puts) == 2
    assert h.sample("mixingest_dedupe_hits_total") == 2


def test_dedupeOnlyOnceActuallyStored(h: Harness) -> None:
    h.queue.hold = True
    h.store("track", item(insertId="a", payload=b"1"))
    h.store("track", item(insertId="a", payload=b"1"))
    assert h.queue.stored() == [b"1", b"1"]
    h.queue.held.pop(0).errback(QueueUnavailable("down"))
    h.queue.hold = False
    result(h.store("track", item(insertId="a", payload=b"1")))
    assert len(h.queue.puts) == 3


def test_failedWriteNotRemembered(h: Harness) -> None:
    h.queue.failWith = QueueUnavailable("down")
    with pytest.raises(QueueUnavailable):
        result(h.store("track", item(insertId="a")))
    h.queue.failWith = None
    result(h.store("track", item(insertId="a")))
    assert len(h.queue.puts) == 2


def test_dedupeKeyedByTokenAndOnlyWithInsertId(h: Harness) -> None:
    result(h.store("track", item("tok", insertId="a"), item("tok")))
    result(h.store("track", item("other", insertId="a"), item("tok")))
    assert len(h.queue.stored()) == 4


def test_dedupeWindowExpires() -> None:
    h = Harness(recent=RecentInsertIds(maxSize=10, ttl=60))
    result(h.store("track", item(insertId="a")))
    h.clock.advance(60)
    result(h.store("track", item(insertId="a")))
    assert len(h.queue.puts) == 2


def test_rateLimitWholeRequest() -> None:
    h = Harness(limiter=RateLimiter(rate=2))
    result(h.store("track", item("noisy"), item("noisy")))
    with pytest.raises(RateLimited) as refused:
        h.store("track", item("quiet"), item("noisy"))
    assert (refused.value.status, refused.value.retryAfter) == (429, 1)
    assert len(h.queue.puts) == 1
    result(h.store("track", item("quiet"), item("quiet")))
    status = h.funnel.status()
    assert status["rejected"] == {"rate_limit": 2}
    assert status["rate_limit"] == {
        "rate": 2.0,
        "rejected": 2,
        "tokens": 2,
        "global_rate": None,
        "global_rejected": 0,
    }
    assert status["tokens"]["noisy"]["1m"] == {"events": 2, "bytes": 4, "rejects": 1}
    assert status["tokens"]["quiet"]["1m"] == {"events": 2, "bytes": 4, "rejects": 1}
    h.clock.advance(1)
    result(h.store("track", item("noisy")))


def test_dedupeHitsCostNoRate() -> None:
    h = Harness(limiter=RateLimiter(rate=1))
    result(h.store("track", item(insertId="a")))
    for _ in range(5):
        result(h.store("track", item(insertId="a")))


def test_inFlightBound() -> None:
    h = Harness(maxInFlight=3)
    h.queue.hold = True
    h.store("track", item(), item())
    h.store("track", item(), item())
    with pytest.raises(Overloaded) as refused:
        h.store("track", item())
    assert (refused.value.status, refused.value.retryAfter) == (503, 1)
    assert h.funnel.rejected == {"in_flight": 1}
    h.queue.release()
    h.store("track", item())


def test_backlogBound() -> None:
    h = Harness(maxBacklog=100)
    h.queue.backlog = {"events": 60, "people": 40}
    assert h.funnel.ready()
    h.clock.advance(BACKLOG_POLL_INTERVAL)
    assert not h.funnel.ready()
    with pytest.raises(Overloaded) as refused:
        h.store("track", item())
    assert refused.value.retryAfter == 30
    assert h.sample("mixingest_journal_backlog_events") == 100
    h.queue.backlog = {"events": 99}
    h.clock.advance(BACKLOG_POLL_INTERVAL)
    assert h.funnel.ready()
    result(h.store("track", item()))


def test_backlogPollSurvivesErrors(h: Harness) -> None:
    h.queue.backlog = "not a number"
    h.clock.advance(BACKLOG_POLL_INTERVAL)
    h.queue.backlog = 7
    h.clock.advance(BACKLOG_POLL_INTERVAL)
    assert h.funnel.backlog == 7


def test_backlogOf() -> None:
    assert backlogOf({}) == 0
    assert backlogOf({"backlog": 5}) == 5
    assert backlogOf({"backlog": {"a": 2, "b": 3}}) == 5


def test_readyFollowsQueue(h: Harness) -> None:
    assert h.funnel.ready()
    h.queue.isReady = False
    assert not h.funnel.ready()


def test_drainWaitsForWritesInFlight(h: Harness) -> None:
    h.queue.hold = True
    stored = h.store("track", item())
    drained = h.funnel.stopService()
    assert not h.funnel.ready()
    with pytest.raises(Overloaded) as refused:
        h.store("track", item(payload=b"late"))
    assert refused.value.retryAfter == 5
    assert h.funnel.rejected == {"draining": 1}
    assert not drained.called
    h.queue.release()
    assert result(drained) is None
    assert result(stored) is None
    assert h.clock.getDelayedCalls() == []


def test_drainTimesOut() -> None:
    h = Harness(drainTimeout=20)
    h.queue.hold = True
    h.store("track", item())
    drained = h.funnel.stopService()
    h.clock.advance(19.9)
    assert not drained.called
    h.clock.advance(0.1)
    assert result(drained) is None
    h.queue.release()
    assert h.clock.getDelayedCalls() == []


def test_drainWithNothingInFlight(h: Harness) -> None:
    assert result(h.funnel.stopService()) is None
    assert h.clock.getDelayedCalls() == []


def test_statusShape(h: Harness) -> None:
    h.clock.advance(12.5)
    result(h.store("track", item(payload=b"abc")))
    status = h.funnel.status()
    assert status["uptime"] == 12.5
    assert status["ready"] is True
    assert status["draining"] is False
    assert status["backlog"] == {"events": 0, "limit": h.funnel.maxBacklog, "over": False}
    assert status["dedupe"] == {"hits": 0, "entries": 0, "size": 100_000, "ttl": 600.0}
    assert status["rate_limit"] == {
        "rate": None,
        "rejected": 0,
        "tokens": 0,
        "global_rate": None,
        "global_rejected": 0,
    }
    assert status["tokens"]["tok"]["total"] == {"events": 1, "bytes": 3, "rejects": 0}
    assert status["backend"] == {"backend": "double", "backlog": {}}
    assert set(status) == {
        "uptime", "ready", "draining", "stopping", "in_flight", "backlog", "queues", "rejected",
        "dedupe", "rate_limit", "tokens", "backend",
    }  # fmt: skip


def test_metricsPerFunnel() -> None:
    """
    Each funnel has a registry of its own: two in one process do not
    collide or share figures.
    """
    a, b = Harness(), Harness()
    result(a.store("track", item()))
    assert a.sample("mixingest_events_stored_total", queue="events") == 1
    assert b.sample("mixingest_events_stored_total", queue="events") is None
    names = [m.name for m in a.funnel.metrics.registry.collect()]
    assert all(name.startswith(("mixingest_", "process_")) for name in names)


def test_emptyGroupsAfterDedupeAreNotPut(h: Harness) -> None:
    result(h.store("track", item("a", insertId="x")))
    result(h.store("track", item("a", insertId="x"), item("b")))
    assert h.queue.puts == [("events", [b"{}"]), ("events", [b"{}"])]
    assert h.funnel.status()["tokens"]["a"]["total"]["events"] == 1


def test_countersRecordBytesPerToken(h: Harness) -> None:
    result(h.store("track", item("a", payload=b"12"), item("b", payload=b"345")))
    tokens: Dict[str, Any] = h.funnel.status()["tokens"]
    assert tokens["a"]["1m"] == {"events": 1, "bytes": 2, "rejects": 0}
    assert tokens["b"]["1m"] == {"events": 1, "bytes": 3, "rejects": 0}


def test_globalRateLimit() -> None:
    """
    The global limit refuses a request whatever its tokens, counted under
    its own reason.
    """
    h = Harness(limiter=RateLimiter(rate=None, globalRate=2))
    result(h.store("track", item("a"), item("b")))
    with pytest.raises(RateLimited, match="over 2 events/s for this server") as refused:
        h.store("track", item("c"))
    assert refused.value.retryAfter == 1
    status = h.funnel.status()
    assert status["rejected"] == {"global_rate_limit": 1}
    assert status["rate_limit"]["global_rate"] == 2
    assert status["rate_limit"]["global_rejected"] == 1


def test_statusSources() -> None:
    h = Harness()
    h.funnel.statusSources["http"] = lambda: {"connections": 3}
    assert h.funnel.status()["http"] == {"connections": 3}
