"""
An in-test Kestrel server: the memcache text protocol with Kestrel's queue
semantics, on a loopback port, with knobs for the failures a producer must
survive.

It is strict where Kestrel (or a compatible server) may be: commands are
lower case, single-spaced, without C{noreply}, or they are refused.  So a
client that passes against it sends what a real Kestrel accepts, and the
knobs make the failures reproducible:

  - C{maxItems}, C{maxItemSize}, C{shuttingDown}: C{set} answers
    C{NOT_STORED}, as Kestrel does for a full queue, a too-large item or
    during shutdown;
  - C{readOnly}: C{set} answers C{SERVER_ERROR} and the server hangs up;
  - C{vanishAfterSets}: the server answers that many more C{set}s, then
    hangs up on the next one without storing or answering it (a crash in
    the middle of a pipeline);
  - C{delay}: every answer is sent that many seconds late (a slow server);
  - L{KestrelDouble.stop} and L{KestrelDouble.listen}: the server goes away
    and comes back on the same port.

Facts from twitter-archive/kestrel (MemcacheHandler.scala,
PersistentQueue.scala): C{get q[/t=ms][/open|/close|/abort|/peek]}, where
C{/t=} waits that long for an item; C{VALUE} lines carry the bare queue
name; an item opened by a connection returns to the head of its queue when
that connection closes.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.protocols.memcache import MemCacheProtocol

__all__ = ["KestrelDouble", "deleteQueue", "drain"]

_QUEUE = re.compile(rb"\A[A-Za-z0-9_-]{1,250}\Z")
_NUMBER = re.compile(rb"\A[0-9]{1,10}\Z")
_GET_OPTIONS = {b"open", b"close", b"abort", b"peek"}


class _Connection(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1024

    def __init__(self, server: KestrelDouble) -> None:
        self.server = server
        self._pendingSet: tuple[bytes, int] | None = None
        self._data = bytearray()
        self._open: dict[bytes, bytes] = {}
        self._gone = False
        self._closed = False

    def connectionMade(self) -> None:
        self.server.connections.add(self)

    def connectionLost(self, reason: Any = None) -> None:
        self._closed = True
        self.server.connections.discard(self)
        # Kestrel returns an open (unconfirmed) item to the head of its queue.
        for queue, item in self._open.items():
            self.server.queue(queue).appendleft(item)
        self._open.clear()

    def _answer(self, data: bytes) -> None:
        if self.server.delay:
            self.server.later(self.server.delay, self._write, data)
        else:
            self._write(data)

    def _write(self, data: bytes) -> None:
        if not self._gone:
            self.transport.write(data)

    def _hangUp(self) -> None:
        self._gone = True
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        if self._gone:
            return
        self.server.lines.append(line)
        words = line.split(b" ")
        command = words[0]
        handler = (
            getattr(self, "do_" + command.decode("latin-1"), None) if command.islower() else None
        )
        if handler is None:
            self._answer(b"ERROR\r\n")
            return
        if any(not w for w in words):
            self._answer(b"CLIENT_ERROR bad command line\r\n")
            return
        handler(words[1:])

    def rawDataReceived(self, data: bytes) -> None:
        assert self._pendingSet is not None
        queue, length = self._pendingSet
        self._data += data
        if len(self._data) < length + 2:
            return
        item, rest = bytes(self._data[:length]), bytes(self._data[length + 2 :])
        terminator = bytes(self._data[length : length + 2])
        self._pendingSet = None
        self._data = bytearray()
        self.setLineMode()
        if terminator != b"\r\n":
            self._answer(b"CLIENT_ERROR bad data chunk\r\n")
        else:
            self._stored(queue, item)
        if rest and not self._gone:
            self.dataReceived(rest)

    def _stored(self, queue: bytes, item: bytes) -> None:
        server = self.server
        server.setsReceived += 1
        if server.vanishAfterSets is not None:
            if server.vanishAfterSets == 0:
                self._hangUp()
                return
            server.vanishAfterSets -= 1
        if server.readOnly:
            self._answer(b"SERVER_ERROR Server is read-only\r\n")
            self._hangUp()
            return
        q = server.queue(queue)
        if (
            server.shuttingDown
            or (server.maxItems is not None and len(q) >= server.maxItems)
            or (server.maxItemSize is not None and len(item) > server.maxItemSize)
        ):
            self._answer(b"NOT_STORED\r\n")
            return
        q.append(item)
        self._answer(b"STORED\r\n")

    def do_set(self, args: list[bytes]) -> None:
        if (
            len(args) != 4
            or not _QUEUE.match(args[0])
            or not all(_NUMBER.match(a) for a in args[1:])
        ):
            self._answer(b"CLIENT_ERROR bad command line\r\n")
            return
        self._pendingSet = (args[0], int(args[3]))
        self.setRawMode()

    def do_get(self, args: list[bytes]) -> None:
        if len(args) != 1:
            self._answer(b"CLIENT_ERROR bad command line\r\n")
            return
        name, *options = args[0].split(b"/")
        flags = {o for o in options if not o.startswith(b"t=")}
        if not _QUEUE.match(name) or not flags <= _GET_OPTIONS:
            self._answer(b"CLIENT_ERROR bad queue name or option\r\n")
            return
        waits = [int(o[2:]) for o in options if o.startswith(b"t=") and o[2:].isdigit()]
        q = self.server.queue(name)
        if b"close" in flags or b"abort" in flags:
            item = self._open.pop(name, None)
            if item is not None and b"abort" in flags:
                q.appendleft(item)
        if b"open" in flags and name in self._open:
            self._answer(b"CLIENT_ERROR Transaction already open\r\n")
            return
        if flags & {b"close", b"abort"} and not flags & {b"open", b"peek"}:
            self._answer(b"END\r\n")
            return
        deadline = self.server.reactor.seconds() + waits[0] / 1000 if waits else None
        self._fetch(name, flags, deadline)

    def _fetch(self, name: bytes, flags: set[bytes], deadline: float | None) -> None:
        """
        Answer a get with the head item, waiting for one until C{deadline}
        (C{/t=}) without reading further commands meanwhile, as Kestrel
        handles a connection's requests one at a time.
        """
        if self._closed:
            return
        q = self.server.queue(name)
        if not q and deadline is not None and self.server.reactor.seconds() < deadline:
            if not self.paused:
                self.pauseProducing()
            self.server.later(0.01, self._fetch, name, flags, deadline)
            return
        item = None
        if b"peek" in flags:
            item = q[0] if q else None
        elif q:
            item = q.popleft()
            if b"open" in flags:
                self._open[name] = item
        if item is None:
            self._answer(b"END\r\n")
        else:
            self._answer(b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (name, len(item), item))
        if self.paused:
            self.resumeProducing()

    def _oneQueue(self, args: list[bytes]) -> bytes | None:
        if len(args) != 1 or not _QUEUE.match(args[0]):
            self._answer(b"CLIENT_ERROR bad command line\r\n")
            return None
        return args[0]

    def do_delete(self, args: list[bytes]) -> None:
        name = self._oneQueue(args)
        if name is not None:
            self.server.queues.pop(name, None)
            self._answer(b"DELETED\r\n")

    def do_flush(self, args: list[bytes]) -> None:
        name = self._oneQueue(args)
        if name is not None:
            self.server.queue(name).clear()
            self._answer(b"END\r\n")

    def do_flush_all(self, args: list[bytes]) -> None:
        for q in self.server.queues.values():
            q.clear()
        self._answer(b"Flushed all queues.\r\n")

    def do_version(self, args: list[bytes]) -> None:
        self._answer(b"VERSION 2.4.1-double\r\n")

    def do_stats(self, args: list[bytes]) -> None:
        lines = [b"STAT curr_connections %d" % len(self.server.connections)]
        for name, q in sorted(self.server.queues.items()):
            lines.append(b"STAT queue_%s_items %d" % (name, len(q)))
            lines.append(b"STAT queue_%s_bytes %d" % (name, sum(map(len, q))))
        self._answer(b"\r\n".join([*lines, b"END"]) + b"\r\n")


class KestrelDouble(Factory):
    """
    The server: queues shared by all connections, plus the knobs.
    """

    noisy = False

    def __init__(self, reactor: Any = globalReactor) -> None:
        self.reactor = reactor
        self.queues: dict[bytes, deque[bytes]] = {}
        self.connections: set[_Connection] = set()
        self.lines: list[bytes] = []
        self.setsReceived = 0
        self.maxItems: int | None = None
        self.maxItemSize: int | None = None
        self.shuttingDown = False
        self.readOnly = False
        self.vanishAfterSets: int | None = None
        self.delay = 0.0
        self.port = 0
        self._listening: IListeningPort | None = None
        self._delayed: list[IDelayedCall] = []

    def buildProtocol(self, addr: object) -> _Connection:
        return _Connection(self)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def queue(self, name: bytes) -> deque[bytes]:
        return self.queues.setdefault(name, deque())

    def items(self, name: str) -> list[bytes]:
        return list(self.queues.get(name.encode(), ()))

    def later(self, delay: float, f: Any, *args: Any) -> None:
        self._delayed = [c for c in self._delayed if c.active()]
        self._delayed.append(self.reactor.callLater(delay, f, *args))

    def listen(self) -> int:
        """
        Start listening on loopback, on the same port as before if there was
        one, so clients configured with it find the server again.
        """
        self._listening = self.reactor.listenTCP(self.port, self, interface="127.0.0.1")
        self.port = self._listening.getHost().port
        return self.port

    def stop(self) -> Deferred[Any]:
        """
        Stop listening and drop every connection, as a crashed server would.
        """
        for call in self._delayed:
            if call.active():
                call.cancel()
        self._delayed = []
        for conn in list(self.connections):
            conn.transport.abortConnection()
        if self._listening is None:
            return succeed(None)
        listening, self._listening = self._listening, None
        return maybeDeferred(listening.stopListening)


async def drain(address: tuple[str, int], queue: str) -> list[bytes]:
    """
    Read C{queue} empty over the wire with plain C{get}s, which Twisted's
    L{MemCacheProtocol} parses (only C{get}s with options are beyond it):
    the same read-back works on the double and on a real Kestrel.
    """
    host, port = address
    proto = await connectProtocol(
        TCP4ClientEndpoint(globalReactor, host, port, timeout=5), MemCacheProtocol()
    )
    items = []
    try:
        while True:
            _, value = await proto.get(queue.encode())
            if value is None:
                return items
            items.append(value)
    finally:
        proto.transport.loseConnection()


async def deleteQueue(address: tuple[str, int], queue: str) -> None:
    host, port = address
    proto = await connectProtocol(
        TCP4ClientEndpoint(globalReactor, host, port, timeout=5), MemCacheProtocol()
    )
    try:
        await proto.delete(queue.encode())
    finally:
        proto.transport.loseConnection()
