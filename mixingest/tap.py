"""
C{twistd mixingest}: build the daemon's service tree from its options.

The tree, in start order (it stops in reverse, one child at a time): the
queue (the journal, or a remote queue whose store-and-forward service owns
the journal), the admin listener (stopped after the drain, so C{/readyz} and
C{/stats} answer during it), the funnel, one listening endpoint per
C{--listen}, and L{FrozenHeap}.  With C{--workers N} (N > 1) the tree is
only a L{WorkerSupervisor<mixingest.workers.WorkerSupervisor>}: each worker
it starts builds the tree above, on listening sockets it inherits.
"""

from __future__ import annotations

import gc
from typing import Any, Optional, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall

from mixingest.admin import AdminService
from mixingest.api import IngestAPI
from mixingest.auth import ImportSecrets
from mixingest.clientip import ClientAddress
from mixingest.dedupe import RecentInsertIds
from mixingest.funnel import Funnel
from mixingest.journal.service import Journal
from mixingest.lifecycle import OrderedMultiService
from mixingest.metrics import MeteredSite
from mixingest.options import Options
from mixingest.queues.urls import makeQueue
from mixingest.ratelimit import RateLimiter
from mixingest.windows import TokenCounters
from mixingest.workers import AdoptedListener, WorkerSupervisor, inheritedListeners

__all__ = ["Options", "makeService"]


def makeService(options: Options, reactor: Optional[Any] = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as defaultReactor

        reactor = cast(Any, defaultReactor)
    top = OrderedMultiService()
    if options["workers"] > 1:
        WorkerSupervisor(
            reactor,
            options["workers"],
            options["listen"],
            options.argv,
            options["data-dir"],
            options["admin-listen"],
            options["drain-timeout"],
        ).setServiceParent(top)
        return top
    journal = Journal(
        options["data-dir"],
        policy=options["fsync"],
        segmentSize=options["segment-size"],
        reactor=reactor,
    )
    queue = makeQueue(options["queue"], journal, reactor, redisPrefix=options["redis-prefix"])
    IService(queue).setServiceParent(top)
    funnel = Funnel(
        queue,
        reactor,
        routes=options["route"],
        drainTimeout=options["drain-timeout"],
        recent=RecentInsertIds(options["dedupe-size"], options["dedupe-ttl"]),
        counters=TokenCounters(options["max-tokens"]),
        limiter=(
            None
            if options["rate-limit"] is None
            else RateLimiter(options["rate-limit"], options["max-tokens"])
        ),
        maxInFlight=options["max-in-flight"],
        maxBacklog=options["max-backlog"],
    )
    AdminService(reactor, options["admin-listen"], funnel).setServiceParent(top)
    funnel.setServiceParent(top)
    secrets = None
    if options["import-secrets"] is not None:
        secrets = ImportSecrets.fromFile(options["import-secrets"])
    api = IngestAPI(
        funnel,
        reactor,
        maxBody=options["max-body"],
        maxBatch=options["max-batch"],
        secrets=secrets,
        clientAddress=ClientAddress(options["trusted-proxy"]),
    )
    site = MeteredSite(
        api.resource(),
        maxBody=options["max-body"],
        accessLog=options["access-log"],
        timeout=options["idle-timeout"],
        headerTimeout=options["header-timeout"],
        bodyTimeout=options["body-timeout"],
        reactor=reactor,
        metrics=funnel.metrics,
        clock=reactor,
    )
    inherited = inheritedListeners()
    if inherited is not None:  # a worker of --workers N
        for fd, family in inherited:
            AdoptedListener(reactor, fd, family, site).setServiceParent(top)
    else:
        for description in options["listen"]:
            listener = StreamServerEndpointService(serverFromString(reactor, description), site)
            listener._raiseSynchronously = True
            listener.setServiceParent(top)
    FrozenHeap(reactor).setServiceParent(top)
    return top


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
