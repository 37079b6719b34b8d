# -*- test-case-name: tests.test_redis_queue -*-
"""
Redis lists as the event queue.

Each queue is a list named C{prefix + queue}; events are appended with
C{RPUSH}, so a consumer reads them oldest first with C{LPOP} or, reliably,
with C{BLMOVE} into a processing list (see C{scripts/consume-redis}).

The connection pool is txredisapi's lazy pool.  It is assembled here the
way C{txredisapi.lazyConnectionPool} assembles it, but from a
L{txredisapi.RedisFactory} subclass and an endpoint of our own, because we
need two things the helper hides: to be told when connections come and go
(so health changes are logged when they happen, and a C{put} while Redis is
down fails at once instead of waiting for a reconnection) and to build the
endpoint on the injected reactor for TCP and UNIX sockets alike.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import attrs
import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from mixingest.queues.base import QueueUnavailable

__all__ = ["RedisQueue"]

DEFAULT_WRITE_TIMEOUT = 5.0
"""Seconds Redis may take to answer an C{RPUSH} before the batch counts as not stored."""

DEFAULT_MAX_ITEMS_PER_COMMAND = 1000
"""Items coalesced into one C{RPUSH} at most (a bigger single put still goes whole)."""


class _ObservedFactory(txredisapi.RedisFactory):
    """
    A txredisapi pool factory that reports each connection joining or leaving
    the pool, so that L{RedisQueue} knows its health without polling.
    """

    def __init__(self, onChange: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._onChange = onChange

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        self._onChange()

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        self._onChange()


@attrs.define
class _Waiting:
    """
    Puts for one list that arrived while an C{RPUSH} to it was in flight.

    They are sent together as the next C{RPUSH}: one command in flight per
    list keeps the list in acknowledgement order, and coalescing keeps the
    throughput up under load (many events per command when several wait).
    """

    batches: list[Sequence[bytes]] = attrs.Factory(list)
    deferreds: list[Deferred[None]] = attrs.Factory(list)


class RedisQueue(Service):
    """
    An L{EventQueue<mixingest.queues.base.EventQueue>} on Redis lists.

    A put succeeds once Redis has answered the C{RPUSH}; any error, a timeout
    or having no connection fails it with L{QueueUnavailable}.  A timed-out
    C{RPUSH} may still have been applied: at-least-once, like every remote.
    """

    _log = Logger()

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        reactor: IReactorTime,
        *,
        address: str,
        dbid: int = 0,
        password: str | None = None,
        username: str | None = None,
        prefix: str = "",
        poolSize: int = 2,
        writeTimeout: float = DEFAULT_WRITE_TIMEOUT,
        maxItemsPerCommand: int = DEFAULT_MAX_ITEMS_PER_COMMAND,
        reconnectInitialDelay: float = 0.5,
        reconnectMaxDelay: float = 10.0,
    ) -> None:
        """
        @param endpoint: where Redis listens (TCP or UNIX socket).
        @param address: how to name the server in logs and status (no password).
        @param prefix: prepended to every queue name to make the list's key.
        @param reconnectInitialDelay: first delay of txredisapi's exponential
            backoff with jitter between reconnection attempts, in seconds.
        @param reconnectMaxDelay: the backoff's ceiling, in seconds.
        """
        self._endpoint = endpoint
        self._reactor = reactor
        self.address = address
        self.prefix = prefix
        self._writeTimeout = writeTimeout
        self._maxItemsPerCommand = maxItemsPerCommand
        self._factory = _ObservedFactory(
            self._connectionsChanged,
            uuid=address,
            dbid=dbid,
            poolsize=poolSize,
            isLazy=True,
            password=password,
            username=username,
            replyTimeout=writeTimeout,
        )
        self._factory.initialDelay = reconnectInitialDelay
        self._factory.maxDelay = reconnectMaxDelay
        # Fails only when Redis refuses the connection for good (bad password
        # or database): txredisapi then stops trying, which must be loud.
        self._factory.deferred.addErrback(self._refused)
        self._state = "connecting"
        self._inFlight: dict[str, Deferred[None]] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._stopping = False
        self.stored = 0
        self.failed = 0

    def startService(self) -> None:
        super().startService()
        self._factory.startConnecting(self._endpoint)

    def stopService(self) -> Deferred[None]:
        """
        Refuse new puts, let those already accepted finish (each C{RPUSH} is
        bounded by the write timeout), then close the pool.
        """
        super().stopService()
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        while self._inFlight:
            await DeferredList(list(self._inFlight.values()), consumeErrors=True)
        await self._factory.disconnect()

    def put(self, queue: str, items: Sequence[bytes]) -> Deferred[None]:
        """
        C{RPUSH} C{items} onto the list for C{queue}, coalescing with other
        puts for that list while one is in flight.
        """
        if self._stopping:
            return fail(QueueUnavailable(f"redis {self.address}: stopping"))
        if not items:
            return succeed(None)
        if self._factory.size == 0:
            self.failed += len(items)
            return fail(QueueUnavailable(f"redis {self.address}: not connected"))
        key = self.prefix + queue
        if key in self._inFlight:
            waiting = self._waiting.setdefault(key, _Waiting())
            d: Deferred[None] = Deferred()
            waiting.batches.append(items)
            waiting.deferreds.append(d)
            return d
        return self._send(key, [items])

    def ready(self) -> bool:
        return not self._stopping and self._factory.size > 0

    def status(self) -> Mapping[str, Any]:
        return {
            "backend": "redis",
            "address": self.address,
            "prefix": self.prefix,
            "state": self._state,
            "healthy": self.ready(),
            "connections": self._factory.size,
            "stored": self.stored,
            "failed": self.failed,
        }

    def _send(self, key: str, batches: list[Sequence[bytes]]) -> Deferred[None]:
        """
        One C{RPUSH} carrying C{batches} in order; when it settles, the puts
        that queued up behind it go out as the next one.
        """
        items = [item for batch in batches for item in batch]
        d: Deferred[None] = Deferred()
        self._inFlight[key] = d
        command = self._factory.handler.rpush(key, items)
        # txredisapi's reply timeout aborts the connection and fails the
        # commands queued on it; this outer one only bounds the wait for a
        # pooled connection, which txredisapi does not.
        command.addTimeout(self._writeTimeout * 2, self._reactor)

        def done(result: object) -> None:
            if isinstance(result, Failure):
                # A reply timeout fails this command from the middle of
                # txredisapi tearing the connection down: it then fails
                # every command queued on that connection and aborts it,
                # and the reactor delivers the loss one turn later.  What
                # runs before that (the next RPUSH, the caller's reaction)
                # would still see the doomed connection as usable, so the
                # failure is reported two turns later, once it is gone.
                self._reactor.callLater(0, self._reactor.callLater, 0, finish, result)
            else:
                finish(result)

        def finish(result: object) -> None:
            del self._inFlight[key]
            # The next RPUSH for this list goes out before the callers of
            # this one hear back, so a stop waiting on in-flight commands
            # cannot slip between the two.
            self._sendWaiting(key)
            if isinstance(result, Failure):
                self.failed += len(items)
                self._log.debug(
                    "RPUSH of {count} items to {key} failed: {reason}",
                    count=len(items),
                    key=key,
                    reason=result.getErrorMessage(),
                )
                d.errback(QueueUnavailable(f"redis {self.address}: {result.getErrorMessage()}"))
            else:
                self.stored += len(items)
                d.callback(None)

        command.addBoth(done)
        return d

    def _sendWaiting(self, key: str) -> None:
        waiting = self._waiting.pop(key, None)
        if waiting is None:
            return
        if self._factory.size == 0:
            for d in waiting.deferreds:
                d.errback(QueueUnavailable(f"redis {self.address}: not connected"))
            return
        batches, deferreds = waiting.batches, waiting.deferreds
        count, take = len(batches[0]), 1
        while take < len(batches) and count + len(batches[take]) <= self._maxItemsPerCommand:
            count += len(batches[take])
            take += 1
        if take < len(batches):
            self._waiting[key] = _Waiting(batches[take:], deferreds[take:])
        self._send(key, batches[:take]).addBoth(self._settle, deferreds[:take])

    @staticmethod
    def _settle(result: object, deferreds: list[Deferred[None]]) -> None:
        for d in deferreds:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)

    def _connectionsChanged(self) -> None:
        state = "up" if self._factory.size > 0 else "down"
        if state != self._state and not self._stopping:
            if state == "up":
                self._log.info("Redis {address} is up", address=self.address)
            else:
                self._log.warn("Redis {address} is down: no connection", address=self.address)
        self._state = state

    def _refused(self, failure: Failure) -> None:
        self._state = "refused"
        self._log.error(
            "Redis {address} refused the connection, not retrying: {reason}",
            address=self.address,
            reason=failure.getErrorMessage(),
        )
