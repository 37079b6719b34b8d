"""
C{kill -9} of the real daemon under load, with a real Redis queue that was
down for part of the run: every event answered C{1} ends up in Redis, either
directly or forwarded from the journal after the restart, in order.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import List

from tests.daemon import Daemon
from tests.servers import RedisServer, redisServer  # noqa: F401 - the fixture
from tests.test_integration import encoded

CLIENTS = 4
EVENTS_PER_CLIENT = 50_000
FORWARD_BATCH = 1000
"""
A crash can re-send at most the batch being forwarded, and an outage the
writes whose acknowledgement it cut off (one per client at most): that is
the at-least-once bound; the no-crash outage case is exactly-once
(tests/test_forwarding.py).
"""


def _flood(daemon: Daemon, offset: int, acknowledged: List[int], stop: threading.Event) -> None:
    for n in range(offset, offset + EVENTS_PER_CLIENT):
        if stop.is_set():
            return
        event = {"event": "e", "properties": {"token": "tok", "n": n}}
        try:
            _, _, body = daemon.request(f"/track?data={encoded(event)}", timeout=5)
        except OSError:
            return
        if body == b"1":
            acknowledged.append(n)


def _waitFor(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_killNineWithRedisOutage(tmp_path: Path, redisServer: RedisServer) -> None:  # noqa: F811
    daemon = Daemon(tmp_path, "--queue", redisServer.url).start()
    acknowledged: List[int] = []
    stop = threading.Event()
    clients = [
        threading.Thread(target=_flood, args=(daemon, k * 1_000_000, acknowledged, stop))
        for k in range(CLIENTS)
    ]
    for client in clients:
        client.start()
    try:
        _waitFor(lambda: len(acknowledged) >= 300, 60, "events stored in Redis")
        redisServer.stop()
        inOutage = len(acknowledged)
        _waitFor(lambda: len(acknowledged) >= inOutage + 300, 60, "events journaled")
        daemon.kill()
    finally:
        stop.set()
        for client in clients:
            client.join(10)
    redisServer.start()
    assert not set(acknowledged) <= _stored(redisServer), "nothing was left to forward"

    daemon = Daemon(tmp_path, "--queue", redisServer.url, port=daemon.port).start()
    try:
        _waitFor(
            lambda: set(acknowledged) <= _stored(redisServer),
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
