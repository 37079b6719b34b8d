# -*- test-case-name: tests.test_kestrel_queue,tests.test_kestrel_writer -*-
"""
Kestrel servers as the event queue.

Kestrel speaks the memcache text protocol and a queue write is a plain
C{set <queue> 0 0 <n>}.  A batch's C{set}s go out in one write and the
answers are counted in order against it: one pending entry and one
Deferred per batch.  Twisted's
L{MemCacheProtocol<twisted.protocols.memcache.MemCacheProtocol>} speaks the
same C{set} but costs a command object, a Deferred and two transport writes
per item: in process, batches of 50 cost 11.7 microseconds of CPU per event
through it and 1.4 through the protocol here
(C{scripts/bench.d/kestrel_writer.py}).  mixingest only ever writes, so it
needs nothing more of the protocol.

Kestrel servers never talk to each other: a cluster is a list of servers
that each hold part of every queue, and the client picks one per write.
This client keeps a pool of persistent connections to each server,
spreads writes round-robin over the healthy ones, and when a server fails
a write (connection refused or dropped, timeout, an error answer) marks it
down for an exponential backoff with jitter and retries the items it did
not acknowledge on another server.  A refusal (C{NOT_STORED}: queue full,
item too big, server shutting down) leaves the server up but is also
retried elsewhere, since another server's queue may have room.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any, Callable, Mapping, Sequence, cast

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    TimeoutError,
    fail,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.memcache import ClientError, NoSuchCommand, ServerError
from twisted.python.failure import Failure
from zope.interface import implementer

from mixingest.errors import QueueUnavailable
from mixingest.naming import validQueueName

__all__ = ["DEFAULT_PORT", "KestrelQueue"]

DEFAULT_PORT = 22133

DEFAULT_WRITE_TIMEOUT = 5.0
"""Seconds without an answer to a pending C{set} before the server counts as failed."""

DEFAULT_CONNECT_TIMEOUT = 5.0


def defaultBackoff() -> Callable[[int], float]:
    """
    Seconds to wait after the Nth consecutive failure: 1 s doubling to 30 s,
    plus up to a quarter second of jitter so that many daemons that lost the
    same server do not all come back at the same instant.
    """
    return backoffPolicy(
        initialDelay=0.5, maxDelay=30.0, factor=2.0, jitter=lambda: random.uniform(0, 0.25)
    )


class UnexpectedReply(Exception):
    """
    The server sent something that answers no C{set}: the connection is out
    of step, and none of its later answers can be matched to a C{set}.
    """


class _Batch:
    """
    One batch of C{set}s in flight: how many have been answered, which of
    those were not stored and how many of these were refused, and the
    first error, if any.
    """

    __slots__ = ("answered", "done", "error", "refusals", "size", "unstored")

    def __init__(self, size: int) -> None:
        self.size = size
        self.answered = 0
        self.unstored: list[int] = []
        self.refusals = 0
        self.error: Failure | None = None
        self.done: Deferred[_Batch] = Deferred()

    def settle(self, error: Failure | None = None) -> None:
        """
        Report the batch: answered in full, or (with C{error}) never to be
        answered beyond C{answered}.  An earlier error stays the cause.
        """
        if self.error is None:
            self.error = error
        self.done.callback(self)


class _KestrelProtocol(Protocol):
    """
    A pipelined writer of C{set}s that counts the answers.

    A batch goes out as one write and its answers are matched to it in
    order: C{STORED}, C{NOT_STORED} and C{SERVER_ERROR} answer the next
    C{set} of the oldest pending batch.  C{SERVER_ERROR} fails the batch
    (the server is broken) but keeps the stream in step: Kestrel hangs up
    after it, and memcached goes on answering the C{set}s that follow, which
    are counted.  After C{CLIENT_ERROR}, C{ERROR} or any other line the
    answers can no longer be matched to their C{set} with certainty: every
    pending batch fails and the connection is aborted.

    The timeout is per write: it fires when a pending batch has had no
    answer for C{timeOut} seconds (every answer restarts it) and fails every
    pending batch.  The connection is then aborted rather than closed
    politely, because a server that stopped answering may also have stopped
    reading.
    """

    MAX_LENGTH = 1024
    """The longest answer line accepted: error texts are short."""

    def __init__(self, server: _Server, timeOut: float) -> None:
        self.server = server
        self.timeOut = timeOut
        self.pending = 0
        self._closed = False
        self._batches: deque[_Batch] = deque()
        self._buffer = b""
        self._timer: IDelayedCall | None = None

    def store(self, queue: bytes, items: list[bytes]) -> Deferred[_Batch]:
        """
        Send C{set <queue> 0 0 <n>} and the item, for every item, in one
        write.  The length prefix frames each item, so items may hold any
        bytes, CR LF included.

        @param queue: a valid queue name (L{validQueueName}): a space or a
            line break in it would put the wire out of step.
        @return: fires with the batch once every item is answered or none of
            the rest will be (its C{error} then says why); never fails.
        """
        batch = _Batch(len(items))
        if self._closed:
            batch.settle(Failure(ConnectionDone("not connected")))
            return batch.done
        prefix = b"set " + queue + b" 0 0 "
        cast(ITransport, self.transport).write(
            b"".join([b"%s%d\r\n%s\r\n" % (prefix, len(item), item) for item in items])
        )
        if self._timer is None:
            self._timer = self.server.clock.callLater(self.timeOut, self._timedOut)
        self._batches.append(batch)
        return batch.done

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        *lines, self._buffer = (self._buffer + data).split(b"\r\n")
        if len(self._buffer) > self.MAX_LENGTH:
            self._break(UnexpectedReply(f"an answer line over {self.MAX_LENGTH} bytes"))
            return
        batches = self._batches
        for line in lines:
            if not batches:
                self._break(UnexpectedReply(f"an answer to no set: {line[:80]!r}"))
                return
            batch = batches[0]
            if line != b"STORED":
                if line == b"NOT_STORED":
                    batch.refusals += 1
                elif line.startswith(b"SERVER_ERROR"):
                    batch.error = batch.error or Failure(_answerError(line))
                else:
                    self._break(_answerError(line))
                    return
                batch.unstored.append(batch.answered)
            batch.answered += 1
            if batch.answered == batch.size:
                batches.popleft()
                batch.settle()
        if lines and self._timer is not None:
            if batches:
                self._timer.reset(self.timeOut)
            else:
                self._timer.cancel()
                self._timer = None

    def connectionMade(self) -> None:
        # A batch is one write: Nagle's algorithm would only hold back the
        # next batch until the server acknowledges the previous one.
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self.server.connectionMade(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._close(reason)

    def _timedOut(self) -> None:
        self._timer = None
        self._break(TimeoutError(f"no answer for {self.timeOut:g} s"))

    def _break(self, error: Exception) -> None:
        self._close(Failure(error))
        cast(ITCPTransport, self.transport).abortConnection()

    def _close(self, reason: Failure) -> None:
        """
        Fail every pending batch, then leave the server's pool: the pending
        batches report the cause first, and the pool stops offering this
        connection at once rather than when the abort completes.
        """
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batches, self._batches = self._batches, deque()
        for batch in batches:
            batch.settle(reason)
        self.server.connectionLost(self, reason)


def _answerError(line: bytes) -> Exception:
    """
    The exception for an error answer, named as Twisted's memcache client
    names them, so that a server's status reads the same.
    """
    kind, _, text = line.partition(b" ")
    message = text[:200].decode("utf-8", "replace")
    if kind == b"SERVER_ERROR":
        return ServerError(message)
    if kind == b"CLIENT_ERROR":
        return ClientError(message)
    if kind == b"ERROR":
        return NoSuchCommand("ERROR")
    return UnexpectedReply(f"unexpected answer {line[:80]!r}")


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, server: _Server, timeOut: float) -> None:
        self.server = server
        self.timeOut = timeOut

    def buildProtocol(self, addr: object) -> Protocol:
        proto = _KestrelProtocol(self.server, self.timeOut)
        proto.factory = self
        return proto


@implementer(IStreamClientEndpoint)
class _ObservedEndpoint:
    """
    An endpoint that reports failed connection attempts: L{ClientService}
    retries them silently, but a refused connection is a health change.
    """

    def __init__(
        self, endpoint: IStreamClientEndpoint, onFailure: Callable[[Failure], None]
    ) -> None:
        self._endpoint = endpoint
        self._onFailure = onFailure

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        return self._endpoint.connect(protocolFactory).addErrback(self._failed)

    def _failed(self, failure: Failure) -> Failure:
        if not failure.check(CancelledError):
            self._onFailure(failure)
        return failure


class _Server:
    """
    One Kestrel server: its connection pool and its health.

    It is healthy when at least one connection is up and it is not serving a
    backoff after a failed write.  Connections are kept by one
    L{ClientService} each, which reconnects with the same backoff.
    """

    def __init__(
        self,
        host: str,
        port: int,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        connections: int,
        writeTimeout: float,
        backoff: Callable[[int], float],
        log: Logger,
    ) -> None:
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.clock = clock
        self._backoff = backoff
        self._log = log
        observed = _ObservedEndpoint(endpoint, self._connectFailed)
        factory = _ConnectionFactory(self, writeTimeout)
        self._services = [
            ClientService(observed, factory, retryPolicy=backoff, clock=clock)
            for _ in range(connections)
        ]
        self._live: list[_KestrelProtocol] = []
        self._penalty: IDelayedCall | None = None
        self._stopping = False
        self.state = "connecting"
        self.reason = ""
        self.failures = 0
        self.stored = 0
        self.refused = 0

    def start(self) -> None:
        for service in self._services:
            service.startService()

    def stop(self) -> Deferred[Any]:
        self._stopping = True
        if self._penalty is not None and self._penalty.active():
            self._penalty.cancel()
        return DeferredList(
            [service.stopService() for service in self._services], consumeErrors=True
        )

    def healthy(self) -> bool:
        return bool(self._live) and self._penalty is None and not self._stopping

    def status(self) -> Mapping[str, Any]:
        return {
            "address": self.address,
            "state": self.state,
            "reason": self.reason,
            "healthy": self.healthy(),
            "connections": len(self._live),
            "failures": self.failures,
            "stored": self.stored,
            "refused": self.refused,
        }

    async def store(self, queue: bytes, items: list[bytes]) -> tuple[list[bytes], str | None]:
        """
        Pipeline the batch on the least busy connection.

        @return: the items not acknowledged with C{STORED}, in order, and why
            (C{None} when all were stored).
        """
        if not self._live:
            return items, "not connected"
        proto = min(self._live, key=lambda p: p.pending)
        proto.pending += len(items)
        batch = await proto.store(queue, items)
        proto.pending -= len(items)
        unstored = [items[i] for i in batch.unstored] if batch.unstored else []
        if batch.answered < len(items):
            unstored += items[batch.answered :]
        self.stored += batch.answered - len(batch.unstored)
        self.refused += batch.refusals
        if batch.error is not None:
            reason = _describe(batch.error)
            self._writeFailed(reason)
            return unstored, reason
        if unstored:
            return unstored, "NOT_STORED"
        self.failures = 0
        return unstored, None

    def connectionMade(self, proto: _KestrelProtocol) -> None:
        self._live.append(proto)
        self._update("connected")

    def connectionLost(self, proto: _KestrelProtocol, reason: Failure) -> None:
        if proto in self._live:
            self._live.remove(proto)
        self._update(f"connection lost: {reason.getErrorMessage()}")

    def _connectFailed(self, failure: Failure) -> None:
        self._update(f"connect failed: {failure.getErrorMessage()}")

    def _writeFailed(self, reason: str) -> None:
        """
        Take the server out of rotation for a backoff that grows with each
        consecutive failure, so a sick server is probed rarely rather than
        costing every other write a timeout.
        """
        self.failures += 1
        if self._penalty is not None and self._penalty.active():
            self._penalty.cancel()
        self._penalty = self.clock.callLater(self._backoff(self.failures), self._penaltyOver)
        self._update(reason)

    def _penaltyOver(self) -> None:
        self._penalty = None
        self._update("backoff over")

    def _update(self, reason: str) -> None:
        if self._stopping:
            return
        state = "up" if self.healthy() else "down"
        if state == self.state:
            return
        self.state = state
        self.reason = reason
        if state == "up":
            self._log.info(
                "Kestrel server {address} is up ({reason})", address=self.address, reason=reason
            )
        else:
            self._log.warn(
                "Kestrel server {address} is down: {reason}", address=self.address, reason=reason
            )


def _describe(failure: Failure) -> str:
    name = failure.type.__name__ if failure.type is not None else "Error"
    return f"{name}: {failure.getErrorMessage()}"


class KestrelQueue(Service):
    """
    An L{EventQueue<mixingest.queues.base.EventQueue>} on a Kestrel cluster.

    A batch is pipelined to one server; the items it did not acknowledge go
    to the next healthy server, each server being tried at most once per
    batch.  The put succeeds when every item got C{STORED} somewhere and
    fails with L{QueueUnavailable} otherwise (some items may then be stored:
    at-least-once).
    """

    _log = Logger()

    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        reactor: Any,
        *,
        connectionsPerServer: int = 2,
        writeTimeout: float = DEFAULT_WRITE_TIMEOUT,
        connectTimeout: float = DEFAULT_CONNECT_TIMEOUT,
        backoff: Callable[[int], float] | None = None,
    ) -> None:
        """
        @param servers: C{(host, port)} of each server of the cluster.
        @param reactor: provides TCP, time and name resolution.
        @param backoff: seconds to wait after the Nth consecutive failure,
            both to reconnect and to retry a server that failed a write.
        """
        if not servers:
            raise ValueError("KestrelQueue needs at least one server")
        backoff = backoff or defaultBackoff()
        self._servers = [
            _Server(
                host,
                port,
                HostnameEndpoint(reactor, host, port, timeout=connectTimeout),
                reactor,
                connectionsPerServer,
                writeTimeout,
                backoff,
                self._log,
            )
            for host, port in servers
        ]
        self._next = 0
        self._inFlight: set[Deferred[None]] = set()
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        for server in self._servers:
            server.start()

    def stopService(self) -> Deferred[None]:
        """
        Refuse new puts, let those in flight settle (bounded by the write
        timeout), then close every connection.
        """
        super().stopService()
        self._stopping = True
        d = DeferredList(list(self._inFlight), consumeErrors=True)
        d.addCallback(lambda _: DeferredList([s.stop() for s in self._servers], consumeErrors=True))
        return d.addCallback(lambda _: None)

    def put(self, queue: str, items: Sequence[bytes]) -> Deferred[None]:
        if self._stopping:
            return fail(QueueUnavailable("kestrel: stopping"))
        if not validQueueName(queue):
            return fail(ValueError(f"invalid queue name {queue!r}"))
        if not items:
            return succeed(None)
        d = Deferred.fromCoroutine(self._put(queue.encode("ascii"), list(items)))
        self._inFlight.add(d)
        d.addBoth(self._settled, d)
        return d

    def ready(self) -> bool:
        return not self._stopping and any(s.healthy() for s in self._servers)

    def status(self) -> Mapping[str, Any]:
        return {
            "backend": "kestrel",
            "healthy": self.ready(),
            "servers": [s.status() for s in self._servers],
        }

    def _settled(self, result: object, d: Deferred[None]) -> object:
        self._inFlight.discard(d)
        return result

    async def _put(self, queue: bytes, items: list[bytes]) -> None:
        tried: set[_Server] = set()
        reasons: list[str] = []
        while items:
            server = self._pick(tried)
            if server is None:
                detail = "; ".join(reasons) or "no healthy server"
                raise QueueUnavailable(f"kestrel: {len(items)} items not stored: {detail}")
            tried.add(server)
            items, reason = await server.store(queue, items)
            if reason is not None:
                reasons.append(f"{server.address} {reason}")

    def _pick(self, tried: set[_Server]) -> _Server | None:
        """
        The next healthy server in round-robin order not yet tried for this
        batch: round-robin spreads writes evenly, which keeps each server's
        share of a queue (and the consumers' work) balanced.
        """
        count = len(self._servers)
        for offset in range(count):
            server = self._servers[(self._next + offset) % count]
            if server not in tried and server.healthy():
                self._next = (self._next + offset + 1) % count
                return server
        return None
