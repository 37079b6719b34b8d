"""
The twisted.web plumbing under the Klein routes, hardened for the open
internet:

 - a body declared (C{Content-Length}) or growing (chunked) past C{maxBody} is
   answered at once, in the style the request asked for, without buffering
   it; the rest is read and thrown away for a moment so that the client sees
   the answer rather than a reset, then the connection is closed;
 - so is a body that does not fit in the site's L{BodyBudget} (all the
   bodies being received at once), answered 503 by the handler;
 - past C{maxConnections} open connections, a new one is answered 503 and
   closed before it is read;
 - a request must arrive in time: its line and headers within
   C{headerTimeout} of its first byte (or of the connection), its body within
   C{bodyTimeout} of its headers, however slowly it trickles (slowloris);
   otherwise C{408};
 - a request line or header section over C{MAX_HEAD_BYTES}, or more than
   C{MAX_HEADERS} headers, is answered C{414} or C{431} and closed; anything
   else malformed C{400}, each with a one-line reason;
 - Twisted's own parsing of form bodies into C{request.args} is off (the
   decoder parses forms itself, with a field limit: Twisted's has none and a
   10 MB form costs it seconds and hundreds of MB);
 - HTTP/1.1 only, with pipelining: requests on one connection are answered in
   order, and reading stops while one is being handled;
 - no per-request access log unless asked for (it costs about 15% of
   throughput), and then with C{api_key} values redacted.
"""

from __future__ import annotations

import io
import time
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import unquote, unquote_to_bytes

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web import http, resource
from twisted.web.http import HTTPChannel, combinedLogFormatter
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from twisted.web.server import version as serverVersion

from mixingest.budget import BodyBudget
from mixingest.defaults import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_CONNECTIONS,
)

__all__ = [
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "HardenedSite",
    "IngestChannel",
    "IngestRequest",
]

MAX_HEAD_BYTES = 16 * 1024
"""
Largest request line, and largest request line plus headers, in bytes.
"""
MAX_HEADERS = 100
"""
Most header lines in one request; browsers send about fifteen.
"""
CONNECTIONS_RETRY_AFTER = 1
LINGER_SECONDS = 5
"""
How long the unread rest of a refused body is read and thrown away, so that a
client still sending sees the answer instead of a connection reset.
"""

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


class _Discard:
    """
    Where the rest of an oversized body goes: nowhere.
    """

    def write(self, data: bytes) -> None:
        pass

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


_TARGET_BYTES = bytes(range(33, 177))
"""
The bytes Twisted lets into a request target: its check refuses any byte
C{c <= 32 or c > 176}.
"""
_twistedParseRequestLine: Optional[Callable[[bytes], Tuple[bytes, bytes, bytes]]] = getattr(
    http, "_parseRequestLine", None
)


def _parseRequestLine(line: bytes) -> Tuple[bytes, bytes, bytes]:
    """
    Twisted's parse of a request line, with its check of the request target
    done by one C{bytes.translate} instead of a Python loop over every byte
    (some 10 us for an SDK's base64 query, a twentieth of a single event's
    request).  Twisted still checks the method, the version and the line's
    shape, given a one-byte target; a target the C check does not pass
    (empty, or with a byte Twisted refuses) goes to Twisted whole, which
    refuses it as it always has.
    """
    assert _twistedParseRequestLine is not None
    parts = line.split(b" ")
    if len(parts) == 3 and parts[1] and not parts[1].translate(None, _TARGET_BYTES):
        method, _, version = _twistedParseRequestLine(parts[0] + b" / " + parts[2])
        return method, parts[1], version
    return _twistedParseRequestLine(line)


if _twistedParseRequestLine is not None:  # pragma: no branch - every Twisted tested
    # HTTPChannel calls the module's function: no subclass can swap it.
    http._parseRequestLine = _parseRequestLine


_date = [0, b""]


def _httpDate() -> bytes:
    """
    The HTTP Date header's value for now, formatted once a second.
    """
    now = int(time.time())
    if now != _date[0]:
        _date[1] = http.datetimeToString(now)
        _date[0] = now
    return _date[1]  # type: ignore[return-value]


class IngestRequest(Request):
    """
    A request whose body is kept in memory up to the site's C{maxBody}, and
    charged to the site's L{BodyBudget} until the request is answered; past
    either the body is discarded and, on an L{IngestChannel}, the request is
    answered at once (the handler sees C{bodyTooLarge} and answers 413, or
    C{bodyOverBudget} and answers 503).

    @ivar bodyTooLarge: the body was (or was declared) over the limit.
    @ivar bodyOverBudget: the body did not fit in the budget.
    """

    bodyTooLarge = False
    bodyOverBudget = False
    _budget: Optional[BodyBudget] = None
    _claimed = 0

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # twisted.web's, less its parse of the query into request.args, which
        # nothing reads (the decoder parses the query itself, with limits):
        # some 4 us for an SDK's base64 query.
        self.content.seek(0, 0)  # type: ignore[attr-defined]
        self.args = {}  # type: ignore[assignment]
        self.method, self.uri = command, path
        self.clientproto = version
        self.path = path.split(b"?", 1)[0]
        self.process()

    def process(self) -> None:
        # twisted.web.server.Request.process, with the Date header formatted
        # once a second instead of for every request (some 4 us).
        self.site = self.channel.site  # type: ignore[attr-defined]
        self.setHeader(b"Server", serverVersion)
        self.setHeader(b"Date", _httpDate())
        self.prepath = []
        # http.unquote is unquote_to_bytes, reached through twisted.web.http's
        # deprecation proxy, whose attribute lookup costs more than the call.
        self.postpath = list(map(unquote_to_bytes, self.path[1:].split(b"/")))
        if self.path == b"*":
            self._handleStar()
            return
        try:
            found = self.site.getResourceFor(self)
            if resource._IEncodingResource.providedBy(found):
                encoder = found.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(found)
        except BaseException:
            self.processingFailed(Failure())

    def _maxBody(self) -> int:
        site = getattr(self.channel, "site", None)
        return getattr(site, "maxBody", DEFAULT_MAX_BODY)

    def admitBody(self, length: int) -> bool:
        """
        Claim a declared body's whole length from the site's budget, before
        a byte of it is read; if it does not fit, the body is refused.
        """
        if self._claim(length, length):
            return True
        self._discardBody(overBudget=True)
        return False

    def _claim(self, size: int, bodySize: int) -> bool:
        budget = getattr(getattr(self.channel, "site", None), "budget", None)
        if budget is None:
            return True
        if not budget.claim(size, bodySize):
            return False
        self._budget = budget
        self._claimed += size
        return True

    def _release(self) -> None:
        """
        Free the body and give its bytes back to the budget: the request is
        answered, refused or gone.
        """
        if self.content is not None:
            self.content.close()
        if self._budget is not None:
            self._budget.release(self._claimed)
            self._budget = None
            self._claimed = 0

    def _discardBody(self, overBudget: bool) -> None:
        if overBudget:
            self.bodyOverBudget = True
        else:
            self.bodyTooLarge = True
        self._release()
        self.content = _Discard()  # type: ignore[assignment]

    def gotLength(self, length: Optional[int]) -> None:
        if length and length > self._maxBody():
            self._discardBody(overBudget=False)
            return
        self.content = io.BytesIO()  # type: ignore[assignment]

    def handleContentChunk(self, data: bytes) -> None:
        if self.bodyTooLarge or self.bodyOverBudget:
            return
        content: Any = self.content
        size = content.tell() + len(data)
        if size > self._maxBody():
            self._discardBody(overBudget=False)
        elif size > self._claimed and not self._claim(size - self._claimed, size):
            # A chunked body (a declared one was claimed whole) growing
            # past what the budget has left.
            self._discardBody(overBudget=True)
        else:
            content.write(data)
            return
        refuse = getattr(self.channel, "refuseBody", None)
        if refuse is not None:
            refuse()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._release()

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._release()


class IngestChannel(HTTPChannel):
    """
    An HTTP/1.1 channel with deadlines, bounded heads and early refusal of
    oversized bodies.  See the module docstring for the rules.

    The deadlines reuse the channel's one timer: it is set to C{headerTimeout}
    when the connection opens and when a request starts, to C{bodyTimeout}
    when its headers are in; bytes arriving meanwhile do not push the
    deadline back.  Between requests it ticks every C{headerTimeout} (or
    less) until the idle timeout has passed, so that a request's start never
    has to move it sooner.
    """

    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEAD_BYTES
    MAX_LENGTH = MAX_HEAD_BYTES
    headerTimeout: float = DEFAULT_HEADER_TIMEOUT
    bodyTimeout: float = DEFAULT_BODY_TIMEOUT
    lingerTimeout: float = LINGER_SECONDS
    maxBody = DEFAULT_MAX_BODY
    site: Any
    """
    The L{HardenedSite} that built the channel (twisted.web sets it).
    """

    _receiving = False
    """
    Between the first byte of a request and its last.
    """
    _refusing = False
    """
    The request's body is refused: it was answered early, whatever else the
    client sends is thrown away, and the connection closes.
    """
    _idleTimeout: Optional[float] = None
    _idleElapsed = 0.0
    _discarded = 0
    _lingerCall: Optional[IDelayedCall] = None
    _secure: Optional[bool] = None
    _host: Optional[IAddress] = None
    _peer: Optional[IAddress] = None

    def connectionMade(self) -> None:
        self.site.openConnections += 1
        self._idleTimeout = self.timeOut
        # The first request's head is due within headerTimeout of the
        # connection: one that never sends a byte holds a socket no longer
        # than one that sends slowly.
        self._receiving = True
        self.timeOut = self.headerTimeout  # type: ignore[assignment]
        super().connectionMade()

    def isSecure(self) -> bool:
        # Asked twice a request (Klein builds the URL from it), and each time
        # twisted.web adapts the transport to ISSLTransport; a connection's
        # transport does not change.
        secure = self._secure
        if secure is None:
            secure = self._secure = super().isSecure()
        return secure

    def getHost(self) -> IAddress:
        # Each request asks: a getsockname() and a new address object each
        # time, for an address that is fixed for the connection's life.
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def getPeer(self) -> IAddress:
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()
        return peer

    def dataReceived(self, data: bytes) -> None:
        if self._refusing:
            self._discarded += len(data)
            if self._discarded > self.maxBody:
                transport: Any = self.transport
                transport.abortConnection()
            return
        if not self._receiving and not self._handlingRequest:
            # A request starts: its head is due within headerTimeout.  While
            # idle the timer ticks at most every headerTimeout (see
            # timeoutConnection), so this only ever moves it later: moving a
            # timer sooner costs Twisted a linear search of every timer.
            self._receiving = True
            self._idleElapsed = 0.0
            self.timeOut = self.headerTimeout  # type: ignore[assignment]
            self.resetTimeout()
        LineReceiver.dataReceived(self, data)

    def rawDataReceived(self, data: bytes) -> None:
        if self._refusing:
            return
        super().rawDataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        # A line over MAX_LENGTH (= totalHeadersSize, so the request line
        # can only be refused here).
        if self._receivedHeaderSize == 0:
            self._answer(414, f"request line longer than {self.totalHeadersSize} bytes")
        else:
            self._answer(431, f"request headers larger than {self.totalHeadersSize} bytes")

    def allHeadersReceived(self) -> None:
        length = self.length
        request = self.requests[-1]
        if length is not None and length > self.maxBody:
            # Declared too large: answer now, before a byte of it is read,
            # and without "100 Continue".
            request.gotLength(length)
            self._startRefusing(request)
            self.length = 0
            return
        if length and not request.admitBody(length):
            # No room for it now: the same, answered 503.
            self._startRefusing(request)
            self.length = 0
            return
        super().allHeadersReceived()
        if self.length != 0:
            self.timeOut = self.bodyTimeout  # type: ignore[assignment]
            self.resetTimeout()

    def refuseBody(self) -> None:
        """
        The body being received went over the limit or the budget (chunked,
        or longer than declared): answer now and stop reading it.
        """
        if self._refusing:
            return
        self._startRefusing(self.requests[-1])
        self.allContentReceived()

    def _startRefusing(self, request: Request) -> None:
        self._refusing = True
        self.persistent = False
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    def _finishRequestBody(self, data: bytes) -> None:
        if self._refusing:
            return
        super()._finishRequestBody(data)

    def allContentReceived(self) -> None:
        self._receiving = False
        # The request's deadline is met.  twisted.web cancels the timer here
        # and, once the answer is out, restarts it with the period it saves
        # here: the idle tick.
        idle = self._idleTimeout
        tick = self.headerTimeout if idle is None or idle > self.headerTimeout else idle
        self.timeOut = tick  # type: ignore[assignment]
        super().allContentReceived()

    def _idleTick(self) -> float:
        idle = self._idleTimeout
        if idle is None:
            return self.headerTimeout
        return min(self.headerTimeout, idle - self._idleElapsed)

    def timeoutConnection(self) -> None:
        if self._receiving:
            self._answer(408, "request not received in time")
            return
        # Idle between requests: the keep-alive timeout is counted in ticks
        # of at most headerTimeout.
        self._idleElapsed += self.timeOut or 0
        idle = self._idleTimeout
        if idle is not None and self._idleElapsed >= idle - 1e-6:
            super().timeoutConnection()
            return
        self.setTimeout(self._idleTick())

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web counts a header (its size, or one more header) before
        # it refuses it: the counters tell a head too large from a bad one.
        if self._receivedHeaderSize > self.totalHeadersSize:
            self._answer(431, f"request headers larger than {self.totalHeadersSize} bytes")
        elif self._receivedHeaderCount > self.maxHeaders:
            self._answer(431, f"more than {self.maxHeaders} request headers")
        else:
            self._answer(400, "malformed request line, header or chunked body")

    def _answer(self, status: int, reason: str) -> None:
        """
        Answer a request refused before it could reach a handler, and close.
        Nothing else is being written then: a request is parsed only once
        the one before it has been answered.
        """
        self._receiving = False
        self.persistent = False
        body = reason.encode("ascii") + b"\n"
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, _REASONS[status], len(body), body)
        )
        self.setTimeout(None)
        self.loseConnection()
        if self.abortTimeout is not None and self._abortingCall is None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def loseConnection(self) -> None:
        transport = self.transport
        if self._refusing and isinstance(transport, FileDescriptor):
            # Lingering close: send the answer and a FIN, keep reading (and
            # discarding) for a moment so that the client, which may still
            # be sending, reads the answer instead of a reset.
            self._networkProducer.unregisterProducer()
            transport.loseWriteConnection()
            if self._lingerCall is None:
                self._lingerCall = self.callLater(self.lingerTimeout, transport.loseConnection)
            return
        super().loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._lingerCall is not None and self._lingerCall.active():
            self._lingerCall.cancel()
        self._lingerCall = None
        self.site.openConnections -= 1
        super().connectionLost(reason)


class _TooManyConnections(Protocol):
    """
    A connection past the site's limit: answered 503 before it is read,
    and closed.
    """

    _ANSWER = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"retry-after: %d\r\ncontent-length: 21\r\nconnection: close\r\n\r\n"
        b"too many connections\n" % CONNECTIONS_RETRY_AFTER
    )

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self._ANSWER)
        transport.loseConnection()


def _redactQuery(uri: bytes) -> bytes:
    mark = uri.find(b"?")
    if mark < 0:
        return uri
    fields = uri[mark + 1 :].split(b"&")
    for i, field in enumerate(fields):
        name, sep, _ = field.partition(b"=")
        if sep and unquote(name.decode("latin-1")).lower() == "api_key":
            fields[i] = name + b"=REDACTED"
    return uri[: mark + 1] + b"&".join(fields)


class _RedactedRequest:
    """
    A request as the access log sees it: secrets in the query replaced.
    """

    def __init__(self, request: Request) -> None:
        self._request = request
        self.uri = _redactQuery(request.uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def redactedLogFormatter(timestamp: str, request: Request) -> str:
    """
    Twisted's combined log format, without C{api_key} values.
    """
    return combinedLogFormatter(timestamp, _RedactedRequest(request))


class HardenedSite(Site):
    """
    A site fit for the open internet, under the public API's and the admin
    endpoints': bounded heads and bodies, deadlines, no access log unless
    C{accessLog}.

    @ivar budget: the bodies being received, all connections together.
    @ivar openConnections: connections open now (served ones).
    @ivar refusedConnections: connections refused past C{maxConnections},
        since the start.
    """

    requestFactory = IngestRequest
    protocol = IngestChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        maxBody: int = DEFAULT_MAX_BODY,
        accessLog: bool = False,
        timeout: Optional[float] = DEFAULT_IDLE_TIMEOUT,
        headerTimeout: float = DEFAULT_HEADER_TIMEOUT,
        bodyTimeout: float = DEFAULT_BODY_TIMEOUT,
        budget: Optional[BodyBudget] = None,
        maxConnections: int = DEFAULT_MAX_CONNECTIONS,
        **kwargs: Any,
    ) -> None:
        """
        @param budget: the bodies being received at once; by default one of
            L{DEFAULT_MAX_BUFFERED<mixingest.defaults.DEFAULT_MAX_BUFFERED>}.
        @param maxConnections: open connections past which new ones are
            answered 503 and closed.
        """
        if not (headerTimeout > 0 and bodyTimeout > 0):
            raise ValueError("header and body timeouts must be positive")
        if maxConnections <= 0:
            raise ValueError("the connection limit must be positive")
        kwargs.setdefault("logFormatter", redactedLogFormatter)
        super().__init__(resource, timeout=timeout, **kwargs)
        # Twisted (24.7+) gives each request this setting of the site's,
        # overriding IngestRequest's class attribute: without it every form
        # POST is parsed twice, once for nothing (about 100 us for a batch).
        self._parsePOSTFormSubmission = False
        self.maxBody = maxBody
        self.accessLog = accessLog
        self.headerTimeout = headerTimeout
        self.bodyTimeout = bodyTimeout
        self.budget = budget if budget is not None else BodyBudget()
        self.maxConnections = maxConnections
        self.openConnections = 0
        self.refusedConnections = 0

    def buildProtocol(self, addr: Optional[IAddress]) -> Any:
        if self.openConnections >= self.maxConnections:
            self.refusedConnections += 1
            return _TooManyConnections()
        channel = super().buildProtocol(addr)
        channel.maxBody = self.maxBody
        channel.headerTimeout = self.headerTimeout
        channel.bodyTimeout = self.bodyTimeout
        return channel

    def log(self, request: http.Request) -> None:
        if self.accessLog:
            super().log(request)

    def status(self) -> Dict[str, Any]:
        """
        Connections and the body budget, JSON-able, for C{/stats}.
        """
        return {
            "connections": {
                "open": self.openConnections,
                "limit": self.maxConnections,
                "refused": self.refusedConnections,
            },
            "bodies": self.budget.status(),
        }
