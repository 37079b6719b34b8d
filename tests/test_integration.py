"""
The real daemon over real sockets: what it answers C{1} for survives a
graceful restart and a C{kill -9}.
"""

from __future__ import annotations

import json
import socket
import urllib.parse
from pathlib import Path

from tests.daemon import Daemon, Flood, encoded


def track(daemon: Daemon, n: int, prefix: str) -> None:
    event = {"event": "e", "properties": {"token": "tok", "n": n, "$insert_id": f"{prefix}-{n}"}}
    status, headers, body = daemon.request(f"/track?ip=1&data={encoded(event)}")
    assert (status, body) == (200, b"1")
    assert headers["content-length"] == "1"


def test_restartKeepsEverything(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path).start()
    try:
        for n in range(20):
            track(daemon, n, "a")
        batch = [{"event": "b", "properties": {"token": "tok", "n": n}} for n in range(50)]
        _status, _, body = daemon.request(
            "/track/?verbose=1", data=urllib.parse.urlencode({"data": json.dumps(batch)}).encode()
        )
        assert json.loads(body) == {"status": 1, "error": None}
        update = {"$token": "tok", "$distinct_id": "u", "$set": {"plan": "pro"}}
        assert daemon.request("/engage?data=" + encoded(update))[2] == b"1"
    finally:
        daemon.terminate()

    daemon = Daemon(tmp_path, port=daemon.port).start()
    try:
        for n in range(20, 30):
            track(daemon, n, "a")
    finally:
        daemon.terminate()
    items = daemon.items("events")
    assert [i["properties"]["n"] for i in items] == list(range(20)) + list(range(50)) + list(
        range(20, 30)
    )
    assert all(i["properties"]["ip"] == "127.0.0.1" for i in items if i["event"] == "e")
    assert daemon.items("people")[0]["$set"] == {"plan": "pro"}


def test_killNineKeepsAcknowledged(tmp_path: Path) -> None:
    """
    Four clients send as fast as they can; the daemon is killed with SIGKILL
    mid-stream.  Every event answered C{1} must be in the journal after a
    restart, and nothing torn may be served.
    """
    daemon = Daemon(tmp_path).start()
    flood = Flood(daemon).start()
    try:
        flood.waitFor(500)
        daemon.kill()
    finally:
        flood.stop()
    daemon = Daemon(tmp_path, port=daemon.port).start()
    daemon.terminate()
    stored = {i["properties"]["n"] for i in daemon.items("events")}
    assert set(flood.acknowledged) <= stored


def test_takenPortIsChosenAgain(tmp_path: Path) -> None:
    """
    The fixture survives losing its chosen port before the daemon binds
    it, as when a client socket's ephemeral port takes it (bound, not
    listening).
    """
    daemon = Daemon(tmp_path)
    taken = daemon.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        daemon.start()
    try:
        assert daemon.port != taken
        assert daemon.request("/track?data=W10=")[0] == 200
    finally:
        daemon.terminate()
