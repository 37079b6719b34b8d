# -*- test-case-name: tests.test_admin -*-
"""
The operator endpoints, a Klein app of their own on C{--admin-listen} and
never on the public listeners: whoever can reach the public port must not
read per-project figures or make the daemon look unready.

  - C{/healthz}: 200 while the process serves at all (liveness).
  - C{/readyz}: 200 only when a request now would be stored: the queue
    path works and the journal backlog is under its bound, and the daemon
    is not stopping (from the start of the shutdown grace, while it still
    serves) nor draining; 503 otherwise (readiness, for load balancers).
  - C{/stats}: the funnel's L{status<mixingest.funnel.Funnel.status>} as
    JSON.
  - C{/metrics}: Prometheus exposition of the daemon's registry.
  - C{/live}: the live view's page, which reads C{/live/stream}, the
    records accepted, deduplicated and refused as Server-Sent Events (see
    L{mixingest.live}).
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any, Optional

from klein import Klein
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from mixingest.defaults import DEFAULT_ADMIN_LISTEN
from mixingest.funnel import Funnel
from mixingest.httpsite import HardenedSite
from mixingest.live import LiveStream

__all__ = ["DEFAULT_ADMIN_LISTEN", "AdminAPI", "AdminService", "AdminSite"]

ADMIN_MAX_BODY = 4096
"""The admin endpoints take no body; anything bigger is refused early."""


class AdminAPI:
    """
    The operator endpoints over one funnel.
    """

    app = Klein()

    def __init__(self, funnel: Funnel) -> None:
        self.funnel = funnel
        self._page: Optional[bytes] = None

    def resource(self) -> IResource:
        return self.app.resource()

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: IRequest) -> bytes:
        return _answer(request, 200, {"status": "ok"})

    @app.route("/readyz", methods=["GET", "HEAD"])
    def readyz(self, request: IRequest) -> bytes:
        funnel = self.funnel
        ready = funnel.ready()
        return _answer(
            request,
            200 if ready else 503,
            {
                "ready": ready,
                "stopping": funnel.stopping,
                "draining": funnel.draining,
                "queue_ready": funnel.queue.ready(),
                "backlog": funnel.backlog,
                "backlog_limit": funnel.maxBacklog,
            },
        )

    @app.route("/stats", methods=["GET", "HEAD"])
    def stats(self, request: IRequest) -> bytes:
        return _answer(request, 200, self.funnel.status())

    @app.route("/metrics", methods=["GET", "HEAD"])
    def metrics(self, request: IRequest) -> bytes:
        accept = request.getHeader(b"accept")
        body, contentType = self.funnel.metrics.exposition(
            accept.decode("latin-1") if accept else None
        )
        request.setHeader(b"content-type", contentType.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body

    @app.route("/live", methods=["GET", "HEAD"])
    def live(self, request: IRequest) -> bytes:
        if self._page is None:
            self._page = files("mixingest").joinpath("static/live.html").read_bytes()
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            b"connect-src 'self'; img-src data:",
        )
        request.setHeader(b"x-content-type-options", b"nosniff")
        return self._page

    @app.route("/live/stream", methods=["GET"])
    def liveStream(self, request: IRequest) -> IResource:
        return LiveStream(self.funnel.live)


def _answer(request: IRequest, code: int, document: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document).encode("utf-8") + b"\n"


class AdminSite(HardenedSite):
    """
    The site of the admin endpoints, named so that its log lines ("AdminSite
    starting on 8001") say which listener is which.
    """


class AdminService(MultiService):
    """
    The admin listener.  In the daemon's service tree it comes before the
    funnel, so that it is stopped after the funnel has drained: C{/readyz}
    says 503 and C{/stats} shows the drain while it happens.
    """

    def __init__(self, reactor: Any, description: str, funnel: Funnel) -> None:
        """
        @param description: the endpoint string to listen on.
        """
        super().__init__()
        self.funnel = funnel
        site = AdminSite(AdminAPI(funnel).resource(), maxBody=ADMIN_MAX_BODY, reactor=reactor)
        listener = StreamServerEndpointService(serverFromString(reactor, description), site)
        listener._raiseSynchronously = True
        listener.setServiceParent(self)

    def stopService(self) -> Deferred[None]:
        """
        Close the live viewers' streams too: they would otherwise outlive
        the listener and hold the process.
        """
        self.funnel.live.stop()
        return super().stopService()
