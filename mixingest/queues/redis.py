# -*- test-case-name: tests.test_redis_queue,tests.test_redis_exactly_once -*-
"""
Redis lists as the event queue, each batch stored at most once.

Each queue is a list named C{prefix + queue}; events are appended at its
tail, so a consumer reads them oldest first with C{LPOP} or, reliably, with
C{BLMOVE} into a processing list (see C{scripts/consume-redis}).

Every write is the Lua script of L{mixingest.queues.redis_scripts}, which
appends only items numbered above the high-water mark that this producer
has in that list: a batch that reaches Redis twice is stored once.  A direct
put is numbered by this run of the queue (a random run id and a counter per
list); a batch forwarded from the journal by the journal's identity and its
record numbers.

A write that may have reached Redis but was not answered in time is I{in
doubt}: its put fails with L{InDoubt}, the puts waiting behind it for the
same list fail after it, and the list takes no direct put until a fence
(see L{redis_scripts}) has settled the batch, which happens as soon as Redis
answers again.  So a late command can never add a batch after its copy, nor
put a later batch before it.

The connection pool is txredisapi's lazy pool, assembled the way
C{txredisapi.lazyConnectionPool} does but from a L{txredisapi.RedisFactory}
subclass that reports connections joining and leaving (health is logged
when it changes; a put while Redis is down fails at once) and on an
endpoint of our own built on the injected reactor.  Writes choose their
connection from the pool and run their own timeout, so that the optional
C{WAIT}/C{WAITAOF} go on the same connection as the write they wait for.
"""

from __future__ import annotations

import json
import secrets
import weakref
from collections import deque
from typing import Any, Callable, Mapping, Sequence, TypeVar

import attrs
import txredisapi
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint, ITCPTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from mixingest.errors import InDoubt, QueueUnavailable
from mixingest.queues import redis_scripts as scripts

__all__ = ["DEFAULT_MARK_TTL", "DEFAULT_WRITE_TIMEOUT", "RedisQueue"]

T = TypeVar("T")

DEFAULT_WRITE_TIMEOUT = 5.0
"""Seconds Redis may take to answer a write before it counts as in doubt."""

DEFAULT_MAX_ITEMS_PER_COMMAND = 1000
"""Items coalesced into one write at most (a bigger single put still goes whole)."""

DEFAULT_MARK_TTL = 7 * 24 * 3600
"""
Seconds a producer's high-water mark outlives its last write: longer than
any batch can wait in the journal for its resend or in-doubt question.
"""

WAITAOF_VERSION = (7, 2)
"""The first Redis version with C{WAITAOF}."""

FENCE_RETRY_MAX = 5.0
"""Most seconds between two attempts to settle an in-doubt batch."""


class _NotSent(Exception):
    """The write certainly did not reach Redis (no usable connection)."""


class _Refused(Exception):
    """Redis answered the write with an error: nothing was stored."""


class _Unknown(Exception):
    """The write may have been applied: no answer, or not durable as asked."""


HEAD_CACHE = 8192
"""Argument lengths below this have their RESP length line kept, made once."""

# The length lines made so far, shared by every connection: at most
# HEAD_CACHE small bytes, since events are a few hundred bytes each.
_heads: dict[int, bytes] = {}


class _Protocol(txredisapi.RedisProtocol):
    """
    txredisapi stops reconnecting for good when C{AUTH} or C{SELECT} fails
    while a connection is set up.  That is right for a wrong password or
    database, not when the server did not answer in time (a stall, the very
    moment the pool reconnects) or the connection dropped: those failures
    are noted on the factory, which then goes on trying.

    Commands are encoded by a cheaper L{_build_command}: the rest of
    txredisapi's C{execute_command} (one write, one reply Deferred queued
    in order) is kept.
    """

    factory: _ObservedFactory

    def _build_command(self, *args: Any, **kwargs: Any) -> bytes:
        """
        The RESP request for C{args}, byte for byte what txredisapi builds,
        in one join: its builder runs its encoder twice per argument and
        extends a bytearray four times, which cost about half the CPU per
        event of the write path for batches (a write carries every item as
        an argument; scripts/bench.d/redis_writer.py).  Anything but
        C{bytes} still goes through txredisapi's encoder, so strings,
        numbers and the charset behave as before.
        """
        parts = [b"*%d" % len(args)]
        append = parts.append
        heads = _heads
        for arg in args:
            if arg.__class__ is not bytes:
                arg = self._encode_value(arg)
            size = len(arg)
            head = heads.get(size)
            if head is None:
                head = b"\r\n$%d\r\n" % size
                if size < HEAD_CACHE:
                    heads[size] = head
            append(head)
            append(arg)
        append(b"\r\n")
        return b"".join(parts)

    def auth(self, password: str, username: str | None = None) -> Deferred[Any]:
        return super().auth(password, username).addErrback(self._setupFailed)

    def select(self, index: int) -> Deferred[Any]:
        return super().select(index).addErrback(self._setupFailed)

    def _setupFailed(self, failure: Failure) -> Failure:
        if failure.check(txredisapi.ConnectionError):
            self.factory.transientSetupFailure = failure.getErrorMessage()
        return failure


class _ObservedFactory(txredisapi.RedisFactory):
    """
    A txredisapi pool factory that reports each connection joining or leaving
    the pool, so that L{RedisQueue} knows its health without polling, and
    that keeps reconnecting after a connection setup that merely timed out.
    """

    protocol = _Protocol

    def __init__(
        self, onJoin: Callable[[Any], None], onChange: Callable[[], None], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._onJoin = onJoin
        self._onChange = onChange
        self.transientSetupFailure = ""

    def stopTrying(self) -> Deferred[Any]:
        if self.transientSetupFailure:
            return succeed(None)
        return super().stopTrying()

    def connectionError(self, why: str) -> None:
        """
        A connection failed at setup: called right after L{stopTrying},
        in the same turn, so this is where a transient failure is forgotten.
        """
        if self.transientSetupFailure:
            RedisQueue._log.debug("Redis connection setup failed, reconnecting: {why}", why=why)
            self.transientSetupFailure = ""
            return
        super().connectionError(why)

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            self._onJoin(conn)
        self._onChange()

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        self._onChange()


@attrs.define
class _Put:
    """One caller's put, waiting for its turn on its list."""

    items: Sequence[bytes]
    d: Deferred[None]
    journal: tuple[str, Sequence[int]] | None = None
    """For L{RedisQueue.putJournaled}: the journal's identity and the items' numbers."""


@attrs.frozen
class _Doubt:
    """A direct write whose outcome is unknown: the batch numbered up to C{seq}."""

    producer: str
    seq: int


@attrs.define
class _Lane:
    """
    The writes to one list: one in flight at a time, so the list is in
    acknowledgement order, and the puts that arrive meanwhile go together
    in the next write (many events per command under load).
    """

    waiting: deque[_Put] = attrs.Factory(deque)
    inFlight: Deferred[None] | None = None
    doubt: _Doubt | None = None
    fencing: bool = False


class RedisQueue(Service):
    """
    An L{EventQueue<mixingest.queues.base.EventQueue>} and
    L{ResolvableQueue<mixingest.queues.base.ResolvableQueue>} on Redis lists.

    A put succeeds once Redis has answered the write (and, if asked, enough
    replicas or the AOF fsync acknowledged it).  It fails with L{InDoubt}
    when the write was sent but not answered in time, and with
    L{QueueUnavailable} when it certainly was not stored.
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
        markTTL: int = DEFAULT_MARK_TTL,
        replicas: int = 0,
        waitAOF: bool = False,
        maxItemsPerCommand: int = DEFAULT_MAX_ITEMS_PER_COMMAND,
        reconnectInitialDelay: float = 0.5,
        reconnectMaxDelay: float = 10.0,
    ) -> None:
        """
        @param endpoint: where Redis listens (TCP or UNIX socket).
        @param address: how to name the server in logs and status (no password).
        @param prefix: prepended to every queue name to make the list's key,
            and to the keys of the marks.
        @param writeTimeout: seconds a write may go unanswered before it is
            in doubt; C{WAIT}/C{WAITAOF} get as long again on the server.
        @param markTTL: seconds a producer's mark lives after its last write.
        @param replicas: after each write, C{WAIT} for this many replicas to
            acknowledge it (0: do not wait); fewer is a write in doubt.
        @param waitAOF: after each write, C{WAITAOF 1 0} (Redis 7.2 or later):
            the write counts only once fsynced to the primary's AOF.
        @param reconnectInitialDelay: first delay of txredisapi's exponential
            backoff with jitter between reconnection attempts, in seconds.
        @param reconnectMaxDelay: the backoff's ceiling, in seconds.
        """
        self._endpoint = endpoint
        self._reactor = reactor
        self.address = address
        self.prefix = prefix
        self._writeTimeout = writeTimeout
        self._markTTL = markTTL
        self._replicas = replicas
        self._waitAOF = waitAOF
        self._maxItemsPerCommand = maxItemsPerCommand
        self._factory = _ObservedFactory(
            self._joined,
            self._connectionsChanged,
            uuid=address,
            dbid=dbid,
            poolsize=poolSize,
            isLazy=True,
            password=password,
            username=username,
            # Bounds AUTH, SELECT and the setup commands; writes run their own.
            replyTimeout=writeTimeout,
        )
        self._factory.initialDelay = reconnectInitialDelay
        self._factory.maxDelay = reconnectMaxDelay
        # Fails only when Redis refuses the connection for good (bad password
        # or database): txredisapi then stops trying, which must be loud.
        self._factory.deferred.addErrback(self._refused)
        self._state = "connecting"
        self._unsupported = ""
        self._ackErrors: set[str] = set()
        # Connections being torn down (a timeout aborted them) and, with
        # waitAOF, those whose server is known to have WAITAOF.
        self._doomed: weakref.WeakSet[Any] = weakref.WeakSet()
        self._checked: weakref.WeakSet[Any] = weakref.WeakSet()
        self._next = 0
        self._lanes: dict[str, _Lane] = {}
        self._seqs: dict[str, int] = {}
        self._fenceCall: Any = None
        self._fenceDelay = 0.0
        self._stopping = False
        self.runId = secrets.token_hex(8)
        self.stored = 0
        self.failed = 0
        self.duplicatesSkipped = 0
        self.doubted = 0
        self.fenced = 0
        self.foundStored = 0
        self.resolves = 0

    # -- service

    def startService(self) -> None:
        """
        Connect, as a new producer: a new run id, numbering from 1 again.
        """
        super().startService()
        self.runId = secrets.token_hex(8)
        self._seqs.clear()
        self._factory.startConnecting(self._endpoint)

    def stopService(self) -> Deferred[None]:
        """
        Refuse new puts, let those already accepted finish (each write is
        bounded by the write timeout), then close the pool.  Batches still
        in doubt are left to the store-and-forward layer, whose journal
        holds their markers.
        """
        super().stopService()
        self._stopping = True
        if self._fenceCall is not None and self._fenceCall.active():
            self._fenceCall.cancel()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        while True:
            writes = [lane.inFlight for lane in self._lanes.values() if lane.inFlight is not None]
            if not writes:
                break
            await DeferredList(writes, consumeErrors=True)
        await self._factory.disconnect()

    # -- EventQueue

    def put(self, queue: str, items: Sequence[bytes]) -> Deferred[None]:
        """
        Append C{items} to the list for C{queue}, coalescing with other puts
        for that list while a write to it is in flight.
        """
        return self._enqueue(queue, items, None)

    def putJournaled(
        self, queue: str, items: Sequence[bytes], source: str, seqs: Sequence[int]
    ) -> Deferred[None]:
        """
        Append the items of C{items} numbered above what journal C{source}
        already stored in C{queue}'s list.  A failure is never L{InDoubt}:
        sending the same batch again is safe.
        """
        if len(seqs) != len(items):
            return fail(ValueError(f"{len(items)} items but {len(seqs)} sequence numbers"))
        return self._enqueue(queue, items, (source, seqs))

    def resolve(self, queue: str, marker: bytes) -> Deferred[bool]:
        """
        Settle the L{InDoubt} put that C{marker} names (this run's or an
        earlier one's) with the fence script: C{True} if it was stored,
        C{False} if not (and now never will be).  Idempotent.
        """
        try:
            fields = json.loads(marker)
            producer, prefix, seq = fields["producer"], fields["prefix"], fields["seq"]
            if fields["queue"] != queue:
                raise ValueError(f"the marker is for queue {fields['queue']!r}")
        except (ValueError, KeyError, TypeError) as e:
            return fail(ValueError(f"not a Redis in-doubt marker for {queue!r}: {e}"))
        self.resolves += 1
        d = self._fence(prefix, queue, producer, seq)
        lane = self._lanes.get(queue)
        if lane is not None and lane.doubt == _Doubt(producer, seq) and prefix == self.prefix:
            d.addCallback(self._settled, queue, lane, lane.doubt)
        return d

    def ready(self) -> bool:
        return not self._stopping and any(self._usable(c) for c in self._factory.pool)

    def status(self) -> Mapping[str, Any]:
        status = {
            "backend": "redis",
            "address": self.address,
            "prefix": self.prefix,
            "state": self._state,
            "healthy": self.ready(),
            "connections": self._factory.size,
            "writeTimeout": self._writeTimeout,
            "markTTL": self._markTTL,
            "replicas": self._replicas,
            "waitAOF": self._waitAOF,
            "runId": self.runId,
            "stored": self.stored,
            "failed": self.failed,
            "duplicatesSkipped": self.duplicatesSkipped,
            "inDoubt": sorted(q for q, lane in self._lanes.items() if lane.doubt is not None),
            "doubted": self.doubted,
            "fenced": self.fenced,
            "foundStored": self.foundStored,
            "resolves": self.resolves,
        }
        if self._unsupported:
            status["error"] = self._unsupported
        return status

    # -- writes

    def _enqueue(
        self, queue: str, items: Sequence[bytes], journal: tuple[str, Sequence[int]] | None
    ) -> Deferred[None]:
        if self._stopping:
            return fail(QueueUnavailable(f"redis {self.address}: stopping"))
        if not items:
            return succeed(None)
        lane = self._lanes.get(queue)
        if lane is None:
            lane = self._lanes[queue] = _Lane()
        if lane.doubt is not None:
            self.failed += len(items)
            return fail(
                QueueUnavailable(
                    f"redis {self.address}: a write to {self.prefix + queue} is in doubt "
                    "until Redis answers again"
                )
            )
        # Behind a write in flight, even with no connection now: the put
        # must not fail before the earlier one does.
        if lane.inFlight is None and not self.ready():
            self.failed += len(items)
            reason = self._unsupported or "not connected"
            return fail(QueueUnavailable(f"redis {self.address}: {reason}"))
        put = _Put(items, Deferred(), journal)
        lane.waiting.append(put)
        if lane.inFlight is None:
            self._send(queue, lane)
        return put.d

    def _take(self, lane: _Lane) -> list[_Put]:
        """
        The puts of the next write: a journaled batch alone (it has its own
        numbers), or as many direct puts in a row as fit in one command.
        """
        first = lane.waiting.popleft()
        puts = [first]
        if first.journal is not None:
            return puts
        count = len(first.items)
        while lane.waiting:
            nxt = lane.waiting[0]
            if nxt.journal is not None or count + len(nxt.items) > self._maxItemsPerCommand:
                break
            count += len(nxt.items)
            puts.append(lane.waiting.popleft())
        return puts

    def _send(self, queue: str, lane: _Lane) -> None:
        puts = self._take(lane)
        if puts[0].journal is not None:
            producer, seqs = puts[0].journal
            items = puts[0].items
            last = seqs[-1]
            args = scripts.pushArgs(self.prefix, queue, producer, self._markTTL, items, seqs=seqs)
        else:
            producer = self.runId
            items = puts[0].items if len(puts) == 1 else [i for p in puts for i in p.items]
            first = self._seqs.get(queue, 0) + 1
            last = self._seqs[queue] = first + len(items) - 1
            args = scripts.pushArgs(self.prefix, queue, producer, self._markTTL, items, first=first)
        d = Deferred.fromCoroutine(self._write(scripts.PUSH_SHA, scripts.PUSH, 3, args))
        # Set before the callback, which clears it, may run (at once, when
        # there is no connection).
        lane.inFlight = d
        d.addBoth(self._written, queue, lane, puts, len(items), _Doubt(producer, last))

    def _written(
        self, result: object, queue: str, lane: _Lane, puts: list[_Put], count: int, doubt: _Doubt
    ) -> None:
        """
        Report a write to its puts, in order.  After a failure the puts that
        waited behind it fail too, after it, so that a caller who journals
        failed puts journals them in order; after success the next write
        goes out first, so that a stop waiting on writes in flight cannot
        slip between the two.
        """
        lane.inFlight = None
        if not isinstance(result, Failure):
            assert isinstance(result, int)
            self.stored += result
            self.duplicatesSkipped += count - result
            if lane.waiting:
                self._send(queue, lane)
            for put in puts:
                put.d.callback(None)
            return
        self.failed += count
        reason = result.value
        key = self.prefix + queue
        self._log.debug(
            "Write of {count} items to {key} failed: {reason}", count=count, key=key, reason=reason
        )
        if isinstance(reason, _Unknown) and puts[0].journal is None:
            lane.doubt = doubt
            self.doubted += 1
            self._log.warn(
                "Write to {key} in doubt ({reason}): no direct puts to it until it is settled",
                key=key,
                reason=reason,
            )
            marker = json.dumps(
                {
                    "producer": doubt.producer,
                    "prefix": self.prefix,
                    "queue": queue,
                    "seq": doubt.seq,
                },
                separators=(",", ":"),
            ).encode("ascii")
            message = f"redis {self.address}: {key}: {reason} (in doubt)"
            for put in puts:
                put.d.errback(InDoubt(message, marker))
            self._scheduleFence(0)
        else:
            for put in puts:
                put.d.errback(QueueUnavailable(f"redis {self.address}: {key}: {reason}"))
        waiting, lane.waiting = lane.waiting, deque()
        for put in waiting:
            self.failed += len(put.items)
            put.d.errback(QueueUnavailable(f"redis {self.address}: {key}: an earlier write failed"))

    async def _write(self, sha: str, script: bytes, numKeys: int, args: Sequence[object]) -> Any:
        """
        Run C{script} on one connection and the configured C{WAIT}/C{WAITAOF}
        right behind it on the same connection: a push and a fence's answer
        count only once they are as durable as asked.

        @raise _NotSent: no usable connection.
        @raise _Refused: Redis answered the script with an error.
        @raise _Unknown: no answer in time, the connection dropped after
            sending, or too few acknowledgements.
        """
        conn = self._connection()
        if conn is None:
            raise _NotSent(self._unsupported or "not connected")
        waits = bool(self._replicas or self._waitAOF)
        timeout = self._writeTimeout * (2 if waits else 1)
        timer = self._reactor.callLater(timeout, self._abort, conn)
        try:
            try:
                reply, acks = self._script(conn, "EVALSHA", sha, numKeys, args, waits)
            except txredisapi.ConnectionError as e:
                raise _NotSent(str(e)) from None
            try:
                result = await reply
            except txredisapi.ResponseError as e:
                if not str(e).startswith("NOSCRIPT"):
                    raise _Refused(str(e)) from None
                reply, acks = self._script(conn, "EVAL", script, numKeys, args, waits)
                try:
                    result = await reply
                except txredisapi.ResponseError as e:
                    raise _Refused(str(e)) from None
            try:
                for kind, ack in acks:
                    try:
                        value = await ack
                    except txredisapi.ResponseError as e:
                        value = e
                    self._checkAck(kind, value)
            finally:
                self._consumeAcks(None, acks)
            return result
        except txredisapi.ConnectionError as e:
            if conn in self._doomed or isinstance(e, txredisapi.TimeoutError):
                self._doomed.add(conn)
                raise _Unknown(f"no answer within {timeout:g} s") from None
            raise _Unknown(f"connection lost: {e}") from None
        finally:
            if timer.active():
                timer.cancel()

    def _script(
        self,
        conn: Any,
        command: str,
        script: object,
        numKeys: int,
        args: Sequence[object],
        waits: bool,
    ) -> tuple[Deferred[Any], list[tuple[str, Deferred[Any]]]]:
        """
        Send the script and the acknowledgement commands, pipelined.  The
        acknowledgements are only awaited once the script succeeded: until
        then their failures are consumed here.
        """
        reply = conn.execute_command(command, script, numKeys, *args, apply_timeout=False)
        acks = []
        if waits:
            ms = int(self._writeTimeout * 1000)
            if self._replicas:
                acks.append(
                    (
                        "replicas",
                        conn.execute_command("WAIT", self._replicas, ms, apply_timeout=False),
                    )
                )
            if self._waitAOF:
                acks.append(("aof", conn.execute_command("WAITAOF", 1, 0, ms, apply_timeout=False)))
        reply.addErrback(self._consumeAcks, acks)
        return reply, acks

    @staticmethod
    def _consumeAcks(result: T, acks: list[tuple[str, Deferred[Any]]]) -> T:
        for _, ack in acks:
            ack.addErrback(lambda _: None)
        return result

    def _checkAck(self, kind: str, reply: Any) -> None:
        """
        @raise _Unknown: the write is applied but not acknowledged as asked,
            or the acknowledgement command failed (logged at error: that is
            a configuration to fix, such as WAITAOF without appendonly).
        """
        if isinstance(reply, Exception):
            message = f"{'WAIT' if kind == 'replicas' else 'WAITAOF'} failed: {reply}"
            if message not in self._ackErrors:
                self._ackErrors.add(message)
                self._log.error("Redis {address}: {message}", address=self.address, message=message)
            raise _Unknown(message)
        if kind == "replicas":
            if reply < self._replicas:
                raise _Unknown(f"{reply} of {self._replicas} replicas acknowledged in time")
        elif not (isinstance(reply, list) and reply and reply[0] >= 1):
            raise _Unknown(f"not fsynced to the AOF in time (WAITAOF: {reply!r})")

    def _connection(self) -> Any:
        """A usable connection of the pool, round-robin, or C{None}."""
        pool = self._factory.pool
        for _ in range(len(pool)):
            self._next = (self._next + 1) % len(pool)
            conn = pool[self._next]
            if self._usable(conn):
                return conn
        return None

    def _usable(self, conn: Any) -> bool:
        return (
            bool(conn.connected)
            and conn not in self._doomed
            and (not self._waitAOF or conn in self._checked)
        )

    def _abort(self, conn: Any) -> None:
        """
        A write timed out: drop its connection, which fails every command
        pipelined on it (all in doubt), and keep other writes off it.
        """
        self._doomed.add(conn)
        conn.transport.abortConnection()

    # -- settling writes in doubt

    def _fence(self, prefix: str, queue: str, producer: str, seq: int) -> Deferred[bool]:
        args = scripts.fenceArgs(prefix, queue, producer, self._markTTL, seq)
        d = Deferred.fromCoroutine(self._write(scripts.FENCE_SHA, scripts.FENCE, 2, args))

        def answered(result: object) -> bool:
            if isinstance(result, Failure):
                raise QueueUnavailable(
                    f"redis {self.address}: cannot settle a write to {prefix + queue}: "
                    f"{result.getErrorMessage()}"
                )
            return result == 1

        return d.addBoth(answered)

    def _scheduleFence(self, delay: float) -> None:
        if self._stopping or (self._fenceCall is not None and self._fenceCall.active()):
            return
        self._fenceCall = self._reactor.callLater(delay, self._fenceAll)

    def _fenceAll(self) -> None:
        """Settle every list's write in doubt, if Redis can be asked."""
        if not self.ready():
            return  # _connectionsChanged calls again when it can
        for queue, lane in sorted(self._lanes.items()):
            if lane.doubt is not None and not lane.fencing:
                lane.fencing = True
                d = self._fence(self.prefix, queue, lane.doubt.producer, lane.doubt.seq)
                d.addCallback(self._settled, queue, lane, lane.doubt)
                d.addErrback(self._fenceFailed, lane)
                d.addBoth(self._fenceDone, lane)

    def _settled(self, stored: bool, queue: str, lane: _Lane, doubt: _Doubt) -> bool:
        if lane.doubt == doubt:
            lane.doubt = None
            self._fenceDelay = 0.0
            if stored:
                self.foundStored += 1
            else:
                self.fenced += 1
            self._log.info(
                "Write in doubt to {key} settled: {outcome}; direct puts resume",
                key=self.prefix + queue,
                outcome="it was stored" if stored else "it was not stored, and is fenced off",
            )
        return stored

    def _fenceFailed(self, failure: Failure, lane: _Lane) -> None:
        self._fenceDelay = min(FENCE_RETRY_MAX, max(0.1, self._fenceDelay * 2))
        self._log.debug("Fence failed: {reason}", reason=failure.getErrorMessage())

    def _fenceDone(self, result: object, lane: _Lane) -> None:
        lane.fencing = False
        if any(other.doubt is not None for other in self._lanes.values()):
            self._scheduleFence(self._fenceDelay)

    # -- connections

    def _joined(self, conn: Any) -> None:
        """
        A new connection: no Nagle delay (each write is one small command
        awaited by its callers), the scripts loaded, and with C{waitAOF}
        the server's version checked before any write uses it.
        """
        if ITCPTransport.providedBy(conn.transport):
            conn.transport.setTcpNoDelay(True)
        for script in (scripts.PUSH, scripts.FENCE):
            conn.execute_command("SCRIPT", "LOAD", script).addErrback(self._setupFailed, conn)
        if self._waitAOF:
            conn.info("server").addCallbacks(
                self._version, self._setupFailed, callbackArgs=(conn,), errbackArgs=(conn,)
            )

    def _version(self, info: Mapping[str, str], conn: Any) -> None:
        text = info.get("redis_version", "")
        try:
            version = tuple(int(part) for part in text.split(".")[:2])
        except ValueError:
            version = ()
        if version >= WAITAOF_VERSION:
            self._unsupported = ""
            self._checked.add(conn)
            self._connectionsChanged()
            return
        message = (
            f"?wait=aof needs Redis 7.2 or later (WAITAOF), but the server is Redis {text or '?'}"
        )
        if message != self._unsupported:
            self._unsupported = message
            self._log.error("Redis {address}: {message}", address=self.address, message=message)
        self._connectionsChanged()

    def _setupFailed(self, failure: Failure, conn: Any) -> None:
        if failure.check(txredisapi.TimeoutError):
            self._doomed.add(conn)
        self._log.debug("Redis connection setup failed: {reason}", reason=failure.getErrorMessage())

    def _connectionsChanged(self) -> None:
        if self._unsupported and not self.ready():
            state = "unsupported"
        else:
            state = "up" if self.ready() else "down"
        if state != self._state and not self._stopping:
            if state == "up":
                self._log.info("Redis {address} is up", address=self.address)
            elif state == "down":
                self._log.warn("Redis {address} is down: no connection", address=self.address)
        self._state = state
        if state == "up" and any(lane.doubt is not None for lane in self._lanes.values()):
            self._fenceDelay = 0.0
            if self._fenceCall is not None and self._fenceCall.active():
                self._fenceCall.cancel()
            self._scheduleFence(0)

    def _refused(self, failure: Failure) -> None:
        self._state = "refused"
        self._log.error(
            "Redis {address} refused the connection, not retrying: {reason}",
            address=self.address,
            reason=failure.getErrorMessage(),
        )
