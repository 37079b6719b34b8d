"""
A graceful stop under load, on the real daemon: SIGTERM while clients send
as fast as they can; the daemon exits in time and every event it answered
C{1} for is in the journal, with or without a shutdown grace.
"""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
import urllib.parse
from pathlib import Path
from typing import List

import pytest

from tests.daemon import Daemon, freePort

DRAIN_TIMEOUT = 5.0


@pytest.mark.parametrize("grace", [0.0, 2.0])
def test_sigtermUnderLoadKeepsEveryAcknowledgedEvent(tmp_path: Path, grace: float) -> None:
    daemon = Daemon(
        tmp_path,
        f"--admin-listen=tcp:{freePort()}:interface=127.0.0.1",
        f"--drain-timeout={DRAIN_TIMEOUT}",
        f"--shutdown-grace={grace}",
    ).start()
    acknowledged: List[int] = []
    refused: List[int] = []
    started = threading.Event()

    def client(offset: int) -> None:
        for n in range(offset, offset + 100_000):
            event = {"event": "e", "properties": {"token": "tok", "n": n, "$insert_id": str(n)}}
            data = urllib.parse.quote(base64.b64encode(json.dumps(event).encode()))
            try:
                status, _, body = daemon.request(f"/track?data={data}", timeout=5)
            except OSError:
                return
            if body == b"1":
                acknowledged.append(n)
                started.set()
            else:
                refused.append(status)

    threads = [threading.Thread(target=client, args=(k * 1_000_000,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        assert started.wait(10)
        time.sleep(1.0)
        signalled = time.monotonic()
        daemon.terminate(timeout=grace + DRAIN_TIMEOUT + 10)
        assert time.monotonic() - signalled < grace + DRAIN_TIMEOUT + 5
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.stop(signal.SIGKILL)
        for t in threads:
            t.join(30)
    assert set(refused) <= {503}
    stored = [item["properties"]["n"] for item in daemon.items("events")]
    assert len(acknowledged) > 50
    assert set(acknowledged) <= set(stored)
    assert len(stored) == len(set(stored))
