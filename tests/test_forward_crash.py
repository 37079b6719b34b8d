"""
C{kill -9} of the real daemon while it forwards its journal to a real
Redis, and Redis frozen past the write timeout while clients write (puts
whose outcome is unknown): every event answered C{1} must reach Redis
exactly once, in each client's order.

The crash is staged at the worst moment rather than hoped for: Redis is
frozen (SIGSTOP) once the drain has begun, so the forwarder's next batch is
sent and unanswered, the daemon is killed, and Redis resumes and executes
that batch with its sender gone.  The restarted daemon must not send it
again.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest

from tests.daemon import Daemon, Flood, tally
from tests.servers import RedisServer, redisServer  # noqa: F401 - the fixture

CLIENTS = 4
TIMEOUT = 1
"""The Redis write timeout given in the queue URL, in seconds."""
BACKLOG = 20_000
"""Events journaled while Redis is down: a drain of some 20 batches."""


def waitFor(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def numbers(server: RedisServer) -> List[int]:
    return [json.loads(item)["properties"]["n"] for item in server.items("events")]


def llen(server: RedisServer) -> int:
    length = server.command("LLEN", "events")
    assert isinstance(length, int)
    return length


def queueURL(server: RedisServer) -> str:
    return f"{server.url}?timeout={TIMEOUT}"


def startDaemon(tmp_path: Path, name: str, server: RedisServer, port: int = 0) -> Daemon:
    """
    A daemon forwarding to C{server}, with its logs in C{tmp_path / name}
    and its journal in C{tmp_path / "data"}, shared by every run.
    """
    run = tmp_path / name
    run.mkdir()
    return Daemon(
        run, "--queue", queueURL(server), dataDir=tmp_path / "data", port=port or None
    ).start()


def drained(daemon: Daemon, server: RedisServer, acknowledged: List[int]) -> Callable[[], bool]:
    """
    Every acknowledged event is in Redis and the forwarder has nothing left.
    """

    def check() -> bool:
        if not set(acknowledged) <= set(numbers(server)):
            return False
        forwarder: Dict[str, Any] = daemon.stats()["backend"]["forwarder"]
        return forwarder["state"] == "idle"

    return check


def finish(daemon: Daemon, server: RedisServer, acknowledged: List[int], name: str) -> None:
    """
    Wait for the drain, stop the daemon gracefully, and check that Redis
    holds every acknowledged event exactly once, in each client's order.
    """
    try:
        waitFor(drained(daemon, server, acknowledged), 60, "the drain")
        forwarder = daemon.stats()["backend"]["forwarder"]
    finally:
        daemon.terminate()
    figures = tally(acknowledged, numbers(server))
    sys.stderr.write(f"{name}: {figures} forwarder {forwarder}\n")
    assert figures["lost"] == figures["duplicated"] == figures["reordered"] == 0, figures


def test_killNineMidForward(tmp_path: Path, redisServer: RedisServer) -> None:  # noqa: F811
    """
    Redis is down while the clients write (everything goes to the journal);
    it comes back, and while the forwarder drains, with a batch sent and
    not yet answered, the daemon is killed.  Redis then executes that batch;
    after a restart the forwarder goes on without storing it twice.
    """
    redisServer.stop()
    daemon = startDaemon(tmp_path, "run1", redisServer)
    flood = Flood(daemon, CLIENTS, batch=50).start()
    try:
        flood.waitFor(BACKLOG)
    finally:
        flood.stop()
    acknowledged = flood.acknowledged
    redisServer.start()
    # A few batches in, the forwarder is in its stride: one batch every
    # few milliseconds, so at any moment one is in flight or about to be.
    waitFor(lambda: llen(redisServer) >= 5000, 30, "the drain to be under way")
    beforePause = llen(redisServer)
    redisServer.pause()
    try:
        # The forwarder sends its next batch and waits for the answer.
        time.sleep(0.5)
        daemon.kill()
    finally:
        redisServer.resume()
    # Redis has executed what it was sent, its sender now dead.
    atCrash = llen(redisServer)
    assert atCrash < len(acknowledged), (
        f"the drain had finished ({atCrash} items) before the crash could be staged"
    )
    daemon = startDaemon(tmp_path, "run2", redisServer, daemon.port)
    staged = f"Redis held {beforePause} at the freeze, {atCrash} after it"
    finish(daemon, redisServer, acknowledged, f"kill -9 mid-forward ({staged})")


@pytest.mark.parametrize("crash", [False, True], ids=["resumed", "killed"])
def test_redisFrozenPastTheTimeout(
    tmp_path: Path,
    redisServer: RedisServer,  # noqa: F811
    crash: bool,
) -> None:
    """
    Redis freezes (SIGSTOP) for longer than the write timeout while the
    clients write: the puts it holds unanswered are in doubt, and are
    journaled; later puts go to the journal too.  Redis resumes and may
    store the in-doubt puts late.  Whether the daemon ran on or was killed
    with SIGKILL while Redis was frozen and restarted, Redis ends with every
    acknowledged event exactly once and in each client's order.
    """
    daemon = startDaemon(tmp_path, "run1", redisServer)
    floods = [Flood(daemon, CLIENTS).start()]
    try:
        floods[0].waitFor(200)
        redisServer.pause()
        try:
            # Past the timeout: the puts in flight time out, are journaled
            # and acknowledged, and the clients go on into the journal.
            floods[0].waitFor(len(floods[0].acknowledged) + 4 * CLIENTS, TIMEOUT * 10)
            if crash:
                daemon.kill()
        finally:
            redisServer.resume()
        if crash:
            floods[0].stop()
            daemon = startDaemon(tmp_path, "run2", redisServer, daemon.port)
            floods.append(Flood(daemon, CLIENTS, start=500_000).start())
        floods[-1].waitFor(len(floods[-1].acknowledged) + 200)
    finally:
        for flood in floods:
            flood.stop()
    acknowledged = [n for flood in floods for n in flood.acknowledged]
    finish(daemon, redisServer, acknowledged, f"Redis frozen past the timeout ({crash=})")
