# -*- test-case-name: tests.test_queue_urls -*-
"""
The C{--queue} option: a URL naming where events go.

  - C{journal} or empty: the local journal only;
  - C{redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?OPTIONS]}: Redis lists
    (port 6379, database 0 by default);
  - C{redis+unix:///path/to.sock[?db=N][&OPTIONS]}: the same over a UNIX socket;
  - C{kestrel://HOST[:PORT][,HOST[:PORT]...]}: a Kestrel cluster (port
    22133 by default).

Redis options: C{timeout=SECONDS} (the write timeout), C{ttl=SECONDS} (how
long a producer's high-water mark outlives its last write), C{replicas=N}
(C{WAIT} for N replicas after each write) and C{wait=aof} (C{WAITAOF}: each
write fsynced to the primary's append-only file, Redis 7.2 or later).

A remote queue is always wrapped in store-and-forward over the journal, so
an outage of the remote delays events but never loses or refuses them.

Parsing is separate from building so that C{twistd} rejects a bad URL with
a usage error before anything starts.
"""

from __future__ import annotations

import math
import re
from typing import Any, Union
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint

from mixingest.queues.base import EventQueue
from mixingest.queues.forwarding import ForwardingQueue, Spool
from mixingest.queues.kestrel import DEFAULT_PORT as KESTREL_PORT
from mixingest.queues.kestrel import KestrelQueue
from mixingest.queues.redis import DEFAULT_MARK_TTL, RedisQueue

__all__ = [
    "JournalTarget",
    "KestrelTarget",
    "QueueTarget",
    "RedisTarget",
    "makeQueue",
    "parseQueueURL",
]

REDIS_PORT = 6379

_CREDENTIALS = re.compile(r"(://[^/]*?:)[^/]*@")
CONNECT_TIMEOUT = 5.0


@attrs.frozen
class JournalTarget:
    """The local journal only."""


@attrs.frozen
class RedisTarget:
    """
    A Redis server, by TCP (C{host}, C{port}) or UNIX socket (C{path}).
    """

    host: str | None = None
    port: int = REDIS_PORT
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    timeout: float | None = None
    """The write timeout in seconds, or C{None} for L{makeQueue}'s."""
    ttl: int = DEFAULT_MARK_TTL
    replicas: int = 0
    waitAOF: bool = False

    @property
    def address(self) -> str:
        """The server's address for logs and status, without credentials."""
        if self.path is not None:
            return f"redis+unix://{self.path}?db={self.db}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"


@attrs.frozen
class KestrelTarget:
    """The C{(host, port)} of each server of a Kestrel cluster."""

    servers: tuple[tuple[str, int], ...]


QueueTarget = Union[JournalTarget, RedisTarget, KestrelTarget]


def parseQueueURL(url: str) -> QueueTarget:
    """
    Parse a C{--queue} value.

    @raise ValueError: with a message fit for the command line (and
        without the password, which may end up in logs).
    """
    text = url.strip()
    url = _CREDENTIALS.sub(r"\1***@", text)
    if text in ("", "journal"):
        return JournalTarget()
    scheme, sep, _ = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("redis", "redis+unix", "kestrel"):
        raise ValueError(
            f"--queue {url!r}: expected 'journal', redis://HOST:PORT/DB, "
            "redis+unix:///path.sock?db=N or kestrel://HOST:PORT[,HOST:PORT...]"
        )
    if scheme == "kestrel":
        return _parseKestrel(url, text[len("kestrel://") :])
    return _parseRedis(url, text, unix=scheme == "redis+unix")


def _parseKestrel(url: str, rest: str) -> KestrelTarget:
    rest = rest.rstrip("/")
    if not rest or any(c in rest for c in "/?#@"):
        raise ValueError(
            f"--queue {url!r}: expected kestrel://HOST[:PORT][,HOST[:PORT]...] and nothing else"
        )
    servers = []
    for part in rest.split(","):
        host, port = _hostPort(url, part.strip(), KESTREL_PORT)
        if (host, port) in servers:
            raise ValueError(f"--queue {url!r}: server {part.strip()} is listed twice")
        servers.append((host, port))
    return KestrelTarget(tuple(servers))


def _hostPort(url: str, text: str, defaultPort: int) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, after = text[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ValueError(f"--queue {url!r}: bad IPv6 address {text!r}")
        colon, portText = after[:1], after[1:]
    elif text.count(":") > 1:
        raise ValueError(f"--queue {url!r}: put an IPv6 address in brackets: [{text}]")
    else:
        host, colon, portText = text.partition(":")
    if not host:
        raise ValueError(f"--queue {url!r}: missing host in {text!r}")
    if not colon:
        return host, defaultPort
    return host, _port(url, portText)


def _port(url: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"--queue {url!r}: port must be a number from 1 to 65535, not {text!r}")
    return int(text)


def _db(url: str, text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"--queue {url!r}: the Redis database must be a number, not {text!r}")
    return int(text)


def _parseRedis(url: str, text: str, unix: bool) -> RedisTarget:
    try:
        parts = urlsplit(text)
    except ValueError as e:
        raise ValueError(f"--queue {url!r}: {e}") from None
    if parts.fragment:
        raise ValueError(f"--queue {url!r}: unexpected fragment #{parts.fragment}")
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    allowed = _REDIS_OPTIONS | {"db"} if unix else _REDIS_OPTIONS
    unknown = set(query) - allowed
    if unknown:
        raise ValueError(f"--queue {url!r}: unknown parameter(s) {', '.join(sorted(unknown))}")
    for name, values in query.items():
        if len(values) != 1:
            raise ValueError(f"--queue {url!r}: {name} given more than once")
    options = _redisOptions(url, {name: values[0] for name, values in query.items()})
    userinfo, at, hostport = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
        if password is None:
            raise ValueError(f"--queue {url!r}: write the password as :PASSWORD@ (empty user)")
    if unix:
        if hostport:
            raise ValueError(
                f"--queue {url!r}: a UNIX socket URL has no host: redis+unix:///path/to.sock"
            )
        path = unquote(parts.path)
        if not path.startswith("/") or path == "/":
            raise ValueError(f"--queue {url!r}: missing the absolute path of the socket")
        db = _db(url, query.get("db", ["0"])[0])
        return RedisTarget(path=path, db=db, username=username, password=password, **options)
    host, port = _hostPort(url, hostport, REDIS_PORT)
    dbText = parts.path.strip("/") or "0"
    return RedisTarget(
        host=host, port=port, db=_db(url, dbText), username=username, password=password, **options
    )


_REDIS_OPTIONS = {"timeout", "ttl", "replicas", "wait"}


def _redisOptions(url: str, query: dict[str, str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if "timeout" in query:
        try:
            timeout = float(query["timeout"])
        except ValueError:
            timeout = math.nan
        if not 0 < timeout <= 3600:
            raise ValueError(
                f"--queue {url!r}: timeout must be a number of seconds above 0 and at most "
                f"3600, not {query['timeout']!r}"
            )
        options["timeout"] = timeout
    if "ttl" in query:
        if not query["ttl"].isdigit() or int(query["ttl"]) < 1:
            raise ValueError(
                f"--queue {url!r}: ttl must be a whole number of seconds, at least 1, "
                f"not {query['ttl']!r}"
            )
        options["ttl"] = int(query["ttl"])
    if "replicas" in query:
        if not query["replicas"].isdigit():
            raise ValueError(
                f"--queue {url!r}: replicas must be a whole number, not {query['replicas']!r}"
            )
        options["replicas"] = int(query["replicas"])
    if "wait" in query:
        if query["wait"] != "aof":
            raise ValueError(f"--queue {url!r}: wait must be 'aof', not {query['wait']!r}")
        options["waitAOF"] = True
    return options


def makeQueue(
    target: QueueTarget,
    journal: Spool,
    reactor: Any,
    *,
    redisPrefix: str = "",
    writeTimeout: float = 5.0,
) -> EventQueue:
    """
    The service for C{target}: the journal itself, or the remote queue with
    store-and-forward over the journal.
    """
    if isinstance(target, JournalTarget):
        return journal
    remote: EventQueue
    if isinstance(target, RedisTarget):
        if target.path is not None:
            endpoint: Any = UNIXClientEndpoint(reactor, target.path, timeout=CONNECT_TIMEOUT)
        else:
            assert target.host is not None
            endpoint = HostnameEndpoint(reactor, target.host, target.port, timeout=CONNECT_TIMEOUT)
        remote = RedisQueue(
            endpoint,
            reactor,
            address=target.address,
            dbid=target.db,
            username=target.username,
            password=target.password,
            prefix=redisPrefix,
            writeTimeout=writeTimeout if target.timeout is None else target.timeout,
            markTTL=target.ttl,
            replicas=target.replicas,
            waitAOF=target.waitAOF,
        )
    else:
        if redisPrefix:
            raise ValueError("--redis-prefix applies to a redis:// queue only")
        remote = KestrelQueue(
            target.servers, reactor, writeTimeout=writeTimeout, connectTimeout=CONNECT_TIMEOUT
        )
    return ForwardingQueue(remote, journal, reactor)
