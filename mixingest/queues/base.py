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

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

from twisted.internet.defer import Deferred

__all__ = ["EventQueue", "ResolvableQueue"]


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

        @return: fires with C{None} once all are durably stored, or fails
            with L{mixingest.errors.QueueUnavailable} (or another exception)
            when they are not.
        """

    def ready(self) -> bool:
        """
        Whether a C{put} now is expected to succeed (for C{/readyz}).
        """

    def status(self) -> Mapping[str, Any]:
        """
        A JSON-able snapshot for C{/stats} and logs: health, backlog, servers.
        """


@runtime_checkable
class ResolvableQueue(EventQueue, Protocol):
    """
    A remote queue that stores each batch at most once, so that
    store-and-forward can make delivery exactly once (Redis, with its Lua
    script).  A remote without it (Kestrel) is forwarded to with plain
    C{put}: at-least-once.
    """

    def putJournaled(
        self, queue: str, items: Sequence[bytes], source: str, seqs: Sequence[int]
    ) -> Deferred[None]:
        """
        Store C{items}, read from journal C{source} where they have the
        increasing sequence numbers C{seqs}, skipping any item that an
        earlier C{putJournaled} from C{source} to C{queue} already stored: a
        batch resent after a crash or a timeout is stored once.
        """

    def resolve(self, queue: str, marker: bytes) -> Deferred[bool]:
        """
        Settle an L{InDoubt<mixingest.errors.InDoubt>} put: C{True} if it was stored, C{False} if it
        was not, in which case it is fenced off and never will be, however
        late it reaches the server.
        """
