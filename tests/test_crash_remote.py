"""
C{kill -9} of the real daemon under load, with a real Redis queue that was
down for part of the run: every event answered C{1} ends up in Redis, either
directly or forwarded from the journal after the restart, in order.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.daemon import Daemon, Flood
from tests.servers import RedisServer, redisServer  # noqa: F401 - the fixture

CLIENTS = 4
FORWARD_BATCH = 1000
"""
A crash can re-send at most the batch being forwarded, and an outage the
writes whose acknowledgement it cut off (one per client at most): that is
the at-least-once bound; the no-crash outage case is exactly-once
(tests/test_forwarding.py).
"""


def _waitFor(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_killNineWithRedisOutage(tmp_path: Path, redisServer: RedisServer) -> None:  # noqa: F811
    daemon = Daemon(tmp_path, "--queue", redisServer.url).start()
    flood = Flood(daemon, CLIENTS).start()
    try:
        flood.waitFor(300)
        redisServer.stop()
        flood.waitFor(len(flood.acknowledged) + 300)
        daemon.kill()
    finally:
        flood.stop()
    redisServer.start()
    assert not set(flood.acknowledged) <= _stored(redisServer), "nothing was left to forward"

    daemon = Daemon(tmp_path, "--queue", redisServer.url, port=daemon.port).start()
    try:
        _waitFor(
            lambda: set(flood.acknowledged) <= _stored(redisServer),
            60,
            "every acknowledged event in Redis",
        )
    finally:
        daemon.terminate()
    stored = [json.loads(item)["properties"]["n"] for item in redisServer.items("events")]
    duplicates = len(stored) - len(set(stored))
    assert duplicates <= CLIENTS + FORWARD_BATCH, f"{duplicates} events delivered twice"
    firsts = list(dict.fromkeys(stored))
    for k in range(CLIENTS):
        mine = [n for n in firsts if k * 1_000_000 <= n < (k + 1) * 1_000_000]
        assert mine == sorted(mine), "a client's events were reordered"


def _stored(server: RedisServer) -> set:
    return {json.loads(item)["properties"]["n"] for item in server.items("events")}
