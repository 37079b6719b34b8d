"""
The Redis password stays out of the process list on the real daemon: with
C{--workers 2} and C{--redis-password-file}, against a C{redis-server} that
requires the password, events reach Redis and no C{/proc/PID/cmdline} of
the parent or of its workers holds the password.  The control gives it in
the C{--queue} URL: then every one of them does, and the daemon warns once.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from tests.servers import RedisServer, startRedis
from tests.test_workers import childrenOf, startDaemon, stopDaemon, track, waitFor

PASSWORD = f"pw-{uuid.uuid4().hex}"
WARNING = "the Redis password is in the --queue URL"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """
    A C{redis-server} with C{requirepass PASSWORD}.
    """
    server = startRedis(tmp_path / "redis", password=PASSWORD)
    try:
        yield server
    finally:
        server.stop()


def serve(directory: Path, redis: RedisServer, *args: str) -> Tuple[Dict[int, bytes], str]:
    """
    Start the daemon with C{--workers 2} and these options, send it one
    event and wait until Redis holds it, then stop it.

    @return: the command line of the parent and of each worker, by pid, and
        the daemon's log.
    """
    directory.mkdir()
    daemon, _ = startDaemon(directory, 2, *args)
    assert daemon.process is not None
    try:
        pids = [daemon.process.pid, *childrenOf(daemon.process.pid)]
        assert len(pids) == 3, pids
        cmdlines = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pids}
        insertId = uuid.uuid4().hex
        assert track(daemon, insertId) == (200, b"1")
        # Answered 1 whether or not Redis let the daemon in (a refused
        # write is journaled): only the event in Redis shows it did.
        waitFor(lambda: any(insertId.encode() in i for i in redis.items("events")), "the event")
    finally:
        stopDaemon(daemon)
    return cmdlines, daemon.log()


def test_passwordFileKeepsItOutOfEveryCmdline(tmp_path: Path, redis: RedisServer) -> None:
    secret = tmp_path / "redis.pass"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    cmdlines, log = serve(
        tmp_path / "daemon",
        redis,
        f"--queue=redis://{redis.host}:{redis.port}/0",
        f"--redis-password-file={secret}",
    )
    leaked = [pid for pid, cmdline in cmdlines.items() if PASSWORD.encode() in cmdline]
    assert leaked == []
    assert all(b"--redis-password-file" in cmdline for cmdline in cmdlines.values())
    assert WARNING not in log and PASSWORD not in log


def test_passwordInURLIsInEveryCmdline(tmp_path: Path, redis: RedisServer) -> None:
    """
    The control: the same daemon given the password in the URL shows it in
    the command line of the parent and of both workers, which is what the
    warning (logged once, by the parent, without the password) says.
    """
    assert PASSWORD in redis.url
    cmdlines, log = serve(tmp_path / "daemon", redis, f"--queue={redis.url}")
    leaked: List[int] = [pid for pid, cmdline in cmdlines.items() if PASSWORD.encode() in cmdline]
    assert sorted(leaked) == sorted(cmdlines)
    assert log.count(WARNING) == 1
    assert PASSWORD not in log
