# -*- test-case-name: tests.test_upstream -*-
"""
Every private (or undocumented) attribute of Twisted, Klein and txredisapi
that mixingest relies on, with where and why: no public API does the job.

An upstream release may rename or drop any of them without notice, so
C{tests/test_upstream.py} checks that each still exists on the installed
versions, and the C{newest} tox environment runs that test (and the whole
suite) against the newest releases: drift fails CI in one place, with the
reason next to it, rather than somewhere deep in a request.

Not code the daemon runs: a register kept next to the code, for people and
for the test.  A new use of a private attribute goes here too.
"""

from __future__ import annotations

from typing import Tuple

import attrs

__all__ = ["PRIVATE_USES", "PrivateUse"]


@attrs.frozen
class PrivateUse:
    """
    One private attribute relied upon.

    @ivar owner: the dotted name of the upstream module or class.
    @ivar attribute: the attribute's name on it (on its instances if
        C{instance}).
    @ivar instance: set per instance, so the test checks an instance.
    @ivar user: where mixingest uses it.
    @ivar why: why no public API does.
    """

    owner: str
    attribute: str
    user: str
    why: str
    instance: bool = False


_ENDPOINT_WHY = (
    "--workers opens the listening sockets itself (SO_REUSEPORT, one per worker) for the "
    "address an endpoint string describes; endpoints do not expose what they parsed"
)
_KLEIN_WHY = (
    "AcyclicKleinResource is KleinResource.render without its reference cycle per request "
    "(see _klein.py): it needs the same helpers render uses"
)
_CHANNEL_WHY = (
    "IngestChannel's deadlines, bounded heads and early refusal of oversized bodies hook "
    "into HTTPChannel's parser state, which has no public API"
)
_LOGFILE_WHY = (
    "SIGHUP reopens twistd's --logfile, which twistd keeps to itself: reload.twistdLogFiles "
    "finds it as the _outFile of an observer among the global log publisher's _observers"
)
_REDIS_WHY = (
    "RedisQueue assembles txredisapi's lazy pool itself (as lazyConnectionPool does) to be "
    "told when connections come and go and to connect on the injected reactor's endpoint"
)

PRIVATE_USES: Tuple[PrivateUse, ...] = (
    PrivateUse(
        "twisted.application.internet.StreamServerEndpointService",
        "_raiseSynchronously",
        "tap.py, admin.py",
        "a port that cannot be bound must stop twistd at start, not be logged and ignored",
    ),
    *(
        PrivateUse(
            "twisted.internet.endpoints.TCP4ServerEndpoint", name, "workers.py", _ENDPOINT_WHY, True
        )
        for name in ("_interface", "_port", "_backlog")
    ),
    *(
        PrivateUse(
            "twisted.internet.endpoints.UNIXServerEndpoint", name, "workers.py", _ENDPOINT_WHY, True
        )
        for name in ("_address", "_mode", "_backlog")
    ),
    *(
        PrivateUse("klein._resource", name, "_klein.py", _KLEIN_WHY)
        for name in ("StandInResource", "ensure_utf8_bytes", "extractURLparts", "URLDecodeError")
    ),
    PrivateUse("klein._app", "route_metadata", "_klein.py", _KLEIN_WHY),
    PrivateUse("klein.Response", "_applyToRequest", "_klein.py", _KLEIN_WHY),
    PrivateUse("klein.resource.KleinResource", "_app", "_klein.py", _KLEIN_WHY, True),
    *(
        PrivateUse("klein.Klein", name, "_klein.py", _KLEIN_WHY, True)
        for name in ("_error_handlers", "url_map", "endpoints", "execute_endpoint")
    ),
    PrivateUse("klein.Klein", "execute_error_handler", "_klein.py", _KLEIN_WHY),
    *(
        PrivateUse("twisted.web.http.HTTPChannel", name, "httpsite.py", _CHANNEL_WHY, True)
        for name in (
            "_handlingRequest",
            "_receivedHeaderSize",
            "_receivedHeaderCount",
            "_respondToBadRequestAndDisconnect",
            "_finishRequestBody",
            "_networkProducer",
            "_abortingCall",
        )
    ),
    PrivateUse(
        "twisted.web.server.Request",
        "_handleStar",
        "httpsite.py",
        "IngestRequest.process is Request.process without its per-request Date formatting",
    ),
    PrivateUse(
        "twisted.web.server.Request",
        "_encoder",
        "httpsite.py",
        "IngestRequest.process is Request.process without its per-request Date formatting",
    ),
    PrivateUse(
        "twisted.web.resource",
        "_IEncodingResource",
        "httpsite.py",
        "IngestRequest.process is Request.process without its per-request Date formatting",
    ),
    PrivateUse(
        "twisted.web.http",
        "_parseRequestLine",
        "httpsite.py",
        "replaced by one that checks the request target with bytes.translate instead of a "
        "Python loop per byte (HTTPChannel calls the module function: no subclass hook)",
    ),
    PrivateUse(
        "twisted.web.server.Site",
        "_parsePOSTFormSubmission",
        "httpsite.py",
        "the only switch for Twisted's second parse of every form body (Twisted >= 24.7)",
        True,
    ),
    PrivateUse("twisted.logger.LogPublisher", "_observers", "reload.py", _LOGFILE_WHY, True),
    PrivateUse("twisted.logger.FileLogObserver", "_outFile", "reload.py", _LOGFILE_WHY, True),
    *(
        PrivateUse("txredisapi.RedisFactory", name, "queues/redis.py", _REDIS_WHY)
        for name in (
            "addConnection",
            "delConnection",
            "startConnecting",
            "disconnect",
            "initialDelay",
            "maxDelay",
        )
    ),
    *(
        PrivateUse("txredisapi.RedisFactory", name, "queues/redis.py", _REDIS_WHY, True)
        for name in ("handler", "pool", "size", "deferred")
    ),
    *(
        PrivateUse(
            "txredisapi.RedisProtocol",
            name,
            "queues/redis.py",
            "a batch's command is encoded in one join, items passed through as bytes: "
            "txredisapi's argument-by-argument encoder was half the write path's CPU",
        )
        for name in ("_build_command", "_encode_value")
    ),
)
