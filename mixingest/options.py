"""
The command line of C{twistd mixingest}: every knob an operator tunes.
"""

from __future__ import annotations

import os
import sys
from typing import Any, List, Optional, Sequence

from twisted.python import usage

from mixingest.admin import DEFAULT_ADMIN_LISTEN
from mixingest.api import DEFAULT_MAX_BATCH
from mixingest.clientip import parseNetwork
from mixingest.dedupe import DEFAULT_DEDUPE_SIZE, DEFAULT_DEDUPE_TTL
from mixingest.funnel import DEFAULT_MAX_BACKLOG, DEFAULT_MAX_IN_FLIGHT
from mixingest.httpsite import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BODY,
)
from mixingest.journal.fsync import FsyncPolicy
from mixingest.queues.base import validQueueName
from mixingest.queues.urls import parseQueueURL
from mixingest.windows import DEFAULT_MAX_TOKENS
from mixingest.workers import checkWorkerOptions

__all__ = ["Options"]

DEFAULT_LISTEN = "tcp:8000"


def _positive(name: str, convert: Any = int) -> Any:
    def check(value: str) -> Any:
        try:
            number = convert(value)
        except ValueError:
            raise usage.UsageError(f"--{name} must be a number, not {value!r}") from None
        if number <= 0:
            raise usage.UsageError(f"--{name} must be positive")
        return number

    return check


class Options(usage.Options):
    """
    Options for C{twistd mixingest}.
    """

    synopsis = "[options]"
    longdesc = (
        "Serve Mixpanel's ingestion API (/track, /engage, /groups, /import) and put "
        "every accepted event on a durable queue before answering."
    )

    optFlags = [
        ["access-log", None, "Log every request (costs about 15% of throughput)."],
    ]

    optParameters = [
        ["data-dir", "d", "mixingest-data", "Directory of the local journal."],
        [
            "queue",
            "q",
            "journal",
            "Where events go: journal, redis://[:PASSWORD@]HOST:PORT/DB, "
            "redis+unix:///PATH?db=N or kestrel://HOST:PORT[,HOST:PORT...].",
        ],
        [
            "import-secrets",
            None,
            None,
            "JSON file mapping project token to API secret, for /import.",
        ],
        [
            "max-body",
            None,
            DEFAULT_MAX_BODY,
            "Largest request body, in bytes, before and after gzip.",
            _positive("max-body"),
        ],
        [
            "max-batch",
            None,
            DEFAULT_MAX_BATCH,
            "Most records in one request.",
            _positive("max-batch"),
        ],
        ["fsync", None, "always", "Journal durability: always, interval:MS or never."],
        [
            "segment-size",
            None,
            64 * 1024 * 1024,
            "Journal segment size in bytes.",
            _positive("segment-size"),
        ],
        [
            "header-timeout",
            None,
            DEFAULT_HEADER_TIMEOUT,
            "Seconds a request's line and headers may take to arrive (against slowloris).",
            _positive("header-timeout", float),
        ],
        [
            "body-timeout",
            None,
            DEFAULT_BODY_TIMEOUT,
            "Seconds a request's body may take to arrive after its headers.",
            _positive("body-timeout", float),
        ],
        [
            "idle-timeout",
            None,
            DEFAULT_IDLE_TIMEOUT,
            "Seconds before an idle connection is closed.",
            _positive("idle-timeout", float),
        ],
        [
            "drain-timeout",
            None,
            20.0,
            "Seconds a graceful stop waits for events in flight.",
            _positive("drain-timeout", float),
        ],
        ["redis-prefix", None, "", "Prefix for Redis list names."],
        [
            "admin-listen",
            None,
            DEFAULT_ADMIN_LISTEN,
            "Endpoint for /healthz, /readyz, /stats and /metrics (keep it off the public network).",
        ],
        [
            "dedupe-size",
            None,
            DEFAULT_DEDUPE_SIZE,
            "Most (token, $insert_id) pairs remembered to answer retries without storing twice.",
            _positive("dedupe-size"),
        ],
        [
            "dedupe-ttl",
            None,
            DEFAULT_DEDUPE_TTL,
            "Seconds a stored (token, $insert_id) pair is remembered.",
            _positive("dedupe-ttl", float),
        ],
        [
            "rate-limit",
            None,
            None,
            "Events per second per project token; over it, 429 (default: no limit).",
            _positive("rate-limit", float),
        ],
        [
            "max-in-flight",
            None,
            DEFAULT_MAX_IN_FLIGHT,
            "Events waiting to be stored, past which requests get 503.",
            _positive("max-in-flight"),
        ],
        [
            "max-backlog",
            None,
            DEFAULT_MAX_BACKLOG,
            "Events in the journal waiting for the remote queue, past which requests get 503.",
            _positive("max-backlog"),
        ],
        [
            "max-tokens",
            None,
            DEFAULT_MAX_TOKENS,
            "Project tokens tracked for counters and rate limits (least recently seen forgotten).",
            _positive("max-tokens"),
        ],
        [
            "workers",
            None,
            1,
            "Processes serving the same port(s), each with its journal in DATA_DIR/worker-K "
            "(restarted if they die).",
            _positive("workers"),
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["trusted-proxy"] = []
        self["route"] = {}
        self.argv: List[str] = []

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        # Kept for --workers: every worker is started with the same options.
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_listen(self, endpoint: str) -> None:
        """
        Endpoint to serve the API on (repeatable; default tcp:8000), e.g.
        tcp:8000:interface=127.0.0.1, ssl:8443:privateKey=key.pem, unix:/run/mixingest.sock.
        """
        self["listen"].append(endpoint)

    def opt_trusted_proxy(self, cidr: str) -> None:
        """
        Network whose X-Forwarded-For is believed (repeatable), e.g. 10.0.0.0/8; 'unix' trusts
        Unix-socket peers.
        """
        try:
            parseNetwork(cidr)
        except ValueError:
            raise usage.UsageError(f"--trusted-proxy: {cidr!r} is not a network") from None
        self["trusted-proxy"].append(cidr)

    def opt_route(self, rule: str) -> None:
        """
        TOKEN=QUEUE: send that project's /track and /import events to QUEUE instead of
        'events' (repeatable).
        """
        token, sep, queue = rule.partition("=")
        if not sep or not token or not validQueueName(queue):
            raise usage.UsageError(
                f"--route takes TOKEN=QUEUE with a queue name of letters, digits, _ and -: {rule!r}"
            )
        self["route"][token] = queue

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        try:
            self["fsync"] = FsyncPolicy.parse(self["fsync"])
        except ValueError as e:
            raise usage.UsageError(f"--fsync: {e}") from None
        try:
            self["queue"] = parseQueueURL(self["queue"])
        except ValueError as e:
            raise usage.UsageError(f"--queue: {e}") from None
        secrets = self["import-secrets"]
        if secrets is not None and not os.path.isfile(secrets):
            raise usage.UsageError(f"--import-secrets: no such file {secrets!r}")
        if self["workers"] > 1:
            checkWorkerOptions(self)
