"""
The command line of C{twistd mixingest}: every knob an operator tunes.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, List, Optional, Sequence

import attrs
from twisted.python import usage

from mixingest.clientip import parseNetwork
from mixingest.defaults import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_DEDUPE_SIZE,
    DEFAULT_DEDUPE_TTL,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_LISTEN,
    DEFAULT_MAX_BACKLOG,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_BUFFERED,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_TOKENS,
    DEFAULT_SHUTDOWN_GRACE,
)
from mixingest.journal.fsync import FsyncPolicy
from mixingest.live import DEFAULT_LIVE_SAMPLE
from mixingest.naming import WORKER_DIRECTORY, validQueueName
from mixingest.secretfiles import REDIS_PASSWORD_ENV, readSecretFile
from mixingest.workers import checkWorkerOptions

__all__ = ["Options"]

_HOST_NAME = re.compile(r"\A[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")


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


def _share(name: str) -> Any:
    def check(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise usage.UsageError(f"--{name} must be a number, not {value!r}") from None
        if not 0 < number <= 1:
            raise usage.UsageError(f"--{name} must be more than 0 and at most 1")
        return number

    return check


def _notNegative(name: str) -> Any:
    def check(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise usage.UsageError(f"--{name} must be a number, not {value!r}") from None
        if not number >= 0:
            raise usage.UsageError(f"--{name} must be 0 or more")
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
        [
            "keep-ip",
            None,
            "With --geoip: store the client address (properties.ip, $ip) as without it.",
        ],
        [
            "anonymise-ip",
            None,
            "With --geoip: store the client address truncated (IPv4 last octet, IPv6 last 80 "
            "bits zeroed).",
        ],
        [
            "import-token-auth",
            None,
            "Accept a project token as /import credentials (HTTP Basic TOKEN:, as Mixpanel and "
            "its Java SDK do): anyone who knows the public token may then import and backdate "
            "events.",
        ],
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
            "geoip",
            None,
            None,
            "MaxMind GeoIP2/GeoLite2 City or Country database (.mmdb): events and profile updates "
            "get $city, $region and a country code, and the client address is no longer stored "
            "(see --keep-ip); reloaded on SIGHUP or when the file changes.",
        ],
        [
            "tokens",
            None,
            None,
            "JSON file: an array of the project tokens accepted; records for any other are "
            "refused (default: any token).",
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
        [
            "max-buffered-bytes",
            None,
            DEFAULT_MAX_BUFFERED,
            "Bytes of request bodies held at once, all connections together; a body that does "
            "not fit gets 503 before it is read.",
            _positive("max-buffered-bytes"),
        ],
        [
            "max-connections",
            None,
            DEFAULT_MAX_CONNECTIONS,
            "Open connections on the public listeners (per process), past which new ones get "
            "503 and are closed.",
            _positive("max-connections"),
        ],
        ["fsync", None, "always", "Journal durability: always, interval:MS or never."],
        [
            "max-journal-bytes",
            None,
            None,
            "Largest total size of the journal's segments, in bytes; past it new events get 503 "
            "and /readyz is 503 (default: 90% of the space the journal has at start, i.e. its own "
            "segments plus the free space of its file system).",
            _positive("max-journal-bytes"),
        ],
        [
            "retention-bytes",
            None,
            None,
            "Journal-only mode: largest size of a queue's segments kept for consumer groups that "
            "have not read them; past it, --retention-policy applies (default: no limit).",
            _positive("retention-bytes"),
        ],
        [
            "retention-age",
            None,
            None,
            "Journal-only mode: seconds a segment is kept for consumer groups that have not read "
            "it; past it, --retention-policy applies (default: no limit).",
            _positive("retention-age", float),
        ],
        [
            "retention-policy",
            None,
            "refuse",
            "Past --retention-bytes or --retention-age: refuse (new events for the queue get 503, "
            "nothing acknowledged is lost) or drop (delete the oldest segments, logged and "
            "counted).",
        ],
        [
            "group-expiry",
            None,
            None,
            "Journal-only mode: delete the cursor of a consumer group that has not committed for "
            "this many seconds, so that retention stops keeping segments for it (default: never).",
            _positive("group-expiry", float),
        ],
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
        [
            "shutdown-grace",
            None,
            DEFAULT_SHUTDOWN_GRACE,
            "Seconds the daemon keeps serving after SIGTERM with /readyz at 503, so that a load "
            "balancer stops sending before the listeners close (0: none).",
            _notNegative("shutdown-grace"),
        ],
        [
            "routes-file",
            None,
            None,
            "JSON file mapping project token to queue name, like --route; re-read on SIGHUP.",
        ],
        [
            "limits-file",
            None,
            None,
            'JSON file {"rate_limit": N, "global_rate_limit": N} (null: none), overriding '
            "--rate-limit and --global-rate-limit; re-read on SIGHUP.",
        ],
        ["redis-prefix", None, "", "Prefix for Redis list names."],
        [
            "redis-password-file",
            None,
            None,
            "File holding the Redis password, kept out of the process list (or set "
            "MIXINGEST_REDIS_PASSWORD); the --queue URL then has no password.",
        ],
        [
            "admin-listen",
            None,
            DEFAULT_ADMIN_LISTEN,
            "Endpoint for /healthz, /readyz, /stats, /metrics and /live (keep it off the public "
            "network).",
        ],
        [
            "live-sample",
            None,
            DEFAULT_LIVE_SAMPLE,
            "Share of records shown on the /live page, in (0, 1]; counts are never sampled.",
            _share("live-sample"),
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
            "global-rate-limit",
            None,
            None,
            "Events per second for all tokens together; over it, 429 (default: no limit).",
            _positive("global-rate-limit", float),
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
        self["redirect-allow"] = []
        self.argv: List[str] = []
        self.redisPasswordInURL = False
        """
        The Redis password came in the C{--queue} URL, where every local user
        can read it: the daemon warns at start.
        """

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
        if WORKER_DIRECTORY.match(queue):
            raise usage.UsageError(
                f"--route: {queue!r} is the name of a --workers journal directory, not a queue"
            )
        if not sep or not token or not validQueueName(queue):
            raise usage.UsageError(
                f"--route takes TOKEN=QUEUE with a queue name of letters, digits, _ and -: {rule!r}"
            )
        self["route"][token] = queue

    def opt_redirect_allow(self, host: str) -> None:
        """
        Host name that redirect= may send a browser to (repeatable); without it redirect= is
        refused (an open redirect).
        """
        if not _HOST_NAME.match(host):
            raise usage.UsageError(f"--redirect-allow takes a host name, not {host!r}")
        self["redirect-allow"].append(host.lower())

    def _redisPassword(self) -> None:
        """
        Give the Redis target the password from C{--redis-password-file} or
        the environment, which keep it out of C{/proc/*/cmdline}.
        """
        path = self["redis-password-file"]
        if path is not None:
            try:
                password: Optional[str] = readSecretFile(path, "Redis password")
            except ValueError as e:
                raise usage.UsageError(f"--redis-password-file: {e}") from None
            source = "--redis-password-file"
        else:
            password = os.environ.get(REDIS_PASSWORD_ENV) or None
            source = REDIS_PASSWORD_ENV
        from mixingest.queues.urls import RedisTarget  # see postOptions

        target = self["queue"]
        if password is None:
            self.redisPasswordInURL = (
                isinstance(target, RedisTarget) and target.password is not None
            )
            return
        if not isinstance(target, RedisTarget):
            if path is None:
                return
            raise usage.UsageError("--redis-password-file applies to a redis:// queue only")
        if target.password is not None:
            raise usage.UsageError(
                f"the Redis password is given twice: in the --queue URL and by {source}"
            )
        self["queue"] = attrs.evolve(target, password=password)

    def _geoip(self) -> None:
        """
        Open the C{--geoip} database now, so that a missing or corrupt one is
        a clear error at start; check the IP privacy options that need it.
        """
        if self["keep-ip"] and self["anonymise-ip"]:
            raise usage.UsageError("--keep-ip and --anonymise-ip are exclusive")
        path = self["geoip"]
        if path is None:
            if self["keep-ip"] or self["anonymise-ip"]:
                raise usage.UsageError("--keep-ip and --anonymise-ip apply with --geoip only")
            return
        from mixingest.geoip import GeoIPDatabase  # maxminddb only when asked for

        try:
            self["geoip"] = GeoIPDatabase(path)
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"--geoip: {e}") from None

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        try:
            self["fsync"] = FsyncPolicy.parse(self["fsync"])
        except ValueError as e:
            raise usage.UsageError(f"--fsync: {e}") from None
        # Imported here: the module brings the queue backends (txredisapi)
        # that parsing the command line does not need.
        from mixingest.queues.urls import parseQueueURL

        try:
            self["queue"] = parseQueueURL(self["queue"])
        except ValueError as e:
            raise usage.UsageError(f"--queue: {e}") from None
        self._redisPassword()
        if self["retention-policy"] not in ("refuse", "drop"):
            raise usage.UsageError("--retention-policy must be refuse or drop")
        # A body of --max-body must fit in the share of the budget large
        # bodies get (7/8), or it would be answered 503 forever.
        least = -(-self["max-body"] * 8 // 7)
        if self["max-buffered-bytes"] < least:
            raise usage.UsageError(
                f"--max-buffered-bytes must be at least {least} (8/7 of --max-body)"
            )
        self._geoip()
        for name in ("import-secrets", "tokens", "routes-file", "limits-file"):
            path = self[name]
            if path is not None and not os.path.isfile(path):
                raise usage.UsageError(f"--{name}: no such file {path!r}")
        if self["workers"] > 1:
            checkWorkerOptions(self)
