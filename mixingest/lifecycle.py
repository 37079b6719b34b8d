"""
A MultiService that stops its children one at a time, newest first.

Twisted's MultiService stops every child at once.  The daemon needs order:
stop listening, then let the funnel drain what is in flight, and only then
flush and close the queues those requests are waiting on.
"""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["OrderedMultiService"]


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
