# -*- test-case-name: tests.test_funnel -*-
"""
The funnel: the one reactor-owned service between the HTTP handlers and the
queue backends.

It holds every piece of mutable state the daemon has (routing, what is in
flight, recent C{$insert_id}s, per-token counters and rate limits, the
journal backlog, draining), all touched only from the reactor thread, so
nothing needs a lock.  Handlers give it cleaned items and get back a
Deferred that fires once every item is durably stored, or an exception
saying why the request is refused as a whole.

The checks run cheapest and most general first: draining, then the bounds
that protect the process (events in flight, journal backlog), then dedupe
(a retry costs nothing, not even rate), then the rate limit; every one is a
counter comparison or a dict lookup, O(1) per event.
"""

from __future__ import annotations

from collections import Counter
from itertools import repeat
from operator import itemgetter
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mixingest.cleaning import CleanItem
from mixingest.dedupe import Key, RecentInsertIds
from mixingest.defaults import DEFAULT_MAX_BACKLOG, DEFAULT_MAX_IN_FLIGHT
from mixingest.errors import Overloaded, RequestRefused
from mixingest.live import LiveTap
from mixingest.metrics import FunnelCollector, Metrics
from mixingest.queues.base import EventQueue
from mixingest.ratelimit import RateLimiter
from mixingest.windows import TokenCounters

__all__ = [
    "DEFAULT_QUEUES",
    "Funnel",
    "backlogOf",
]

DEFAULT_QUEUES: Mapping[str, str] = {
    "track": "events",
    "import": "events",
    "engage": "people",
    "groups": "groups",
}

ROUTABLE = frozenset(("track", "import"))
"""
Endpoints whose events follow C{--route TOKEN=QUEUE}; profile and group
updates keep their own queues.
"""


BACKLOG_POLL_INTERVAL = 1.0
"""
Seconds between reads of the queue's backlog: it moves slowly, and reading
it on every request would cost more than the check is worth.
"""

DRAIN_RETRY_AFTER = 5
IN_FLIGHT_RETRY_AFTER = 1
BACKLOG_RETRY_AFTER = 30


def backlogOf(status: Mapping[str, Any]) -> int:
    """
    The events waiting to be forwarded, from a queue's C{status()}: its
    C{"backlog"}, an event count or a mapping of queue name to event count;
    none (a plain journal, a remote queue) is 0.
    """
    backlog = status.get("backlog", 0)
    if isinstance(backlog, Mapping):
        return sum(backlog.values())
    return int(backlog)


class QueueCounts:
    """
    One queue's writes: what it is owed (in flight) and what it did.
    """

    __slots__ = (
        "bytes",
        "events",
        "failedEvents",
        "failedRequests",
        "requests",
        "storedBytes",
        "storedEvents",
        "storedRequests",
    )

    def __init__(self) -> None:
        self.requests = self.events = self.bytes = 0
        self.storedRequests = self.storedEvents = self.storedBytes = 0
        self.failedRequests = self.failedEvents = 0

    def snapshot(self) -> Dict[str, Dict[str, int]]:
        return {
            "in_flight": {"requests": self.requests, "events": self.events, "bytes": self.bytes},
            "stored": {
                "requests": self.storedRequests,
                "events": self.storedEvents,
                "bytes": self.storedBytes,
            },
            "failed": {"requests": self.failedRequests, "events": self.failedEvents},
        }


_TOKEN, _INSERT_ID, _PAYLOAD = itemgetter(0), itemgetter(1), itemgetter(2)

_Group = Tuple[str, List[bytes], List[Key]]
"""
One token's share of a request: the token, its payloads, and the
C{(token, $insert_id)} keys to remember once they are stored.
"""


class Funnel(Service):
    """
    Routes cleaned items to queues, tracks them until they are stored and
    protects the process and the queues from more than they can take.

    @ivar queues: per queue name, its L{QueueCounts}.
    @ivar rejected: valid events refused, by reason.
    @ivar statusSources: more of L{status}: each name's value is what its
        callable returns (the public site's connections and bodies).
    @ivar backlog: the queue's journal backlog when last polled.
    @ivar draining: set when the service stops; new requests are refused
        with 503 so that clients retry elsewhere or later.
    @ivar stopping: set when a stop was asked for and the daemon still
        serves (the shutdown grace): not ready, so that load balancers stop
        sending, while requests are still stored as usual.
    """

    log = Logger()

    def __init__(
        self,
        queue: EventQueue,
        clock: IReactorTime,
        routes: Optional[Mapping[str, str]] = None,
        drainTimeout: float = 20.0,
        *,
        recent: Optional[RecentInsertIds] = None,
        counters: Optional[TokenCounters] = None,
        limiter: Optional[RateLimiter] = None,
        maxInFlight: int = DEFAULT_MAX_IN_FLIGHT,
        maxBacklog: int = DEFAULT_MAX_BACKLOG,
        metrics: Optional[Metrics] = None,
        live: Optional[LiveTap] = None,
    ) -> None:
        """
        @param routes: token to queue name, for C{/track} and C{/import}.
        @param drainTimeout: seconds a graceful stop waits for the writes in
            flight.
        @param recent: the dedupe window.
        @param counters: the per-token counters.
        @param limiter: the per-token rate limit, or L{None} for none.
        @param maxInFlight: events in flight past which requests get 503.
        @param maxBacklog: journal backlog past which requests get 503 and
            the daemon is not ready.
        @param metrics: where write latencies go and the funnel's figures
            are exposed.
        @param live: the live view's tap, told what is stored and
            deduplicated while a viewer watches.
        """
        self.queue = queue
        self.clock = clock
        self.routes: Dict[str, str] = dict(routes or {})
        self.drainTimeout = drainTimeout
        self.recent = recent if recent is not None else RecentInsertIds()
        self.counters = counters if counters is not None else TokenCounters()
        self.limiter = limiter
        self.maxInFlight = maxInFlight
        self.maxBacklog = maxBacklog
        self.metrics = metrics if metrics is not None else Metrics()
        self.live = live if live is not None else LiveTap(clock)
        self.metrics.registry.register(FunnelCollector(self))
        self.queues: Dict[str, QueueCounts] = {}
        self.rejected: Dict[str, int] = {}
        self.statusSources: Dict[str, Callable[[], Any]] = {}
        self.eventsInFlight = 0
        self.writesInFlight = 0
        self.backlog = 0
        self.overBacklog = False
        self.draining = False
        self.stopping = False
        self.startedAt = clock.seconds()
        self._drained: Optional[Deferred[None]] = None
        self._poll = LoopingCall(self._pollBacklog)
        self._poll.clock = clock

    def queueFor(self, endpoint: str, token: str) -> str:
        """
        The queue that C{endpoint}'s events for C{token} go to.
        """
        if endpoint in ROUTABLE:
            return self.routes.get(token, "events")
        return DEFAULT_QUEUES[endpoint]

    def store(self, endpoint: str, items: Sequence[CleanItem]) -> Deferred[None]:
        """
        Durably store C{items} (one request's worth), except those stored
        recently already.  Order is kept per token (per distinct_id, then),
        not across the tokens of a mixed batch: each token's share is one
        group, which is what routing, counting and rate limiting work on.

        @return: fires once all are stored, or fails with the backend's
            failure.
        @raise RequestRefused: L{Overloaded} when draining or past a bound,
            L{RateLimited} when a token is over its rate; nothing of the
            request is stored then.
        """
        if self.draining:
            raise self._refuse(
                "draining", items, Overloaded("server is shutting down; retry", DRAIN_RETRY_AFTER)
            )
        if self.eventsInFlight >= self.maxInFlight:
            raise self._refuse(
                "in_flight",
                items,
                Overloaded("too many events waiting to be stored; retry", IN_FLIGHT_RETRY_AFTER),
            )
        if self.overBacklog:
            raise self._refuse(
                "backlog",
                items,
                Overloaded("the journal backlog is over its bound; retry", BACKLOG_RETRY_AFTER),
            )
        now = self.clock.seconds()
        groups = self._fresh(items, now)
        if not groups:
            if self.live.active:
                self.live.deduplicated(endpoint, [item.token for item in items])
            return succeed(None)
        if self.limiter is not None:
            refused = self.limiter.refusal(
                [(token, len(payloads)) for token, payloads, _ in groups], now
            )
            if refused is not None:
                raise self._refuse(refused[0], items, refused[1])
        if self.live.active:
            self._showDuplicates(endpoint, items, groups)
        return self._write(endpoint, groups, now)

    def _showDuplicates(
        self, endpoint: str, items: Sequence[CleanItem], groups: List[_Group]
    ) -> None:
        """
        Show on the live view the records of a request dropped as already
        stored (the stored ones are shown by L{_settled}).
        """
        count = 0
        for group in groups:
            count += len(group[1])
        if count < len(items):
            kept = {id(payload) for group in groups for payload in group[1]}
            duplicates = [item.token for item in items if id(item.payload) not in kept]
            self.live.deduplicated(endpoint, duplicates)

    def _write(self, endpoint: str, groups: List[_Group], now: float) -> Deferred[None]:
        """
        Write C{groups} to their queues: one write per queue they route to.
        """
        if len(groups) == 1 or endpoint not in ROUTABLE or not self.routes:
            return self._put(self.queueFor(endpoint, groups[0][0]), groups, now, endpoint)
        byQueue: Dict[str, List[_Group]] = {}
        for group in groups:
            byQueue.setdefault(self.routes.get(group[0], "events"), []).append(group)
        if len(byQueue) == 1:
            ((name, shares),) = byQueue.items()
            return self._put(name, shares, now, endpoint)
        puts = [self._put(name, shares, now, endpoint) for name, shares in byQueue.items()]
        return DeferredList(puts, fireOnOneErrback=True, consumeErrors=True).addCallbacks(
            lambda _: None, lambda f: f.value.subFailure
        )

    def _fresh(self, items: Sequence[CleanItem], now: float) -> List[_Group]:
        """
        C{items} grouped by token (in order within each), without those whose
        C{(token, $insert_id)} was stored within the dedupe window.
        """
        if not items:
            return []
        recent = self.recent
        if len(items) == 1:
            token, insertId, payload = items[0]
            if insertId is None:
                return [(token, [payload], [])]
            key = (token, insertId)
            return [] if recent.seen(key, now) else [(token, [payload], [key])]
        tokens = set(map(_TOKEN, items))
        if len(tokens) == 1:
            # One token, as nearly every request has: its group is built by
            # loops in C, and unless the window holds one of its keys, no
            # lookup per event either.
            (token,) = tokens
            insertIds = list(map(_INSERT_ID, items))
            if None in insertIds:
                insertIds = [i for i in insertIds if i is not None]
            keys = list(zip(repeat(token), insertIds))
            if not keys or not recent.holdsAny(keys):
                return [(token, list(map(_PAYLOAD, items)), keys)]
        seen = recent.seen
        groups: Dict[str, _Group] = {}
        for token, insertId, payload in items:
            group = groups.get(token)
            if group is None:
                group = groups[token] = (token, [], [])
            if insertId is not None:
                key = (token, insertId)
                if seen(key, now):
                    continue
                group[2].append(key)
            group[1].append(payload)
        return [group for group in groups.values() if group[1]]

    def _refuse(
        self, reason: str, items: Sequence[CleanItem], refusal: RequestRefused
    ) -> RequestRefused:
        """
        Count C{items} as rejected for C{reason}, per token too.

        @return: C{refusal}, for the caller to raise.
        """
        self.rejected[reason] = self.rejected.get(reason, 0) + len(items)
        now = self.clock.seconds()
        for token, count in Counter(item.token for item in items).items():
            self.counters.record(token, now, rejects=count)
        return refusal

    def countRefused(self, reason: str, count: int) -> None:
        """
        Count C{count} records refused before they reached the funnel (an
        unknown project token), under C{reason} in L{rejected}; not per
        token, since the tokens are not ours.
        """
        self.rejected[reason] = self.rejected.get(reason, 0) + count

    def _put(
        self, name: str, groups: List[_Group], started: float, endpoint: str
    ) -> Deferred[None]:
        """
        One write of C{groups} to queue C{name}, accounted as in flight
        until it settles, for the request to C{endpoint}.
        """
        if len(groups) == 1:
            payloads = groups[0][1]
        else:
            payloads = [payload for group in groups for payload in group[1]]
        sizes = [sum(map(len, group[1])) for group in groups]
        events, size = len(payloads), sum(sizes)
        counts = self.queues.get(name)
        if counts is None:
            counts = self.queues[name] = QueueCounts()
        counts.requests += 1
        counts.events += events
        counts.bytes += size
        self.eventsInFlight += events
        self.writesInFlight += 1
        return self.queue.put(name, payloads).addBoth(
            self._settled, name, counts, groups, sizes, started, endpoint
        )

    def _settled(
        self,
        result: object,
        name: str,
        counts: QueueCounts,
        groups: List[_Group],
        sizes: List[int],
        started: float,
        endpoint: str,
    ) -> object:
        """
        Account a settled write: stored (counted per token, its keys
        remembered for dedupe, shown on the live view) or failed (counted
        as rejects); end the drain if it was the last one.
        """
        now = self.clock.seconds()
        self.metrics.wrote(name, now - started)
        events = sum(len(group[1]) for group in groups)
        size = sum(sizes)
        counts.requests -= 1
        counts.events -= events
        counts.bytes -= size
        self.eventsInFlight -= events
        self.writesInFlight -= 1
        record = self.counters.record
        if isinstance(result, Failure):
            counts.failedRequests += 1
            counts.failedEvents += events
            for token, payloads, _ in groups:
                record(token, now, rejects=len(payloads))
        else:
            counts.storedRequests += 1
            counts.storedEvents += events
            counts.storedBytes += size
            for (token, payloads, keys), groupSize in zip(groups, sizes):
                record(token, now, events=len(payloads), size=groupSize)
                if keys:
                    self.recent.remember(keys, now)
            if self.live.active:
                self.live.accepted(endpoint, groups)
        if self.writesInFlight == 0 and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)
        return result

    def ready(self) -> bool:
        """
        Whether a request now would be stored: running (not draining), no
        stop asked for, the queue path works and the journal backlog is under
        its bound.
        """
        return (
            bool(self.running) and not self.stopping and not self.overBacklog and self.queue.ready()
        )

    def _pollBacklog(self) -> None:
        """
        Refresh L{backlog} from the queue's status.  Errors are logged, not
        raised, so that one bad status does not stop the polling.
        """
        try:
            backlog = backlogOf(self.queue.status())
        except Exception:
            self.log.failure("reading the queue backlog failed")
            return
        over = backlog >= self.maxBacklog
        if over != self.overBacklog:
            if over:
                self.log.warn(
                    "journal backlog {backlog} reached its bound {bound}: refusing requests",
                    backlog=backlog,
                    bound=self.maxBacklog,
                )
            else:
                self.log.info("journal backlog {backlog} is under its bound again", backlog=backlog)
        self.backlog, self.overBacklog = backlog, over

    def status(self) -> Dict[str, Any]:
        """
        Everything an operator asks about, JSON-able, for C{/stats}.
        """
        now = self.clock.seconds()
        limiter = self.limiter
        return {
            "uptime": round(now - self.startedAt, 3),
            "ready": self.ready(),
            "draining": self.draining,
            "stopping": self.stopping,
            "in_flight": {
                "events": self.eventsInFlight,
                "writes": self.writesInFlight,
                "limit": self.maxInFlight,
            },
            "backlog": {"events": self.backlog, "limit": self.maxBacklog, "over": self.overBacklog},
            "queues": {name: counts.snapshot() for name, counts in sorted(self.queues.items())},
            "rejected": dict(sorted(self.rejected.items())),
            "dedupe": {
                "hits": self.recent.hits,
                "entries": len(self.recent),
                "size": self.recent.maxSize,
                "ttl": self.recent.ttl,
            },
            "rate_limit": {
                "rate": None if limiter is None else limiter.rate,
                "rejected": self.rejected.get("rate_limit", 0),
                "tokens": 0 if limiter is None else len(limiter),
                "global_rate": None if limiter is None else limiter.globalRate,
                "global_rejected": self.rejected.get("global_rate_limit", 0),
            },
            "tokens": self.counters.snapshot(now),
            "backend": self.queue.status(),
            **{name: source() for name, source in self.statusSources.items()},
        }

    def startService(self) -> None:
        super().startService()
        self.startedAt = self.clock.seconds()
        self._poll.start(BACKLOG_POLL_INTERVAL, now=True)

    def stopService(self) -> Deferred[None]:
        """
        Refuse new work (and so stop being ready), then wait up to
        C{drainTimeout} for every write in flight to settle, so that the
        queues behind are stopped and flushed only once nothing more will
        come, and no request that could still be answered C{1} is cut off.
        """
        super().stopService()
        self.draining = True
        if self._poll.running:
            self._poll.stop()
        if not self.writesInFlight:
            return succeed(None)
        self.log.info(
            "draining {events} events in {writes} queue writes",
            events=self.eventsInFlight,
            writes=self.writesInFlight,
        )
        drained = self._drained = Deferred()
        timer = self.clock.callLater(self.drainTimeout, self._drainTimedOut)
        return drained.addCallback(lambda _: timer.cancel() if timer.active() else None)

    def _drainTimedOut(self) -> None:
        self.log.warn(
            "drain timed out after {timeout}s with {events} events unstored",
            timeout=self.drainTimeout,
            events=self.eventsInFlight,
        )
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.callback(None)
