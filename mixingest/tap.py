"""
C{twistd mixingest}: build the daemon's service tree from its options.

The tree, in start order (it stops in reverse, one child at a time): the
journal, the remote queue if any (with store-and-forward through the
journal), the admin listener (stopped after the drain, so C{/readyz} and
C{/stats} answer during it), the funnel, and one listening endpoint per
C{--listen}.
"""

from __future__ import annotations

from typing import Any, Optional, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import serverFromString

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

__all__ = ["Options", "makeService"]


def makeService(options: Options, reactor: Optional[Any] = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as defaultReactor

        reactor = cast(Any, defaultReactor)
    top = OrderedMultiService()
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
        reactor=reactor,
        metrics=funnel.metrics,
        clock=reactor,
    )
    for description in options["listen"]:
        listener = StreamServerEndpointService(serverFromString(reactor, description), site)
        listener._raiseSynchronously = True
        listener.setServiceParent(top)
    return top
