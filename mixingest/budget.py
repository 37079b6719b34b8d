# -*- test-case-name: tests.test_hostile_http,tests.test_exposure -*-
"""
One memory budget for every request body the daemon is receiving.

C{--max-body} bounds a body, not the bodies of all connections at once:
sixty clients each sending nine megabytes (and never finishing) held half a
gigabyte.  Every body is charged here before it is buffered (a declared
C{Content-Length} all at once, when the headers are in; a chunked body as
its chunks arrive) and released once its request is answered or its
connection lost.  A body that does not fit is refused at once with 503 and
C{Retry-After}, before its bytes are read.

Small bodies (single events, an SDK's batch) are what real clients send, and
they must still get through while a few large ones fill the budget: large
bodies may fill it only up to C{limit - reserved}, leaving the rest to
bodies of at most C{smallBody} bytes.

Reactor-owned: no locks.
"""

from __future__ import annotations

from typing import Dict

from mixingest.defaults import DEFAULT_MAX_BUFFERED

__all__ = ["SMALL_BODY", "BodyBudget"]

SMALL_BODY = 64 * 1024
"""
Bodies up to this size may use the budget's reserve: a batch of 50 SDK
events is 15 to 30 KB.
"""


class BodyBudget:
    """
    Bytes of request bodies held, against a limit.

    @ivar used: bytes claimed now.
    @ivar refused: bodies refused for want of budget, since the start.
    @ivar peak: the most bytes ever claimed at once.
    """

    def __init__(self, limit: int = DEFAULT_MAX_BUFFERED, smallBody: int = SMALL_BODY) -> None:
        """
        @param limit: bytes of bodies held at most.
        @param smallBody: bodies up to this size may use the last eighth of
            C{limit}, which larger ones may not.
        """
        if limit <= 0 or smallBody < 0:
            raise ValueError("a body budget needs a positive limit")
        self.limit = limit
        self.smallBody = smallBody
        self.reserved = limit // 8
        self.used = 0
        self.refused = 0
        self.peak = 0

    def claim(self, size: int, bodySize: int) -> bool:
        """
        Claim C{size} more bytes for a body that will then hold C{bodySize}.

        @return: whether they were claimed; if not, the caller refuses the
            body (and it is counted as refused).
        """
        ceiling = self.limit if bodySize <= self.smallBody else self.limit - self.reserved
        used = self.used + size
        if used > ceiling:
            self.refused += 1
            return False
        self.used = used
        if used > self.peak:
            self.peak = used
        return True

    def release(self, size: int) -> None:
        """
        Give back C{size} bytes claimed earlier.
        """
        self.used -= size

    def status(self) -> Dict[str, int]:
        """
        The budget's figures, JSON-able, for C{/stats}.
        """
        return {
            "used": self.used,
            "peak": self.peak,
            "limit": self.limit,
            "reserved_for_small": self.reserved,
            "refused": self.refused,
        }
