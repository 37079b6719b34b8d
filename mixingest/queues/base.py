"""
What the funnel needs from a queue backend, and nothing more.

A backend takes batches of already-encoded items (one JSON object each, as
C{bytes}) for a named queue and fires the returned Deferred only once every
item of the batch is durably stored: in the journal under its fsync policy,
or acknowledged by Redis or Kestrel.  A batch is stored whole or not at all as
far as the caller knows: on failure the caller must assume none of it was
acknowledged (a remote queue may still hold some of it: at-least-once).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from twisted.internet.defer import Deferred

__all__ = [
    "QUEUE_NAME",
    "EventQueue",
    "QueueUnavailable",
    "validQueueName",
]

QUEUE_NAME = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
"""
Queue names that every backend can carry: Kestrel forbids C{/ ~ + .}, the
journal uses the name as a directory, Redis takes anything.
"""


def validQueueName(name: str) -> bool:
    return QUEUE_NAME.match(name) is not None


class QueueUnavailable(Exception):
    """
    The backend could not store the batch now (down, timed out, refused, full).

    Distinct from a bug: the funnel answers 503 with C{Retry-After} and the
    store-and-forward layer diverts the batch to the journal.
    """


@runtime_checkable
class EventQueue(Protocol):
    """
    A durable queue backend.  It is also a Twisted C{IService}, added as a
    child of the daemon's MultiService, so C{stopService} can flush it.
    """

    def startService(self) -> None: ...

    def stopService(self) -> Deferred[None] | None: ...

    def put(self, queue: str, items: Sequence[bytes]) -> Deferred[None]:
        """
        Store C{items} at the tail of C{queue}, in order.

        @return: fires with C{None} once all are durably stored, or fails with
            L{QueueUnavailable} (or another exception) when they are not.
        """

    def ready(self) -> bool:
        """
        Whether a C{put} now is expected to succeed (for C{/readyz}).
        """

    def status(self) -> Mapping[str, Any]:
        """
        A JSON-able snapshot for C{/stats} and logs: health, backlog, servers.
        """
