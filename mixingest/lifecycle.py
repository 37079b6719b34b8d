"""
How the daemon stops: in order, and not before its load balancer knows.

Twisted's MultiService stops every child at once.  The daemon needs order:
announce the stop (C{/readyz} turns 503) and keep serving for a grace
period, then stop listening, let the funnel drain what is in flight, and
only then flush and close the queues those requests are waiting on.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["OrderedMultiService", "ShutdownGrace"]


class OrderedMultiService(MultiService):
    log = Logger()

    def stopService(self) -> Deferred[None]:
        self.running = 0
        stopped: Deferred[None] = succeed(None)
        for child in reversed(list(self)):
            stopped.addCallback(_stop, child)
            stopped.addErrback(self._stopFailed, child)
        return stopped

    def _stopFailed(self, failure: Failure, child: IService) -> None:
        self.log.failure("stopping {child} failed", failure, child=child)


def _stop(_: None, child: IService) -> Deferred[None]:
    return maybeDeferred(child.stopService)


class _Advertised(Protocol):
    stopping: bool


class ShutdownGrace(Service):
    """
    The first service to stop (the newest of the tree): it marks the daemon
    as stopping, so C{/readyz} answers 503, and keeps everything serving for
    C{grace} seconds, so that a load balancer checking readiness stops
    sending before the listeners close.  Without it a balancer keeps sending
    to a closed port until its next checks fail: connections refused.
    """

    log = Logger()

    def __init__(self, clock: Any, advertised: _Advertised, grace: float) -> None:
        """
        @param advertised: what C{/readyz} reads C{stopping} from (the funnel).
        @param grace: seconds; 0 for none.
        """
        self._clock = clock
        self._advertised = advertised
        self.grace = grace

    def stopService(self) -> Optional[Deferred[None]]:
        super().stopService()
        self._advertised.stopping = True
        if self.grace <= 0:
            return None
        self.log.info(
            "stopping: /readyz is 503, serving {grace}s more before closing the listeners",
            grace=self.grace,
        )
        return deferLater(self._clock, self.grace, lambda: None)
