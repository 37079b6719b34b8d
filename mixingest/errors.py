"""
Why a request, or an event in it, was not stored: each carries the reason a
developer can act on and the HTTP status it is answered with.
"""

from __future__ import annotations

__all__ = [
    "BadAnswerParameter",
    "BodyTooLarge",
    "DecodeError",
    "InDoubt",
    "InvalidEvent",
    "Overloaded",
    "QueueUnavailable",
    "RateLimited",
    "RequestRefused",
    "Unauthorized",
]


class RequestRefused(Exception):
    """
    The whole request is refused and nothing of it is stored.

    @ivar status: the HTTP status of the answer.  Bad data on the classic
        endpoints is answered C{200} with C{0}, as Mixpanel does and as the
        SDKs expect: a 4xx makes the browser SDK drop the batch, which is right
        for bad data, but a 5xx makes every SDK retry, which is never right.
    @ivar retryAfter: seconds for a C{Retry-After} header, or L{None}.
    """

    status = 200
    retryAfter: int | None = None

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DecodeError(RequestRefused):
    """
    The payload cannot be decoded into JSON objects.
    """


class BodyTooLarge(RequestRefused):
    status = 413


class Unauthorized(RequestRefused):
    status = 401


class BadAnswerParameter(RequestRefused):
    """
    C{callback} or C{redirect} is unsafe; refused rather than echoed.
    """

    status = 400


class RateLimited(RequestRefused):
    status = 429

    def __init__(self, reason: str, retryAfter: int) -> None:
        super().__init__(reason)
        self.retryAfter = retryAfter


class Overloaded(RequestRefused):
    """
    The queue path cannot take the request now; the client should retry.
    """

    status = 503

    def __init__(self, reason: str, retryAfter: int) -> None:
        super().__init__(reason)
        self.retryAfter = retryAfter


class InvalidEvent(Exception):
    """
    One event of a batch is invalid; the others are still stored.

    @ivar field: the dotted path of the offending field, as in Mixpanel's
        C{failed_records}.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class QueueUnavailable(Exception):
    """
    The backend could not store the batch now (down, timed out, refused, full).

    Distinct from a bug: the funnel answers 503 with C{Retry-After} and the
    store-and-forward layer diverts the batch to the journal.
    """


class InDoubt(QueueUnavailable):
    """
    A put whose outcome is unknown: it was sent, but not answered in time
    (the remote stalled, timed out or dropped the connection after the
    command left).  The remote may still store it later, so simply sending
    a copy again could store it twice.

    @ivar marker: opaque bytes that the same remote can later settle with
        L{mixingest.queues.base.ResolvableQueue.resolve}.  The
        store-and-forward layer journals the marker just before the batch's
        copy, so that the question survives a restart.
    """

    def __init__(self, message: str, marker: bytes) -> None:
        super().__init__(message)
        self.marker = marker
