"""
Power loss on the Redis host.  The real daemon writes to a real Redis (7.2
or later, for C{WAITAOF}) whose append-only file lives on the power-loss
file system (L{tests.powerloss_fs}), with Redis's default
C{appendfsync everysec}.  Clients send numbered events; then the Redis
machine loses power: its file system drops every byte not yet fsynced and
Redis is killed at the same moment.  Redis comes back on what survived, the
daemon (which stayed up, journaling what Redis could not take) forwards the
rest.  With C{?wait=aof} every event answered C{1} is in Redis once, in
order; without it (the control, proving that the test sees the fault) Redis
loses events it had acknowledged, and so does the pipeline.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from tests.daemon import Daemon, Flood, tally
from tests.powerloss_fs import PowerLossMount, powerLossMount  # noqa: F401 - the fixture
from tests.servers import RedisServer, waitAOFRedisBinary

CLIENTS = 4
BATCH = 20
"""Events per request: under C{everysec} a write waits up to a second for Redis's fsync."""
LOAD_SECONDS = 3.0
MIN_ACKS = 200
SETTLE_TIMEOUT = 60.0


def syncTree(path: Path) -> None:
    """
    fsync every file and directory under C{path}: Redis's files as they
    would be on a server that has been running for a while.  (On a new data
    directory Redis does not fsync the directory entries of its new AOF
    files: a power cut in its first seconds loses the whole AOF.)
    """
    for root, _, files in os.walk(path):
        for name in [*files, "."]:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def settled(daemon: Daemon) -> bool:
    """
    Whether the daemon has nothing left to forward and no write in doubt.
    """
    stats = daemon.stats()
    backend = stats["backend"]
    return (
        stats["backlog"]["events"] == 0
        and not backend["remote"]["inDoubt"]
        and backend["forwarder"]["state"] == "idle"
    )


def stored(redis: RedisServer) -> List[int]:
    """
    The event numbers in Redis's C{events} list, head first.
    """
    return [json.loads(item)["properties"]["n"] for item in redis.items("events")]


def powerCut(tmp_path: Path, mount: PowerLossMount, query: str) -> Dict[str, Any]:
    """
    Load the daemon, cut the Redis host's power, bring Redis back and let
    the daemon settle.

    @return: the figures of L{tally} and the file system's at the crash.
    """
    binary = waitAOFRedisBinary()
    redisDir = mount.mountpoint / "redis"
    redisDir.mkdir()
    redis = RedisServer(
        binary, redisDir, appendfsync="everysec", unixSocket=tmp_path / "redis.sock"
    )
    redis.start()
    syncTree(mount.mountpoint)
    run = tmp_path / "run"
    run.mkdir()
    daemon = Daemon(run, "--queue", f"redis://{redis.host}:{redis.port}/0{query}").start()
    try:
        flood = Flood(daemon, CLIENTS, batch=BATCH).start()
        started = time.monotonic()
        try:
            flood.waitFor(MIN_ACKS)
            time.sleep(max(0.0, started + LOAD_SECONDS - time.monotonic()))
            # The power goes: the cache is lost and Redis dies at once, so
            # nothing Redis acknowledges afterwards can be durable.
            crash = mount.crash()
            redis.kill()
        finally:
            flood.stop()
        mount.mount()
        redis.start()
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while not settled(daemon):
            assert time.monotonic() < deadline, f"the daemon did not settle: {daemon.stats()}"
            time.sleep(0.1)
        daemon.terminate()
        numbers = stored(redis)
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()
        redis.stop()
    result: Dict[str, Any] = tally(flood.acknowledged, numbers)
    result["droppedBytes"] = crash["droppedBytes"]
    result["fsyncs"] = crash["fsyncs"]
    sys.stderr.write(f"Redis power loss figures ({query or 'no wait'}): {result}\n")
    return result


def test_waitAOFLosesNothing(tmp_path: Path, powerLossMount: PowerLossMount) -> None:  # noqa: F811
    """
    With C{?wait=aof} an event is answered C{1} only once Redis has fsynced
    it (or the daemon has journaled it): the power cut loses none, stores
    none twice, and keeps each client's order.
    """
    result = powerCut(tmp_path, powerLossMount, "?wait=aof")
    assert result["lost"] == 0, f"{result['lost']} acknowledged events lost"
    assert result["duplicated"] == 0, f"{result['duplicated']} events stored twice"
    assert result["reordered"] == 0, f"{result['reordered']} events reordered"


def test_withoutWaitAOFLosesEvents(
    tmp_path: Path,
    powerLossMount: PowerLossMount,  # noqa: F811
) -> None:
    """
    The control: without C{?wait=aof}, Redis under C{everysec} acknowledges
    writes it has not fsynced, and the power cut loses them.  A pass of the
    test above means something only because this one sees the loss.
    """
    result = powerCut(tmp_path, powerLossMount, "")
    assert result["droppedBytes"] > 0
    assert result["lost"] > 0, "no loss seen: the file system does not model a power cut"


@pytest.fixture(autouse=True)
def _noStrayMounts(tmp_path: Path) -> Any:
    yield
    assert not os.path.ismount(tmp_path / "mnt")
