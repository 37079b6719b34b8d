"""
C{twistd mixingest}: build the daemon's service tree from its options.

The tree, in start order (it stops in reverse, one child at a time): the
systemd watchdog (when asked for); the queue (the journal, or a remote
queue whose store-and-forward service owns the journal); the forwarder of
orphaned C{worker-K} journals; the admin listener (stopped after the drain,
so C{/readyz} and C{/stats} answer during it); the funnel; the GeoIP file
watcher (C{--geoip}); one listening endpoint per C{--listen};
L{FrozenHeap}; L{ShutdownGrace<mixingest.lifecycle.ShutdownGrace>} (on
SIGTERM, C{/readyz} turns 503 while everything still serves); then SIGHUP
handling and the service manager's READY/STOPPING notices.  With
C{--workers N} (N > 1) the tree is only the watchdog, the orphans'
forwarder and a L{WorkerSupervisor<mixingest.workers.WorkerSupervisor>}:
each worker it starts builds the tree above, on listening sockets it
inherits.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any, Optional, cast

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from mixingest.admin import AdminService
from mixingest.api import IngestAPI
from mixingest.auth import ImportSecrets
from mixingest.budget import BodyBudget
from mixingest.clientip import ClientAddress
from mixingest.dedupe import RecentInsertIds
from mixingest.funnel import Funnel
from mixingest.geoip import (
    PRIVACY_ANONYMISE,
    PRIVACY_DROP,
    PRIVACY_KEEP,
    GeoIPWatcher,
    Geolocator,
)
from mixingest.journal.framing import JournalFormatError, checkFormats
from mixingest.journal.retention import RetentionPolicy
from mixingest.journal.service import Journal
from mixingest.lifecycle import OrderedMultiService, ShutdownGrace
from mixingest.live import LiveTap
from mixingest.metrics import PublicSite
from mixingest.options import Options
from mixingest.orphans import makeOrphanService
from mixingest.queues.urls import JournalTarget, makeQueue
from mixingest.ratelimit import RateLimiter
from mixingest.reload import LimitsFile, Reloader, ReloadOnSignal, RoutesFile, SignalWorkers
from mixingest.secretfiles import REDIS_PASSWORD_ENV
from mixingest.systemd import Notifier, ReadyNotifier, Watchdog
from mixingest.tokens import TokenList
from mixingest.windows import TokenCounters
from mixingest.workers import (
    AdoptedListener,
    WorkerSupervisor,
    inheritedListeners,
    workerDirectory,
)

__all__ = ["Options", "makeService"]

log = Logger()


def _refuseUnknownFormats(dataDirs: list[str]) -> None:
    """
    Refuse to start, in one line naming the file and its version, on a
    journal segment this release cannot read, before any listener binds.
    (The journal checks again under its lock when it starts.)

    @raise SystemExit: with that line, for twistd to print and exit 1.
    """
    for dataDir in dataDirs:
        try:
            checkFormats(dataDir)
        except JournalFormatError as e:
            raise SystemExit(f"mixingest: not starting: {e}") from None


def makeService(options: Options, reactor: Optional[Any] = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as defaultReactor

        reactor = cast(Any, defaultReactor)
    top = OrderedMultiService()
    notifier = Notifier.fromEnvironment()
    if notifier.watchdogPeriod is not None:
        Watchdog(reactor, notifier).setServiceParent(top)
    reloader = Reloader(notifier)
    if options["workers"] > 1:
        _refuseUnknownFormats(
            [workerDirectory(options["data-dir"], k) for k in range(options["workers"])]
        )
        makeOrphanService(options, reactor).setServiceParent(top)
        supervisor = WorkerSupervisor(
            reactor,
            options["workers"],
            options["listen"],
            options.argv,
            options["data-dir"],
            options["admin-listen"],
            options["drain-timeout"] + options["shutdown-grace"],
        )
        supervisor.setServiceParent(top)
        reloader.register("workers", SignalWorkers(supervisor))
        _startWarnings(options, _limiterAtStart(options))
        _lifecycle(top, reactor, notifier, reloader, options)
        return top
    _refuseUnknownFormats([options["data-dir"]])
    journal = Journal(
        options["data-dir"],
        policy=options["fsync"],
        segmentSize=options["segment-size"],
        reactor=reactor,
        maxBytes=options["max-journal-bytes"],
        retention=_retention(options),
    )
    queue = makeQueue(options["queue"], journal, reactor, redisPrefix=options["redis-prefix"])
    IService(queue).setServiceParent(top)
    inherited = inheritedListeners()
    if inherited is None:  # a worker of --workers N owns no orphans: its parent does
        makeOrphanService(options, reactor).setServiceParent(top)
    funnel = Funnel(
        queue,
        reactor,
        routes=options["route"],
        drainTimeout=options["drain-timeout"],
        recent=RecentInsertIds(options["dedupe-size"], options["dedupe-ttl"]),
        counters=TokenCounters(options["max-tokens"]),
        limiter=_limiter(options),
        maxInFlight=options["max-in-flight"],
        maxBacklog=options["max-backlog"],
        live=LiveTap(reactor, options["live-sample"]),
    )
    AdminService(reactor, options["admin-listen"], funnel).setServiceParent(top)
    funnel.setServiceParent(top)
    secrets = None
    if options["import-secrets"] is not None:
        secrets = ImportSecrets.fromFile(options["import-secrets"], options["import-token-auth"])
        reloader.register("--import-secrets", secrets)
    tokens = None
    if options["tokens"] is not None:
        tokens = TokenList.fromFile(options["tokens"])
        reloader.register("--tokens", tokens)
    if options["routes-file"] is not None:
        routes = RoutesFile(options["routes-file"], funnel, options["route"])
        routes.reload()
        reloader.register("--routes-file", routes)
    if options["limits-file"] is not None:
        limits = LimitsFile(
            options["limits-file"],
            funnel,
            options["max-tokens"],
            options["rate-limit"],
            options["global-rate-limit"],
        )
        limits.reload()
        reloader.register("--limits-file", limits)
    if inherited is None:  # a worker's parent has warned
        _startWarnings(options, funnel.limiter)
    api = IngestAPI(
        funnel,
        reactor,
        maxBody=options["max-body"],
        maxBatch=options["max-batch"],
        secrets=secrets,
        clientAddress=ClientAddress(options["trusted-proxy"]),
        tokens=tokens,
        redirectHosts=options["redirect-allow"],
        geo=_geolocator(options, reactor, funnel, reloader, top),
    )
    site = PublicSite(
        api.resource(),
        maxBody=options["max-body"],
        accessLog=options["access-log"],
        timeout=options["idle-timeout"],
        headerTimeout=options["header-timeout"],
        bodyTimeout=options["body-timeout"],
        budget=BodyBudget(options["max-buffered-bytes"]),
        maxConnections=options["max-connections"],
        reactor=reactor,
        metrics=funnel.metrics,
        clock=reactor,
    )
    funnel.statusSources["http"] = site.status
    if inherited is not None:  # a worker of --workers N
        for fd, family in inherited:
            AdoptedListener(reactor, fd, family, site).setServiceParent(top)
    else:
        for description in options["listen"]:
            listener = StreamServerEndpointService(serverFromString(reactor, description), site)
            listener._raiseSynchronously = True
            listener.setServiceParent(top)
    FrozenHeap(reactor).setServiceParent(top)
    ShutdownGrace(reactor, funnel, options["shutdown-grace"]).setServiceParent(top)
    _lifecycle(top, reactor, notifier, reloader, options)
    return top


def _limiter(options: Options) -> Optional[RateLimiter]:
    """
    The limits of C{--rate-limit} and C{--global-rate-limit}, if any.
    """
    if options["rate-limit"] is None and options["global-rate-limit"] is None:
        return None
    return RateLimiter(options["rate-limit"], options["max-tokens"], options["global-rate-limit"])


@attrs.define
class _StartingLimits:
    """
    What L{LimitsFile} sets, for the parent of C{--workers N}: it has no
    funnel, and reads the file only to know the limits its workers start
    with.
    """

    limiter: Optional[RateLimiter]


def _limiterAtStart(options: Options) -> Optional[RateLimiter]:
    """
    The limits the daemon starts with: the command line's, overridden by
    C{--limits-file}.  A file that cannot be applied counts as absent here:
    each worker refuses it, with the reason.
    """
    limits = _StartingLimits(_limiter(options))
    if options["limits-file"] is not None:
        with contextlib.suppress(OSError, ValueError):
            LimitsFile(
                options["limits-file"],
                limits,
                options["max-tokens"],
                options["rate-limit"],
                options["global-rate-limit"],
            ).reload()
    return limits.limiter


def _startWarnings(options: Options, limiter: Optional[RateLimiter]) -> None:
    """
    Warn about settings that work but leave a door open, once per daemon:
    by the single process, or by the parent of C{--workers N} (its workers
    get the same options, and would only repeat it).

    @param limiter: the rate limits the daemon starts with.
    """
    if (
        limiter is not None
        and limiter.rate is not None
        and limiter.globalRate is None
        and options["tokens"] is None
    ):
        # A default global limit could refuse legitimate traffic: say so
        # instead, and leave the bound to the operator.
        log.warn(
            "the per-token rate limit does not bound a client that sends under a fresh "
            "project token per request; bound it with --global-rate-limit (events/s for all "
            "tokens together) or --tokens (the project tokens accepted)"
        )
    if options.redisPasswordInURL:
        log.warn(
            "the Redis password is in the --queue URL, which any local user can read in "
            "/proc/PID/cmdline of this process and of every worker; give it with "
            "--redis-password-file or {variable} instead",
            variable=REDIS_PASSWORD_ENV,
        )


def _geolocator(
    options: Options, reactor: Any, funnel: Funnel, reloader: Reloader, top: MultiService
) -> Optional[Geolocator]:
    """
    C{--geoip}: the database (opened by the options), reloaded on SIGHUP
    and when its file changes, counted in C{/stats} and C{/metrics}.
    """
    database = options["geoip"]
    if database is None:
        return None
    reloader.register("--geoip", database)
    GeoIPWatcher(database, reactor).setServiceParent(top)
    funnel.statusSources["geoip"] = database.status
    funnel.metrics.registry.register(database)
    privacy = PRIVACY_DROP
    if options["keep-ip"]:
        privacy = PRIVACY_KEEP
    elif options["anonymise-ip"]:
        privacy = PRIVACY_ANONYMISE
    return Geolocator(database, privacy)


def _retention(options: Options) -> Optional[RetentionPolicy]:
    """
    Journal-only mode frees the segments that every consumer group has read
    and holds the rest to the retention limits; with a remote queue, the
    store-and-forward service deletes what it forwarded instead.
    """
    if not isinstance(options["queue"], JournalTarget):
        return None
    return RetentionPolicy(
        maxBytes=options["retention-bytes"],
        maxAge=options["retention-age"],
        policy=options["retention-policy"],
        groupExpiry=options["group-expiry"],
    )


def _lifecycle(
    top: MultiService, reactor: Any, notifier: Notifier, reloader: Reloader, options: Options
) -> None:
    """
    The newest services, stopped first: SIGHUP handling, and the service
    manager's READY=1 (once all the others listen) and STOPPING=1.
    """
    ReloadOnSignal(reactor, reloader.reload).setServiceParent(top)
    if notifier.enabled:
        listening = ", ".join(options["listen"])
        ReadyNotifier(reactor, notifier, lambda: f"serving on {listening}").setServiceParent(top)


class FrozenHeap(Service):
    """
    Once the reactor runs, move every object alive into the garbage
    collector's permanent generation (C{gc.freeze}, CPython), once per
    process: the tens of thousands of objects of the code itself are then
    never walked again by full collections, which otherwise take some 30 ms
    each and set the p99 latency (see BENCHMARKS.md).  Not during startup:
    twistd installs its signal handlers after the services have started,
    and a SIGTERM before then would kill the daemon without a drain.
    """

    frozen = False

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._call: Optional[IDelayedCall] = None

    def startService(self) -> None:
        super().startService()
        self._call = self._reactor.callLater(0, self._freeze)

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()

    @staticmethod
    def _freeze() -> None:
        freeze = getattr(gc, "freeze", None)
        if freeze is not None and not FrozenHeap.frozen:
            FrozenHeap.frozen = True
            gc.collect()
            freeze()
