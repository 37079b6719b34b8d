"""
The live view's tap (L{mixingest.live}): bounded buffers, sampling,
C{Last-Event-ID}, dropping a slow viewer, and what the API and the funnel
feed it; then C{/live} and C{/live/stream} over real loopback sockets.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError

from mixingest.auth import ImportSecrets
from mixingest.errors import QueueUnavailable
from mixingest.live import (
    FLUSH_BYTES,
    FLUSH_SECONDS,
    FRAMED_PER_FLUSH,
    VIEWER_QUEUE_BYTES,
    LiveTap,
    Viewer,
)
from mixingest.tokens import TokenList
from tests.test_admin import Running
from tests.test_api import B64, Harness

GOOD = {"event": "e", "properties": {"token": "tok", "distinct_id": "u", "$insert_id": "a1"}}
BAD = {"event": "e", "properties": {"token": "tok", "time": "yesterday"}}


class FakeTransport:
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class FakeRequest:
    """
    What a viewer uses of a request: C{write}, the producer registration
    and the transport.
    """

    def __init__(self) -> None:
        self.written: List[bytes] = []
        self.producer: Optional[Viewer] = None
        self.transport = FakeTransport()
        self.tap: Optional[LiveTap] = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def registerProducer(self, producer: Viewer, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def frames(self) -> List[Tuple[Optional[int], str, Dict[str, Any]]]:
        """
        The frames written once the tap's pending frames went out (what its
        flush timer does), parsed: (id, event, data).
        """
        if self.tap is not None:
            self.tap.flush()
        found = []
        for raw in b"".join(self.written).decode().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in raw.splitlines() if ": " in line)
            if "data" in fields:
                eventId = int(fields["id"]) if "id" in fields else None
                found.append((eventId, fields["event"], json.loads(fields["data"])))
        return found

    def records(self) -> List[Dict[str, Any]]:
        return [data for _, event, data in self.frames() if event == "record"]


def watch(tap: LiveTap, lastEventId: Optional[int] = None) -> FakeRequest:
    request = FakeRequest()
    request.tap = tap
    assert tap.attach(request, lastEventId) is not None  # type: ignore[arg-type]
    return request


def dedupedOne(tap: LiveTap, token: str = "tok") -> None:
    tap.deduplicated("track", [token])


def test_inactiveWithoutViewers() -> None:
    """
    The hooks' guard: set while a viewer is attached, cleared once the
    last one leaves (and the count ticker stops with it).
    """
    clock = Clock()
    tap = LiveTap(clock)
    assert not tap.active
    first, second = watch(tap), watch(tap)
    assert tap.active and clock.getDelayedCalls()
    assert first.producer is not None and second.producer is not None
    tap.detach(first.producer)
    assert tap.active
    tap.detach(second.producer)
    assert not tap.active and not clock.getDelayedCalls()


def test_apiDoesNotCallTheTapWithoutViewers() -> None:
    """
    With no viewer, the API and the funnel never call a hook; the control
    shows that the same requests do with one.
    """
    h = Harness()
    calls: List[str] = []
    for name in ("accepted", "deduplicated", "refused"):
        setattr(h.funnel.live, name, lambda *a, name=name, **k: calls.append(name))
    good = base64.b64encode(json.dumps([GOOD, GOOD, BAD]).encode()).decode()
    assert h.call("GET", f"/track?data={good}")[0] == 200
    assert calls == []
    h.funnel.live.active = True
    assert h.call("GET", f"/track?data={good}")[0] == 200
    assert set(calls) == {"deduplicated", "refused"}


def test_ringIsBoundedAndReplayedToNewViewers() -> None:
    tap = LiveTap(Clock(), bufferSize=3)
    first = watch(tap)
    for _ in range(5):
        dedupedOne(tap)
    assert [r["id"] for r in first.records()] == [1, 2, 3, 4, 5]
    assert [eventId for eventId, _ in tap.ring] == [3, 4, 5]
    assert [r["id"] for r in watch(tap).records()] == [3, 4, 5]


def test_lastEventIdResumesWithoutDuplicates() -> None:
    tap = LiveTap(Clock(), bufferSize=10)
    watch(tap)
    for _ in range(6):
        dedupedOne(tap)
    assert [r["id"] for r in watch(tap, lastEventId=4).records()] == [5, 6]
    assert watch(tap, lastEventId=6).records() == []
    # Older than the buffer: everything it still holds, once.
    small = LiveTap(Clock(), bufferSize=2)
    watch(small)
    for _ in range(6):
        dedupedOne(small)
    assert [r["id"] for r in watch(small, lastEventId=1).records()] == [5, 6]


def test_samplingShowsAShareButCountsAll() -> None:
    clock = Clock()
    draws = iter([0.1, 0.9, 0.2, 0.8])
    tap = LiveTap(clock, sample=0.5, chance=lambda: next(draws))
    viewer = watch(tap)
    for _ in range(4):
        dedupedOne(tap)
    assert len(viewer.records()) == 2
    clock.advance(1)
    counts = [data for _, event, data in viewer.frames() if event == "counts"]
    assert counts[-1]["counts"] == [["tok", "track", "deduplicated", 4]]


def test_slowViewerIsDroppedOthersKeepGoing() -> None:
    """
    A paused viewer queues up to its bound of writes, then is dropped (its
    connection aborted); a viewer that keeps up sees every frame; a paused
    viewer that resumes in time gets what it owed, in order.
    """
    tap = LiveTap(Clock(), viewerQueue=3)
    slow, fast, late = watch(tap), watch(tap), watch(tap)
    assert slow.producer is not None and late.producer is not None
    slow.producer.pauseProducing()
    late.producer.pauseProducing()
    for _ in range(3):
        dedupedOne(tap)
        tap.flush()
    late.producer.resumeProducing()
    assert [r["id"] for r in late.records()] == [1, 2, 3]
    assert not slow.transport.aborted
    dedupedOne(tap)
    tap.flush()
    assert slow.transport.aborted and tap.dropped == 1
    assert slow.producer not in tap.viewers
    for _ in range(10):
        dedupedOne(tap)
    assert len(fast.records()) == 14 and len(late.records()) == 14
    assert len(slow.records()) == 0


def test_slowViewerDroppedPastItsBytes() -> None:
    """
    However few the writes, a paused viewer owes at most
    L{VIEWER_QUEUE_BYTES}: past them it is dropped.
    """
    tap = LiveTap(Clock())
    slow = watch(tap)
    assert slow.producer is not None
    slow.producer.pauseProducing()
    while slow.producer.pendingBytes < VIEWER_QUEUE_BYTES:
        assert not slow.transport.aborted
        tap.refused("track", 400, "invalid", [("tok", "event", "bad", "x" * 3000)] * 10)
        tap.flush()
    tap.refused("track", 400, "invalid", [("tok", "event", "bad", "x")])
    tap.flush()
    assert slow.transport.aborted and tap.dropped == 1


def test_recordsGoOutTogether() -> None:
    """
    Records reach viewers in one write per flush interval (or sooner past
    L{FLUSH_BYTES}), not one per request; a viewer attaching meanwhile gets
    the pending records once, from the ring.
    """
    clock = Clock()
    tap = LiveTap(clock)
    first = watch(tap)
    before = len(first.written)
    for _ in range(5):
        dedupedOne(tap)
    assert len(first.written) == before
    second = FakeRequest()
    assert tap.attach(second, None) is not None  # type: ignore[arg-type]
    assert len(first.written) == before + 1
    assert [r["id"] for r in first.records()] == [1, 2, 3, 4, 5]
    assert [r["id"] for r in second.records()] == [1, 2, 3, 4, 5]
    dedupedOne(tap)
    clock.advance(FLUSH_SECONDS)
    assert len(first.written) == before + 2
    assert [r["id"] for r in second.records()] == [1, 2, 3, 4, 5, 6]
    while len(first.written) == before + 2:
        tap.refused("track", 400, "invalid", [("tok", "event", "bad", "x" * 3000)])
    assert sum(map(len, first.written[before + 2 :])) >= FLUSH_BYTES


def test_newestRecordsShownPastTheBound() -> None:
    """
    Past L{FRAMED_PER_FLUSH} accepted records in one flush, the newest are
    shown, in order; the others are counted in the chart's counts and as
    unshown.
    """
    clock = Clock()
    tap = LiveTap(clock)
    viewer = watch(tap)
    extra = 7
    payloads = [b'{"n":%d}' % n for n in range(FRAMED_PER_FLUSH + extra)]
    tap.accepted("track", [("tok", payloads[:extra], None)])
    tap.accepted("track", [("tok", payloads[extra:], None)])
    shown = [record["item"]["n"] for record in viewer.records()]
    assert shown == list(range(extra, FRAMED_PER_FLUSH + extra))
    assert tap.unshown == extra
    clock.advance(1)
    (counts,) = [data for _, event, data in viewer.frames() if event == "counts"]
    assert counts["unshown"] == extra
    assert counts["counts"] == [["tok", "track", "accepted", FRAMED_PER_FLUSH + extra]]


def test_tooManyViewers() -> None:
    tap = LiveTap(Clock(), maxViewers=1)
    watch(tap)
    assert tap.attach(FakeRequest(), None) is None  # type: ignore[arg-type]


def test_apiFeedsAcceptedRefusedAndDeduplicated() -> None:
    h = Harness(secrets=ImportSecrets({"tok": "sekrit"}))
    viewer = watch(h.funnel.live)
    data = base64.b64encode(json.dumps([GOOD, BAD]).encode()).decode()
    assert h.call("GET", f"/track?verbose=1&data={data}")[0] == 200
    assert h.call("GET", f"/track?data={data}")[0] == 200
    records = viewer.records()
    kinds = [(r["kind"], r["token"], r["endpoint"], r["status"]) for r in records]
    assert kinds == [
        ("refused", "tok", "track", 200),
        ("accepted", "tok", "track", 200),
        ("refused", "tok", "track", 200),
        ("deduplicated", "tok", "track", 200),
    ]
    refused = records[0]
    assert refused["reason"] == "invalid"
    assert refused["field"] == "properties.time"
    assert refused["message"].startswith("must be a number")
    assert json.loads(refused["record"]) == BAD
    item = records[1]["item"]
    assert item == h.queue.decoded()[0]
    assert "ip" not in item, "no client address unless the daemon stores it"


def test_importRefusalsShowTheAnswersStatus() -> None:
    """
    A record refused on C{/import} shows the status its request was
    answered with: 400 in strict mode, 200 under C{strict=0}, which drops
    invalid records and answers success.
    """
    h = Harness(secrets=ImportSecrets({"tok": "sekrit"}))
    viewer = watch(h.funnel.live)
    headers = {
        "Authorization": "Basic " + base64.b64encode(b"sekrit:").decode(),
        "Content-Type": "application/json",
    }
    body = json.dumps([BAD]).encode()
    answers = [
        h.call("POST", f"/import?strict={strict}", headers=headers, data=body)[0]
        for strict in (1, 0)
    ]
    shown = [(r["endpoint"], r["status"], r["reason"]) for r in viewer.records()]
    assert answers == [400, 200]
    assert shown == [("import", 400, "invalid"), ("import", 200, "invalid")]


def test_wholeRequestRefusals() -> None:
    """
    Refused as a whole: the answer's status and the category the page
    groups it under; an /import refusal shows neither the secret nor the
    Authorization header.
    """
    h = Harness(secrets=ImportSecrets({"tok": "sekrit"}))
    viewer = watch(h.funnel.live)
    h.call("GET", "/track?data=%%%")
    bad = base64.b64encode(json.dumps([GOOD]).encode()).decode()
    auth = {"Authorization": "Basic " + base64.b64encode(b"wrong-secret:").decode()}
    h.call("POST", f"/import?api_key=other-secret&data={quote(bad)}", headers=auth)
    h.queue.failWith = QueueUnavailable("connection refused")
    h.call("GET", f"/track?data={B64}")
    records = viewer.records()
    summary = [(r["endpoint"], r["status"], r["reason"], r["token"]) for r in records]
    assert summary == [
        ("track", 200, "invalid", ""),
        ("import", 401, "unauthorised", ""),
        ("track", 503, "over_capacity", "tok"),
    ]
    text = b"".join(viewer.written)
    for secret in (b"wrong-secret", b"other-secret", b"sekrit", b"Basic "):
        assert secret not in text


def test_unknownTokenIsUnauthorised() -> None:
    h = Harness(tokens=TokenList(["tok"]))
    viewer = watch(h.funnel.live)
    other = {"event": "e", "properties": {"token": "stranger"}}
    data = base64.b64encode(json.dumps([other]).encode()).decode()
    h.call("GET", f"/track?data={data}")
    (record,) = viewer.records()
    assert (record["reason"], record["token"], record["field"]) == (
        "unauthorised",
        "stranger",
        "properties.token",
    )


def test_ipShownOnlyWhenStored() -> None:
    h = Harness()
    viewer = watch(h.funnel.live)
    h.call("GET", f"/track?ip=1&data={B64}")
    (record,) = viewer.records()
    assert record["item"]["properties"]["ip"] == "127.0.0.1"


# Over real sockets.


@pytest_twisted.async_yield_fixture
async def running() -> Any:
    r = Running()
    try:
        yield r
    finally:
        await r.stop()


async def _readFrames(response: Any, until: bytes) -> bytes:
    """
    The stream's bytes up to and including C{until}.
    """
    received = bytearray()
    done: Deferred[None] = Deferred()

    def collect(data: bytes) -> None:
        received.extend(data)
        if until in received and not done.called:
            done.callback(None)

    finished = treq.collect(response, collect)
    done.addTimeout(10, reactor)
    await done
    finished.cancel()
    return bytes(received)


@pytest_twisted.ensureDeferred
async def test_pageAndStreamOnTheAdminListenerOnly(running: Running) -> None:
    code, headers, body = await running.get("/live")
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert b"live/stream" in body and b"EventSource" in body
    assert b"://" not in body.replace(b"http://www.w3.org", b""), "nothing from elsewhere"
    assert (await running.get("/live", public=True))[0] == 404
    assert (await running.get("/live/stream", public=True))[0] == 404


@pytest_twisted.ensureDeferred
async def test_streamOverLoopback(running: Running) -> None:
    """
    A viewer on the admin listener sees a record sent to the public one;
    reconnecting with C{Last-Event-ID}, or C{?lastEventId=} for a client
    that cannot set headers, resumes after it.
    """
    url = f"http://127.0.0.1:{running.adminPort}/live/stream"
    response = await treq.get(url, unbuffered=True, persistent=False)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/event-stream")
    await deferLater(reactor, 0.05, lambda: None)
    assert running.funnel.live.active
    bad = base64.b64encode(json.dumps(BAD).encode()).decode()
    await running.get(f"/track?data={bad}", public=True)
    text = await _readFrames(response, b"properties.time")
    assert b"id: 1\n" in text
    await running.get(f"/track?data={bad}", public=True)
    again = await treq.get(url, unbuffered=True, persistent=False, headers={"Last-Event-ID": "1"})
    text = await _readFrames(again, b"id: 2\n")
    assert b"id: 1\n" not in text
    await running.get(f"/track?data={bad}", public=True)
    byQuery = await treq.get(url + "?lastEventId=2", unbuffered=True, persistent=False)
    text = await _readFrames(byQuery, b"id: 3\n")
    assert b"id: 1\n" not in text and b"id: 2\n" not in text
    running.funnel.live.stop()
    await deferLater(reactor, 0.05, lambda: None)
    assert not running.funnel.live.active


def test_liveSampleOption(tmp_path: Any) -> None:
    from mixingest.funnel import Funnel
    from mixingest.tap import Options, makeService

    options = Options()
    options.parseOptions(["--data-dir", str(tmp_path), "--live-sample", "0.25"])
    top = makeService(options, MemoryReactorClock())
    (funnel,) = [s for s in top if isinstance(s, Funnel)]
    assert funnel.live.sample == 0.25
    assert Options()["live-sample"] == 1.0
    for bad in ("0", "1.5", "x"):
        with pytest.raises(UsageError, match="--live-sample"):
            Options().parseOptions(["--live-sample", bad])
