"""
The HTTP layer under hostile clients, in memory: an L{HardenedSite} channel on a
string transport with a fake clock, so deadlines are exact and fast.  The same
attacks go over real sockets in L{tests.test_hostile_requests}.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import http

from mixingest.api import IngestAPI
from mixingest.budget import BodyBudget
from mixingest.cleaning import CleanItem
from mixingest.httpsite import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    HardenedSite,
    IngestChannel,
    redactedLogFormatter,
)
from mixingest.live import LiveTap

MAX_BODY = 4096
IDLE = 60.0
EVENT = b'{"event":"e","properties":{"token":"t"}}'


class StubFunnel:
    def __init__(self) -> None:
        self.stored: List[Tuple[str, bytes]] = []
        self.live = LiveTap(Clock())

    def store(self, kind: str, items: Sequence[CleanItem]) -> Deferred[None]:
        self.stored.extend((kind, i.payload) for i in items)
        return succeed(None)


class Connection:
    """
    One client connection to a fresh site.
    """

    def __init__(self, *, sharing: Optional[Connection] = None, **siteArgs: Any) -> None:
        """
        @param sharing: another connection whose site (and clock) this one
            connects to; otherwise a fresh site is built from C{siteArgs}.
        """
        if sharing is None:
            self.clock = Clock()
            self.funnel = StubFunnel()
            api = IngestAPI(self.funnel, self.clock, maxBody=MAX_BODY)  # type: ignore[arg-type]
            siteArgs.setdefault("timeout", IDLE)
            self.site = HardenedSite(
                api.resource(), maxBody=MAX_BODY, reactor=self.clock, **siteArgs
            )
        else:
            self.clock, self.funnel, self.site = sharing.clock, sharing.funnel, sharing.site
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        self.channel: IngestChannel = self.site.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        self.channel.makeConnection(self.transport)

    def another(self) -> Connection:
        """
        A second connection to the same site.
        """
        return Connection(sharing=self)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def wait(self, seconds: float) -> None:
        """
        Let time pass as a reactor would, running timers when they are due.
        """
        self.clock.pump([0.25] * int(seconds * 4))

    def answers(self) -> List[Tuple[int, Dict[bytes, bytes], bytes]]:
        """
        Parse every answer written so far (all carry a Content-Length).
        """
        out = self.transport.value()
        answers = []
        while out:
            head, _, rest = out.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ")[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get(b"content-length", b"0"))
            answers.append((status, headers, rest[:length]))
            out = rest[length:]
        return answers

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def close(self) -> None:
        self.channel.connectionLost(None)


def get(path: bytes, *headers: bytes) -> bytes:
    return (
        b"GET "
        + path
        + b" HTTP/1.1\r\nHost: x\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
    )


def post(path: bytes, body: bytes, *headers: bytes) -> bytes:
    return (
        b"POST "
        + path
        + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(body)
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
        + body
    )


def chunked(path: bytes, chunks: Sequence[bytes], end: bool = True) -> bytes:
    out = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    for chunk in chunks:
        out += b"%x\r\n%s\r\n" % (len(chunk), chunk)
    return out + (b"0\r\n\r\n" if end else b"")


GOOD = b"/track?verbose=1&data=" + EVENT.replace(b'"', b"%22")


def test_served() -> None:
    c = Connection()
    c.send(get(GOOD))
    [(status, _, body)] = c.answers()
    assert (status, json.loads(body)) == (200, {"status": 1, "error": None})
    assert not c.closed
    assert len(c.funnel.stored) == 1


# -- bodies over the limit ------------------------------------------------------


def test_declaredTooLargeAnsweredBeforeBody() -> None:
    """
    A Content-Length over the limit is answered 413 as soon as the headers
    are in, in the style asked for, without reading the body; nothing more
    is parsed from the connection, which closes.
    """
    c = Connection()
    c.send(
        b"POST /track?verbose=1 HTTP/1.1\r\nHost: x\r\nOrigin: https://a.example\r\n"
        b"Content-Length: 1000000000\r\n\r\n"
    )
    [(status, headers, body)] = c.answers()
    assert status == 413
    assert json.loads(body) == {"status": 0, "error": f"body exceeds {MAX_BODY} bytes"}
    assert headers[b"connection"] == b"close"
    assert headers[b"access-control-allow-origin"] == b"https://a.example"
    assert c.closed
    c.send(b"x" * 100_000 + b"\r\n\r\n" + get(GOOD))
    assert len(c.answers()) == 1
    assert c.funnel.stored == []


def test_declaredTooLargeNoContinue() -> None:
    """
    A client that waits for "100 Continue" gets the 413 instead.
    """
    c = Connection()
    c.send(
        b"POST /track HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    )
    assert c.transport.value().startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in c.transport.value()


def test_continueUnderLimit() -> None:
    c = Connection()
    c.send(b"POST /track HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert c.transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_chunkedOverLimit() -> None:
    """
    A chunked body is answered 413 as soon as it passes the limit, before
    its end; the rest is discarded and the connection closes.
    """
    c = Connection()
    c.send(chunked(b"/track?verbose=1", [b"data=" + b"x" * 1000] * 3, end=False))
    assert c.answers() == []
    c.send(b"%x\r\n%s\r\n" % (2000, b"x" * 2000))
    [(status, _, body)] = c.answers()
    assert status == 413
    assert json.loads(body)["error"] == f"body exceeds {MAX_BODY} bytes"
    assert c.closed
    c.send(b"%x\r\n%s\r\n0\r\n\r\n" % (2000, b"x" * 2000) + get(GOOD))
    assert len(c.answers()) == 1


def test_chunkedOverLimitInOnePiece() -> None:
    """
    The whole oversized chunked request in one read, terminal chunk and a
    pipelined request included: answered once, 413.
    """
    c = Connection()
    c.send(chunked(b"/track", [b"x" * 3000, b"x" * 3000]) + get(GOOD))
    [(status, _, body)] = c.answers()
    assert (status, body) == (413, b"0")
    assert c.funnel.stored == []


def test_chunkedUnderLimit() -> None:
    c = Connection()
    c.send(chunked(b"/track", [b"data=", EVENT]))
    [(status, _, body)] = c.answers()
    assert (status, body) == (200, b"1")
    assert not c.closed


def test_formBodyNotParsedByTwisted(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    twisted.web would parse a form body into request.args with no field
    limit (a 10 MB form costs it seconds and hundreds of MB), and multipart
    bodies with the email parser: neither happens; the decoder's limit
    answers instead.
    """

    def refuse(*args: Any) -> None:
        raise AssertionError("twisted.web parsed a body")

    monkeypatch.setattr(http, "parse_qs", refuse)
    monkeypatch.setattr(http, "_getMultiPartArgs", refuse)
    c = Connection()
    form = b"&".join(b"f%d=" % i for i in range(500))
    c.send(post(b"/track?verbose=1", form, b"Content-Type: application/x-www-form-urlencoded"))
    c.send(
        post(
            b"/track?verbose=1",
            b"--b\r\nContent-Disposition: form-data; name=data\r\n\r\nx\r\n--b--\r\n",
            b"Content-Type: multipart/form-data; boundary=b",
        )
    )
    first, second = c.answers()
    assert json.loads(first[2])["error"] == "more than 100 parameters"
    assert json.loads(second[2])["status"] == 0


# -- heads ----------------------------------------------------------------------


def test_requestLineTooLong() -> None:
    c = Connection()
    c.send(b"GET /track?data=" + b"A" * MAX_HEAD_BYTES + b" HTTP/1.1\r\n")
    [(status, headers, body)] = c.answers()
    assert status == 414
    assert body == b"request line longer than %d bytes\n" % MAX_HEAD_BYTES
    assert headers[b"connection"] == b"close"
    assert c.closed


def test_requestLineTooLongNoNewline() -> None:
    c = Connection()
    c.send(b"GET /" + b"A" * (MAX_HEAD_BYTES + 10))
    [(status, _, _)] = c.answers()
    assert status == 414
    assert c.closed


def test_headerLineTooLong() -> None:
    c = Connection()
    c.send(b"GET /track HTTP/1.1\r\nCookie: " + b"c" * MAX_HEAD_BYTES)
    [(status, _, body)] = c.answers()
    assert status == 431
    assert b"request headers larger than" in body


def test_headersTooLargeInTotal() -> None:
    c = Connection()
    c.send(b"GET /track HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 1000 + b"\r\n")
    for _ in range(MAX_HEAD_BYTES // 1000):
        c.send(b"X-Pad: " + b"p" * 1000 + b"\r\n")
    [(status, _, _)] = c.answers()
    assert status == 431
    assert c.closed


def test_tooManyHeaders() -> None:
    c = Connection()
    c.send(b"GET /track HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEADERS + 1) + b"\r\n")
    [(status, _, body)] = c.answers()
    assert (status, body) == (431, b"more than %d request headers\n" % MAX_HEADERS)


def test_headersAtTheLimitServed() -> None:
    c = Connection()
    c.send(get(GOOD, *[b"X: y"] * (MAX_HEADERS - 1)))
    [(status, _, _)] = c.answers()
    assert status == 200


@pytest.mark.parametrize(
    "request_",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /track HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /track HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"POST /track HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /track HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        b"POST /track HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST /track HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=[
        "request-line",
        "header-colon",
        "header-name",
        "negative-length",
        "two-lengths",
        "transfer-encoding",
        "chunk-size",
    ],
)
def test_malformed(request_: bytes) -> None:
    c = Connection()
    c.send(request_)
    [(status, _, body)] = c.answers()
    assert (status, body) == (400, b"malformed request line, header or chunked body\n")
    assert c.closed


# -- deadlines ------------------------------------------------------------------


def test_slowHeaders() -> None:
    """
    Trickling the head keeps nothing alive past the header deadline (from
    the connection, for its first request): bytes arriving do not push it
    back.
    """
    c = Connection()
    c.send(b"GET /track HTTP/1.1\r\n")
    for _ in range(int(DEFAULT_HEADER_TIMEOUT) - 1):
        c.clock.advance(1)
        c.send(b"X: y\r\n")
        assert not c.closed
    c.clock.advance(1)
    [(status, _, body)] = c.answers()
    assert (status, body) == (408, b"request not received in time\n")
    assert c.closed
    c.clock.advance(c.channel.abortTimeout)
    assert c.transport.disconnected, "a client that does not read is aborted"
    c.close()


def test_slowHeadersKeepAlive() -> None:
    """
    On a keep-alive connection, each request's head is due within the
    header deadline of its first byte, however long the connection idled.
    """
    c = Connection()
    c.send(get(GOOD))
    c.wait(IDLE - 5)
    c.send(b"GET /track HTTP/1.1\r\n")
    c.clock.advance(DEFAULT_HEADER_TIMEOUT - 0.5)
    c.send(b"X: y\r\n")
    assert not c.closed
    c.clock.advance(0.5)
    assert [a[0] for a in c.answers()] == [200, 408]


def test_deadlinesNeverMoveTimersSooner() -> None:
    """
    Twisted moves a timer sooner with a linear search of every pending
    timer (one per connection): the channel only ever moves its timer later
    or makes a new one.
    """
    c = Connection()
    sooner: List[Any] = []
    callLater = c.clock.callLater

    def spyingCallLater(delay: float, f: Any, *a: Any, **kw: Any) -> Any:
        call = callLater(delay, f, *a, **kw)
        resetter = call.resetter
        call.resetter = lambda dc: (sooner.append(dc), resetter(dc))
        return call

    c.clock.callLater = spyingCallLater  # type: ignore[method-assign]
    c.channel.callLater = spyingCallLater
    for pause in (0, 1, 9.5, 10, 25, IDLE - 1):
        c.wait(pause)
        c.send(post(b"/track", b"data=" + EVENT))
    assert [a[0] for a in c.answers()] == [200] * 6
    assert sooner == []
    c.wait(IDLE)
    assert c.closed


def test_silentConnection() -> None:
    """
    A connection that never sends a byte is closed at the header deadline,
    not the idle timeout.
    """
    c = Connection()
    c.clock.advance(DEFAULT_HEADER_TIMEOUT - 0.5)
    assert not c.closed
    c.clock.advance(1)
    assert c.closed


def test_slowBody() -> None:
    c = Connection()
    c.send(b"POST /track HTTP/1.1\r\nContent-Length: 100\r\n\r\n")
    for _ in range(int(DEFAULT_BODY_TIMEOUT) - 1):
        c.clock.advance(1)
        c.send(b"x")
    assert not c.closed
    c.clock.advance(1)
    [(status, _, _)] = c.answers()
    assert status == 408
    assert c.closed


def test_idleBetweenRequests() -> None:
    """
    After an answer the keep-alive idle timeout applies, and each request
    gets a fresh header deadline.
    """
    c = Connection()
    for _ in range(3):
        c.send(get(GOOD))
        c.wait(IDLE - 1)
        assert not c.closed
    c.wait(1)
    assert c.closed
    assert [a[0] for a in c.answers()] == [200, 200, 200]


def test_configurableDeadlines() -> None:
    c = Connection(headerTimeout=2, bodyTimeout=3)
    c.send(b"POST /track HTTP/1.1\r\n")
    c.clock.advance(1.5)
    c.send(b"Content-Length: 10\r\n\r\n")
    c.clock.advance(2.5)
    assert not c.closed
    c.clock.advance(1)
    assert c.answers()[0][0] == 408


# -- pipelining -----------------------------------------------------------------


def test_pipelined() -> None:
    """
    Pipelined requests, good and bad, are answered in order on one
    connection, in one write from the client.
    """
    c = Connection()
    c.send(
        get(GOOD)
        + post(b"/track?verbose=1", b"data=not-json!")
        + get(b"/nowhere")
        + post(b"/engage", b"data=" + b'{"$token":"t","$distinct_id":"d","$set":{"a":1}}')
        + get(GOOD)
    )
    statuses = [a[0] for a in c.answers()]
    assert statuses == [200, 200, 404, 200, 200]
    assert json.loads(c.answers()[1][2])["status"] == 0
    assert [k for k, _ in c.funnel.stored] == ["track", "engage", "track"]
    assert not c.closed


def test_pipelinedThenTooLarge() -> None:
    c = Connection()
    c.send(get(GOOD) + b"POST /track HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n" + b"x" * 1000)
    assert [a[0] for a in c.answers()] == [200, 413]
    assert c.closed


# -- the access log -------------------------------------------------------------


def test_accessLogRedactsApiKey() -> None:
    """
    C{api_key} (the Node SDK sends it in the query) never reaches the access
    log, however its name is escaped.
    """

    class Logged:
        uri = b"/import?project_id=1&api_key=s3cret&x=1&API%5Fkey=other"
        method = b"GET"
        clientproto = b"HTTP/1.1"
        code = 401
        sentLength = 10

        def getClientAddress(self) -> IPv4Address:
            return IPv4Address("TCP", "127.0.0.1", 1)

        def getHeader(self, name: bytes) -> None:
            return None

    line = redactedLogFormatter("[now]", Logged())  # type: ignore[arg-type]
    assert "s3cret" not in line and "other" not in line
    assert "/import?project_id=1&api_key=REDACTED&x=1&API%5Fkey=REDACTED" in line
    assert Connection().site._logFormatter is redactedLogFormatter


# -- all bodies together: the budget ------------------------------------------

BUDGET = 8192
"""
A budget for these tests: large bodies (over 1000 bytes) may fill 7168 of
it, small ones all of it.
"""


def budgeted() -> Connection:
    return Connection(budget=BodyBudget(BUDGET, smallBody=1000))


def head(length: int, path: bytes = b"/track?verbose=1") -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % length


def form(size: int) -> bytes:
    """
    A form body of exactly C{size} bytes holding one good event.
    """
    body = b"data=" + EVENT.replace(b'"', b"%22") + b"&pad="
    return body + b"p" * (size - len(body))


def test_declaredBodyOverBudgetRefusedBeforeRead() -> None:
    """
    While one body holds most of the budget, another that would not fit is
    answered 503 with Retry-After as soon as its headers are in, before a
    byte of it is buffered, and without "100 Continue"; once the first is
    answered its bytes are free again.
    """
    first = budgeted()
    first.send(head(4000) + form(4000)[:2000])
    assert first.site.budget.used == 4000
    second = first.another()
    second.send(head(4000)[:-2] + b"Expect: 100-continue\r\n\r\n")
    [(status, headers, body)] = second.answers()
    assert status == 503
    assert headers[b"retry-after"] == b"1"
    assert headers[b"connection"] == b"close"
    assert json.loads(body) == {
        "status": 0,
        "error": "too many request bodies are being received at once; retry",
    }
    assert second.closed
    second.send(form(4000))
    assert first.site.budget.status() == {
        "used": 4000,
        "peak": 4000,
        "limit": BUDGET,
        "reserved_for_small": 1024,
        "refused": 1,
    }
    first.send(form(4000)[2000:])
    assert [a[0] for a in first.answers()] == [200]
    assert first.site.budget.used == 0
    third = first.another()
    third.send(head(4000) + form(4000))
    assert [a[0] for a in third.answers()] == [200]
    assert len(first.funnel.stored) == 2


def test_declaredBodyUnderBudget() -> None:
    """
    The control: with room in the budget, the same two bodies are taken.
    """
    first = Connection(budget=BodyBudget(BUDGET * 2, smallBody=1000))
    first.send(head(4000) + form(4000)[:2000])
    second = first.another()
    second.send(head(4000) + form(4000))
    assert [a[0] for a in second.answers()] == [200]


def test_smallBodiesUseTheReserve() -> None:
    """
    Large bodies leave the last eighth of the budget to small ones, so that
    SDK batches get through while a few large bodies fill it.
    """
    large = budgeted()
    large.send(head(4000) + form(4000)[:10])
    large.another().send(head(3000) + form(3000)[:10])
    small = large.another()
    small.send(head(900) + form(900))
    assert [a[0] for a in small.answers()] == [200]
    larger = large.another()
    larger.send(head(1100))
    assert [a[0] for a in larger.answers()] == [503]


def test_chunkedBodyOverBudget() -> None:
    """
    A chunked body is charged as it arrives, and refused (503) at the chunk
    that does not fit, before its end.
    """
    first = budgeted()
    first.send(head(4000) + form(4000)[:100])
    first.another().send(head(2000) + form(2000)[:100])
    second = first.another()
    second.send(chunked(b"/track?verbose=1", [b"data=" + b"x" * 495], end=False))
    assert second.answers() == []
    assert first.site.budget.used == 6500
    second.send(b"%x\r\n%s\r\n" % (1000, b"x" * 1000))
    [(status, headers, _)] = second.answers()
    assert (status, headers[b"retry-after"]) == (503, b"1")
    assert first.site.budget.used == 6000
    second.send(b"%x\r\n%s\r\n0\r\n\r\n" % (1000, b"x" * 1000))
    assert first.site.budget.used == 6000


def test_budgetReleasedWhenTheConnectionGoes() -> None:
    """
    A body never finished gives its bytes back when its connection is
    lost, whether the client leaves or the body deadline closes it.
    """
    c = budgeted()
    c.send(head(4000) + form(4000)[:100])
    c.close()
    assert c.site.budget.used == 0
    slow = c.another()
    slow.send(head(4000) + form(4000)[:100])
    slow.clock.advance(DEFAULT_HEADER_TIMEOUT + DEFAULT_BODY_TIMEOUT)
    assert [a[0] for a in slow.answers()] == [408]
    slow.close()
    assert c.site.budget.used == 0


def test_tooLargeBodyNotCharged() -> None:
    c = budgeted()
    c.send(head(MAX_BODY + 1))
    assert [a[0] for a in c.answers()] == [413]
    assert c.site.budget.status()["refused"] == c.site.budget.used == 0


# -- connections ---------------------------------------------------------------


def test_maxConnections() -> None:
    """
    Past the limit a new connection is answered 503 before it is read and
    closed, and counted; once one closes, a new one is served again.
    """
    first = Connection(maxConnections=2)
    second = first.another()
    third = first.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    transport = StringTransport()
    third.makeConnection(transport)
    assert transport.value() == (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"retry-after: 1\r\ncontent-length: 21\r\nconnection: close\r\n\r\n"
        b"too many connections\n"
    )
    assert transport.disconnecting
    assert first.site.status()["connections"] == {"open": 2, "limit": 2, "refused": 1}
    second.close()
    fourth = first.another()
    fourth.send(get(GOOD))
    assert [a[0] for a in fourth.answers()] == [200]
    assert first.site.status()["connections"] == {"open": 2, "limit": 2, "refused": 1}
