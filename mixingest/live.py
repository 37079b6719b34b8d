# -*- test-case-name: tests.test_live -*-
"""
The live view's event tap: what the public API accepts, deduplicates and
refuses, as it happens, for the C{/live} page on the admin listener.

The API and the funnel call L{LiveTap}'s hooks only while L{LiveTap.active}
is set, that is while a viewer is connected: with none, the feature costs
one attribute check per request.  With viewers, each record is sampled
(C{--live-sample}) into a bounded ring of Server-Sent-Events frames, encoded
once and written to every viewer in one write per tenth of a second;
per-second counts (not sampled) feed the page's chart.  A viewer whose
connection cannot keep up gets a bounded queue
of frames while its transport is paused, and is dropped when that overflows:
ingestion never waits for a viewer and never buffers without bound for one.

Privacy: only what the daemon stores is shown of an accepted record (the
client address only when the daemon stored it); a refused record shows its
field and message, never the request's parameters (C{api_key}) nor its
headers (C{Authorization}).
"""

from __future__ import annotations

import json
import random
from collections import deque
from json.encoder import encode_basestring_ascii
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

__all__ = [
    "DEFAULT_LIVE_BUFFER",
    "DEFAULT_LIVE_SAMPLE",
    "LiveStream",
    "LiveTap",
    "Viewer",
    "reasonOf",
    "tokenOf",
]

DEFAULT_LIVE_SAMPLE = 1.0
DEFAULT_LIVE_BUFFER = 500
"""Frames kept for new viewers and for reconnects with C{Last-Event-ID}."""
VIEWER_QUEUE = 200
"""Writes a paused viewer may owe before it is dropped."""
VIEWER_QUEUE_BYTES = 1024 * 1024
"""Bytes a paused viewer may owe before it is dropped."""
MAX_VIEWERS = 16
TICK_SECONDS = 1.0
"""Seconds between count frames, which also keep idle connections alive."""
FLUSH_SECONDS = 0.1
"""
Seconds record frames wait to go out together: one write per viewer per
flush rather than one per request, which a person watching cannot tell.
"""
FLUSH_BYTES = 64 * 1024
"""Pending frames past this many bytes go out at once."""
FRAMED_PER_FLUSH = 100
"""
Accepted records shown per flush at most (1,000 a second): the newest;
the others are counted (in the chart, and as C{unshown}) but not framed,
and not held for framing either.
"""
MAX_RECORD_CHARS = 4000
"""A refused record's JSON is cut to this, so that one huge record cannot fill a frame."""

_encode = json.JSONEncoder(separators=(",", ":")).encode
"""
Compact JSON, ASCII only; one encoder for all, since C{json.dumps} with
arguments builds a new one per call.
"""
_quote = encode_basestring_ascii

_Group = Tuple[str, Sequence[bytes], Any]
"""A token, its stored payloads, and what the funnel keeps beside them."""

OUTCOMES = ("accepted", "deduplicated", "invalid", "rate_limited", "over_capacity", "unauthorised")


def reasonOf(status: int) -> str:
    """
    The page's refusal category for a whole request refused with C{status}.
    """
    if status in (401, 403):
        return "unauthorised"
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "over_capacity"
    return "invalid"


@implementer(IPushProducer)
class Viewer:
    """
    One connected C{/live/stream}: writes frames while its transport takes
    them, queues a bounded number while paused, and is dropped past that.
    """

    def __init__(self, tap: LiveTap, request: Request, maxQueue: int) -> None:
        self.tap = tap
        self.request = request
        self.maxQueue = maxQueue
        self.paused = False
        self.pending: Deque[bytes] = deque()
        self.pendingBytes = 0
        self.closed = False

    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        if not self.paused:
            self.request.write(frame)
            return
        if len(self.pending) >= self.maxQueue or self.pendingBytes >= VIEWER_QUEUE_BYTES:
            self.tap.dropped += 1
            self.tap.log.info("dropping a live viewer that does not keep up")
            self.close()
            return
        self.pending.append(frame)
        self.pendingBytes += len(frame)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while self.pending and not self.paused and not self.closed:
            frame = self.pending.popleft()
            self.pendingBytes -= len(frame)
            self.request.write(frame)

    def stopProducing(self) -> None:
        self.close()

    def close(self) -> None:
        """
        End the stream: the viewer is forgotten at once, and its connection
        is aborted, since a stuck client would never read a clean close.
        """
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        self.pendingBytes = 0
        self.tap.detach(self)
        transport = getattr(self.request, "transport", None)
        if transport is not None:
            transport.abortConnection()


class LiveTap:
    """
    The hooks' target and the viewers' source.  Reactor-owned.

    @ivar active: whether any viewer is connected; the hooks check it first.
    @ivar dropped: viewers dropped for not keeping up.
    @ivar unshown: accepted records counted but not shown, past
        L{FRAMED_PER_FLUSH}.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        sample: float = DEFAULT_LIVE_SAMPLE,
        bufferSize: int = DEFAULT_LIVE_BUFFER,
        viewerQueue: int = VIEWER_QUEUE,
        maxViewers: int = MAX_VIEWERS,
        chance: Callable[[], float] = random.random,
    ) -> None:
        """
        @param sample: the share of records shown, in (0, 1].
        @param chance: draws in [0, 1) for sampling (injected by tests).
        """
        self.clock = clock
        self.sample = sample
        self.viewerQueue = viewerQueue
        self.maxViewers = maxViewers
        self.chance = chance
        self.active = False
        self.dropped = 0
        self.unshown = 0
        self.viewers: List[Viewer] = []
        self.ring: Deque[Tuple[int, bytes]] = deque(maxlen=bufferSize)
        self.lastId = 0
        self.counts: Dict[Tuple[str, str, str], int] = {}
        self._outgoing: List[bytes] = []
        self._unframed: Deque[Tuple[float, str, Sequence[_Group], int]] = deque()
        self._unframedRecords = 0
        self._outgoingBytes = 0
        self._flushCall: Optional[IDelayedCall] = None
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = clock

    def attach(self, request: Request, lastEventId: Optional[int]) -> Optional[Viewer]:
        """
        A new viewer on C{request}, sent first the buffered frames after
        C{lastEventId} (all of them for a new viewer).

        @return: the viewer, or L{None} when there are too many already.
        """
        if len(self.viewers) >= self.maxViewers:
            return None
        # What is pending goes to the viewers already here: the new one
        # gets it from the ring, once.
        self.flush()
        viewer = Viewer(self, request, self.viewerQueue)
        request.registerProducer(viewer, True)
        self.viewers.append(viewer)
        if not self.active:
            self.active = True
            self._ticker.start(TICK_SECONDS, now=False)
        after = -1 if lastEventId is None else lastEventId
        viewer.send(b"retry: 2000\n\n")
        for eventId, frame in self.ring:
            if eventId > after:
                viewer.send(frame)
        return viewer

    def detach(self, viewer: Viewer) -> None:
        if viewer in self.viewers:
            self.viewers.remove(viewer)
        if not self.viewers and self.active:
            self.active = False
            self.counts.clear()
            self._cancelFlush()
            if self._ticker.running:
                self._ticker.stop()

    def stop(self) -> None:
        """
        Close every viewer (the admin listener stops).
        """
        self.flush()
        for viewer in list(self.viewers):
            viewer.close()

    def flush(self) -> None:
        """
        Write the pending record frames to every viewer, in one write each.
        """
        self._cancelFlush()
        if self._unframed:
            self._frameAccepted()
        if not self._outgoing:
            return
        data = b"".join(self._outgoing)
        self._outgoing.clear()
        self._outgoingBytes = 0
        for viewer in self.viewers[:]:
            viewer.send(data)

    def _cancelFlush(self) -> None:
        if self._flushCall is not None:
            if self._flushCall.active():
                self._flushCall.cancel()
            self._flushCall = None
        if not self.viewers:
            self._outgoing.clear()
            self._outgoingBytes = 0
            self._unframed.clear()
            self._unframedRecords = 0

    def _queue(self, data: bytes) -> None:
        self._outgoing.append(data)
        self._outgoingBytes += len(data)
        if self._outgoingBytes >= FLUSH_BYTES:
            self.flush()
        elif self._flushCall is None:
            self._flushCall = self.clock.callLater(FLUSH_SECONDS, self.flush)

    def _publish(self, document: Dict[str, Any]) -> None:
        if self._unframed:  # records keep the order they happened in
            self._frameAccepted()
        self.lastId += 1
        document["id"] = self.lastId
        data = _encode(document)
        self._send(b"id: %d\nevent: record\ndata: %s\n\n" % (self.lastId, data.encode("ascii")))

    def _send(self, frame: bytes) -> None:
        self.ring.append((self.lastId, frame))
        self._queue(frame)

    def _count(self, token: str, endpoint: str, outcome: str, n: int = 1) -> None:
        key = (token, endpoint, outcome)
        self.counts[key] = self.counts.get(key, 0) + n

    def _sampled(self) -> bool:
        return self.sample >= 1.0 or self.chance() < self.sample

    def _tick(self) -> None:
        counts, self.counts = self.counts, {}
        data = _encode(
            {
                "time": round(self.clock.seconds(), 3),
                "counts": [[t, e, o, n] for (t, e, o), n in sorted(counts.items())],
                "viewers": len(self.viewers),
                "unshown": self.unshown,
            }
        )
        frame = b"event: counts\ndata: %s\n\n" % data.encode("utf-8")
        self.flush()
        for viewer in list(self.viewers):
            viewer.send(frame)

    # The hooks, called only while active.

    def accepted(self, endpoint: str, groups: Sequence[_Group]) -> None:
        """
        Records stored: each group is a token and its stored payloads.
        They are counted now and framed at the next flush, all together:
        the request pays for a count and an append, not for its frames.
        """
        now = self.clock.seconds()
        records = 0
        for token, payloads, _ in groups:
            self._count(token, endpoint, "accepted", len(payloads))
            records += len(payloads)
        unframed = self._unframed
        unframed.append((now, endpoint, groups, records))
        self._unframedRecords += records
        # What the next flush would not show anyway is not held for it.
        while self._unframedRecords - unframed[0][3] >= FRAMED_PER_FLUSH:
            self.unshown += unframed[0][3]
            self._unframedRecords -= unframed.popleft()[3]
        if self._flushCall is None:
            self._flushCall = self.clock.callLater(FLUSH_SECONDS, self.flush)

    def _frameAccepted(self) -> None:
        """
        Frame the accepted records waiting for it, in the order they were
        stored, into the ring and the outgoing frames.
        """
        unframed, self._unframed = self._unframed, deque()
        records, self._unframedRecords = self._unframedRecords, 0
        # The newest records, up to the bound: nobody reads faster, and the
        # bound keeps a viewer's cost flat however fast events come.
        budget = FRAMED_PER_FLUSH
        chosen: List[Tuple[float, str, str, Sequence[bytes]]] = []
        for now, endpoint, groups, _ in reversed(unframed):
            for token, payloads, _ in reversed(groups):
                if len(payloads) > budget:
                    payloads = payloads[len(payloads) - budget :]
                budget -= len(payloads)
                chosen.append((now, endpoint, token, payloads))
                if not budget:
                    break
            if not budget:
                break
        self.unshown += records - (FRAMED_PER_FLUSH - budget)
        chosen.reverse()
        sample, chance = self.sample, self.chance
        heads: Dict[Tuple[str, str], bytes] = {}
        frames = []
        eventId = self.lastId
        for now, endpoint, token, payloads in chosen:
            stamp = b"%.3f" % now
            head = heads.get((token, endpoint))
            if head is None:
                head = heads[(token, endpoint)] = _head("accepted", token, endpoint)
            for payload in payloads:
                if sample < 1.0 and chance() >= sample:
                    continue
                eventId += 1
                # The stored item is JSON already: it goes into the frame
                # as it is, not decoded and encoded again.
                frames.append(
                    (
                        eventId,
                        b'id: %d\nevent: record\ndata: %s,"time":%s,"id":%d,"item":%s}\n\n'
                        % (eventId, head, stamp, eventId, payload),
                    )
                )
        self._sendFrames(eventId, frames)

    def deduplicated(self, endpoint: str, tokens: Iterable[str]) -> None:
        """
        Records answered without storing: their C{$insert_id} was stored
        recently.
        """
        if self._unframed:
            self._frameAccepted()
        stamp = b"%.3f" % self.clock.seconds()
        sample, chance = self.sample, self.chance
        heads: Dict[str, bytes] = {}
        frames = []
        eventId = self.lastId
        for token in tokens:
            self._count(token, endpoint, "deduplicated")
            if sample < 1.0 and chance() >= sample:
                continue
            head = heads.get(token)
            if head is None:
                head = heads[token] = _head("deduplicated", token, endpoint)
            eventId += 1
            frame = b'id: %d\nevent: record\ndata: %s,"time":%s,"id":%d}\n\n' % (
                eventId,
                head,
                stamp,
                eventId,
            )
            frames.append((eventId, frame))
        self._sendFrames(eventId, frames)

    def _sendFrames(self, lastId: int, frames: List[Tuple[int, bytes]]) -> None:
        """
        Keep C{frames} in the ring and queue them for the viewers.
        """
        if not frames:
            return
        self.lastId = lastId
        self.ring.extend(frames)
        self._queue(b"".join(frame for _, frame in frames))

    def refused(
        self,
        endpoint: str,
        status: int,
        reason: str,
        failures: Iterable[Tuple[str, str, str, Any]],
    ) -> None:
        """
        Records refused: each failure is its token (C{""} when unknown), the
        field at fault, the API's message and the record as received (or
        L{None} when the request could not be decoded).

        @param status: the HTTP status of the answer.
        @param reason: one of L{OUTCOMES}' refusal categories.
        """
        now = round(self.clock.seconds(), 3)
        for token, field, message, record in failures:
            self._count(token, endpoint, reason)
            if self._sampled():
                self._publish(
                    {
                        "kind": "refused",
                        "time": now,
                        "token": token,
                        "endpoint": endpoint,
                        "status": status,
                        "reason": reason,
                        "field": field,
                        "message": message,
                        "record": _recordText(record),
                    }
                )


def _head(kind: str, token: str, endpoint: str) -> bytes:
    """
    The start of a record frame's JSON object, formatted by hand: a JSON
    encoder's call costs more than the rest of a record's frame.
    """
    return b'{"kind":"%s","token":%s,"endpoint":%s,"status":200' % (
        kind.encode("ascii"),
        _quote(token).encode("ascii"),
        _quote(endpoint).encode("ascii"),
    )


def _recordText(record: Any) -> Optional[str]:
    if record is None:
        return None
    text = json.dumps(record, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_RECORD_CHARS else text[:MAX_RECORD_CHARS] + "…"


def tokenOf(record: Any) -> str:
    """
    The project token of a record as received, or C{""}.
    """
    if not isinstance(record, dict):
        return ""
    props = record.get("properties")
    token = props.get("token") if isinstance(props, dict) else None
    if token is None:
        token = record.get("$token")
    return token if isinstance(token, str) else ""


class LiveStream(Resource):
    """
    C{GET /live/stream}: the tap's frames as C{text/event-stream}.
    """

    isLeaf = True

    def __init__(self, tap: LiveTap) -> None:
        super().__init__()
        self.tap = tap

    def render_GET(self, request: Request) -> Any:
        lastEventId = _lastEventId(request)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        viewer = self.tap.attach(request, lastEventId)
        if viewer is None:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"retry-after", b"10")
            return b"too many live viewers\n"
        finished: Deferred[None] = request.notifyFinish()
        finished.addBoth(_forget, viewer)
        return NOT_DONE_YET


def _forget(result: object, viewer: Viewer) -> None:
    """
    The viewer's connection is gone (closed by the browser, or dropped).
    """
    viewer.closed = True
    viewer.tap.detach(viewer)


def _lastEventId(request: Request) -> Optional[int]:
    """
    The C{Last-Event-ID} a reconnecting browser sends (or C{lastEventId} in
    the query, for clients that cannot set headers).
    """
    raw = request.getHeader(b"last-event-id")
    if raw is None:
        # From the target itself: the hardened request leaves request.args
        # empty (it skips Twisted's parse of every query).
        values = parse_qs(request.uri.partition(b"?")[2]).get(b"lastEventId")
        raw = values[0] if values else None
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError:
        return None
