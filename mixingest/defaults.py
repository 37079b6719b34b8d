"""
The defaults of C{twistd mixingest}'s options, in a module that imports
nothing: the command line (and C{--help}) is parsed without importing the
daemon (Klein, txredisapi, the funnel) it configures.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_ADMIN_LISTEN",
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_DEDUPE_SIZE",
    "DEFAULT_DEDUPE_TTL",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_BACKLOG",
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_BODY",
    "DEFAULT_MAX_BUFFERED",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_SHUTDOWN_GRACE",
]

DEFAULT_LISTEN = "tcp:8000"
DEFAULT_ADMIN_LISTEN = "tcp:8001:interface=127.0.0.1"
DEFAULT_MAX_BODY = 10 * 1024 * 1024
"""Bytes of a request body, before and after gzip."""
DEFAULT_MAX_BATCH = 2000
"""Records in one request."""
DEFAULT_MAX_BUFFERED = 128 * 1024 * 1024
"""
Bytes of request bodies held at once, all connections together: a dozen
bodies at the largest --max-body, or thousands of SDK batches.
"""
DEFAULT_MAX_CONNECTIONS = 1000
"""
Open connections per process past which new ones are answered 503: each
costs a descriptor (the common soft limit is 1024) and some 10 KB of
buffers before its body.
"""
DEFAULT_IDLE_TIMEOUT = 60
"""Seconds a keep-alive connection may sit idle between requests."""
DEFAULT_HEADER_TIMEOUT = 10
"""Seconds from a request's first byte (or a new connection) to the end of its headers."""
DEFAULT_BODY_TIMEOUT = 30
"""Seconds from the end of a request's headers to the end of its body."""
DEFAULT_MAX_IN_FLIGHT = 50_000
"""
Events handed to the queue and not yet stored, past which requests are
refused: at a few hundred bytes each plus the requests holding them, some
tens of MB.
"""
DEFAULT_MAX_BACKLOG = 10_000_000
"""
Events waiting in the journal for the remote queue, past which requests are
refused: the disk is the limit, and a remote that far behind needs an
operator more than more events.
"""
DEFAULT_DEDUPE_SIZE = 100_000
"""
(token, $insert_id) pairs remembered at most: about 250 bytes each with a
UUID-sized C{$insert_id}, so some 25 MB.  Retries are caught for the TTL or
for the next C{size / 2} events with an C{$insert_id}, whichever is shorter.
"""
DEFAULT_DEDUPE_TTL = 600.0
"""
Seconds a stored (token, $insert_id) pair is remembered: longer than any
SDK's retry schedule.
"""
DEFAULT_MAX_TOKENS = 1000
"""Project tokens tracked for counters and rate limits; each costs about 1 KB."""
DEFAULT_SHUTDOWN_GRACE = 5.0
"""
Seconds the daemon keeps serving after C{SIGTERM} with C{/readyz} at 503:
long enough for a load balancer checking every 2 s to see two failures.
"""
