"""
Full disks, for real: the daemon's journal on a small tmpfs that the test
mounts, loaded until the disk (or the journal's bound) is full.  The daemon
must refuse new events with 503 and C{Retry-After}, say so on C{/readyz}
and C{/stats}, stay up, keep every event it acknowledged exactly once, and
take events again once there is room.  With a remote queue behind the
journal, a full disk must not make the forwarder send anything twice, even
while its checkpoint cannot be written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest

from tests.daemon import Daemon, Flood, encoded, journaledNumbers, tally
from tests.servers import RedisServer, redisServer  # noqa: F401 - the fixture

MiB = 1024 * 1024
DISK = 16 * MiB
CLIENTS = 4
BATCH = 20
PADDING = 2000
"""
Events of about 2 KiB in requests of 20: the disk fills in a few hundred
requests.
"""
SEGMENT = MiB
"""
Small segments, in proportion to the small disk, so that forwarded ones can
be deleted.
"""


@pytest.fixture
def smallDisk(tmp_path: Path) -> Iterator[Path]:
    """
    A tmpfs of L{DISK} bytes, unmounted afterwards whatever happens; skips
    if it cannot be mounted (not root, no mount privilege).
    """
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0700", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (the tests need root): {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, check=False)


def freeBytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def waitFor(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def journalStatus(stats: Dict[str, Any]) -> Dict[str, Any]:
    """
    The journal's part of C{/stats}, whether it is the backend or the spool
    of a store-and-forward queue.
    """
    backend: Dict[str, Any] = stats["backend"]
    journal: Dict[str, Any] = backend.get("journal", backend)
    return journal


def metric(exposition: bytes, name: str) -> float:
    """
    The value of the unlabelled sample C{name} in a Prometheus exposition.
    """
    for line in exposition.decode().splitlines():
        sample, _, value = line.partition(" ")
        if sample == name:
            return float(value)
    raise AssertionError(f"no {name} in /metrics")


def redisNumbers(server: RedisServer) -> List[int]:
    return [json.loads(item)["properties"]["n"] for item in server.items("events")]


def trackOne(daemon: Daemon, n: int) -> tuple[int, Dict[str, str], bytes]:
    event = {"event": "e", "properties": {"token": "tok", "n": n}}
    return daemon.request(f"/track?data={encoded(event)}")


def answersOne(daemon: Daemon, first: int, acknowledged: List[int]) -> Callable[[], bool]:
    """
    A probe for L{waitFor}: send the next event numbered from C{first} and
    say whether it was answered C{1} (then it is recorded as acknowledged).
    """
    numbers = iter(range(first, first + 1000))

    def probe() -> bool:
        n = next(numbers)
        status, _, body = trackOne(daemon, n)
        if (status, body) == (200, b"1"):
            acknowledged.append(n)
            return True
        return False

    return probe


def stopDaemon(daemon: Daemon) -> None:
    """
    SIGTERM and a graceful exit.  (Not L{Daemon.terminate}: the write
    failures a full disk causes are logged with their tracebacks.)
    """
    assert daemon.stop(signal.SIGTERM) == -signal.SIGTERM, daemon.log()[-3000:]


def report(name: str, figures: Dict[str, Any]) -> None:
    sys.stderr.write(f"{name}: {figures}\n")


def loadUntilRefused(daemon: Daemon) -> Flood:
    """
    Send padded batches until the daemon has refused a few of them with 503.
    """
    flood = Flood(daemon, CLIENTS, batch=BATCH, padding=PADDING).start()
    try:
        waitFor(lambda: flood.refused.get(503, 0) >= 3, 90, "the daemon to refuse with 503")
    except BaseException:
        flood.stop()
        raise
    return flood


def test_fullDiskRefusesKeepsEverythingAndRecovers(tmp_path: Path, smallDisk: Path) -> None:
    """
    Journal only, with no bound but the disk: once a write fails with
    ENOSPC the daemon answers 503 with C{Retry-After}, is unready, says why
    in C{/stats}, and stays up; every acknowledged event is in the journal
    once; when the disk grows, events are answered C{1} again.
    """
    run = tmp_path / "run"
    run.mkdir()
    dataDir = smallDisk / "data"
    daemon = Daemon(
        run,
        "--max-journal-bytes",
        str(1 << 40),
        "--segment-size",
        str(SEGMENT),
        dataDir=dataDir,
    ).start()
    acknowledged: List[int] = []
    try:
        flood = loadUntilRefused(daemon)
        try:
            free = freeBytes(smallDisk)
            status, headers, _ = trackOne(daemon, 9_000_000)
            ready, _, _ = daemon.admin("/readyz")
            stats = daemon.stats()
        finally:
            flood.stop()
        acknowledged += flood.acknowledged
        assert free < BATCH * (PADDING + 500), f"{free} bytes still free: the disk is not full"
        assert status == 503 and "retry-after" in headers, (status, headers)
        assert ready == 503
        assert "No space left on device" in json.dumps(journalStatus(stats)), stats
        assert daemon.admin("/healthz")[0] == 200
        assert daemon.process is not None and daemon.process.poll() is None

        subprocess.run(
            ["mount", "-o", f"remount,size={2 * DISK}", str(smallDisk)], check=True, timeout=30
        )
        waitFor(
            answersOne(daemon, 9_000_001, acknowledged),
            30,
            "the daemon to take events again once the disk has room",
        )
        assert daemon.admin("/readyz")[0] == 200
    finally:
        stopDaemon(daemon)
    figures = tally(acknowledged, journaledNumbers(dataDir))
    report("full disk, journal only", figures)
    assert figures["lost"] == figures["duplicated"] == figures["reordered"] == 0, figures


def test_maxJournalBytesRefusesBeforeTheDiskIsFull(tmp_path: Path, smallDisk: Path) -> None:
    """
    With C{--max-journal-bytes} under the disk's size the journal refuses
    at its bound, the disk never fills, and C{/stats} and C{/metrics} say
    why.
    """
    bound = DISK // 2
    run = tmp_path / "run"
    run.mkdir()
    dataDir = smallDisk / "data"
    daemon = Daemon(
        run,
        "--max-journal-bytes",
        str(bound),
        "--segment-size",
        str(SEGMENT),
        dataDir=dataDir,
    ).start()
    try:
        flood = loadUntilRefused(daemon)
        try:
            status, headers, _ = trackOne(daemon, 9_000_000)
            ready, _, _ = daemon.admin("/readyz")
            stats = daemon.stats()
            _, _, metrics = daemon.admin("/metrics")
        finally:
            flood.stop()
        free = freeBytes(smallDisk)
        assert status == 503 and "retry-after" in headers, (status, headers)
        assert ready == 503
        journal = journalStatus(stats)
        assert journal["full"] is True and journal["maxBytes"] == bound, journal
        assert metric(metrics, "mixingest_journal_full") == 1
        assert metric(metrics, "mixingest_journal_max_bytes") == bound
        assert free > DISK // 4, f"only {free} bytes free: the bound did not hold"
        assert "No space left on device" not in daemon.log()
        assert daemon.process is not None and daemon.process.poll() is None
    finally:
        stopDaemon(daemon)
    figures = tally(flood.acknowledged, journaledNumbers(dataDir))
    report("journal bound", {**figures, "free": free})
    assert figures["lost"] == figures["duplicated"] == figures["reordered"] == 0, figures


def test_spoolFillsWhileRedisIsDownThenDrainsOnce(
    tmp_path: Path,
    smallDisk: Path,
    redisServer: RedisServer,  # noqa: F811
) -> None:
    """
    Store-and-forward with Redis down: the spool fills up to the default
    bound (a share of the disk) and the daemon refuses; Redis comes back,
    the forwarder drains, Redis holds every acknowledged event exactly once
    and in each client's order, and the daemon answers C{1} again.
    """
    redisServer.stop()
    run = tmp_path / "run"
    run.mkdir()
    daemon = Daemon(
        run,
        "--queue",
        redisServer.url,
        "--segment-size",
        str(SEGMENT),
        dataDir=smallDisk / "data",
    ).start()
    acknowledged: List[int] = []
    try:
        flood = loadUntilRefused(daemon)
        flood.stop()
        acknowledged += flood.acknowledged
        assert daemon.admin("/readyz")[0] == 503
        redisServer.start()
        waitFor(
            lambda: set(acknowledged) <= set(redisNumbers(redisServer)),
            90,
            "every acknowledged event in Redis",
        )
        waitFor(answersOne(daemon, 9_000_000, acknowledged), 30, "the daemon to take events again")
        waitFor(lambda: set(acknowledged) <= set(redisNumbers(redisServer)), 30, "the last event")
        stats = daemon.stats()
    finally:
        stopDaemon(daemon)
    figures = tally(acknowledged, redisNumbers(redisServer))
    report("spool full, Redis back", {**figures, "forwarder": stats["backend"]["forwarder"]})
    assert figures["lost"] == figures["duplicated"] == figures["reordered"] == 0, figures


class Filler:
    """
    Another process eating the disk: a thread that keeps a file growing
    into every byte that becomes free (the forwarder deletes segments to
    make room for its checkpoint), until stopped; then the file is removed.
    """

    def __init__(self, disk: Path) -> None:
        self.path = disk / "filler"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def start(self) -> Filler:
        self._fill()
        self._thread.start()
        return self

    def _fill(self) -> None:
        with open(self.path, "ab", buffering=0) as f:
            for chunk in (bytes(MiB), bytes(4096), bytes(1)):
                while True:
                    try:
                        f.write(chunk)
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._fill()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.path.unlink(missing_ok=True)


def test_checkpointWriteFailsWhileDraining(
    tmp_path: Path,
    smallDisk: Path,
    redisServer: RedisServer,  # noqa: F811
) -> None:
    """
    The disk is kept full to the last byte while the forwarder drains a
    backlog, so that writing its checkpoint fails, again and again (the
    segments it deletes to make room are eaten at once): Redis must not
    receive any batch twice meanwhile.  Once the filler is gone
    the checkpoint lands, the forwarded segments are deleted and Redis
    holds every acknowledged event exactly once.
    """
    redisServer.stop()
    run = tmp_path / "run"
    run.mkdir()
    dataDir = smallDisk / "data"
    daemon = Daemon(
        run,
        "--queue",
        redisServer.url,
        "--segment-size",
        str(SEGMENT // 4),
        dataDir=dataDir,
    ).start()
    samples: List[Dict[str, int]] = []
    try:
        flood = Flood(daemon, CLIENTS, batch=BATCH, padding=PADDING).start()
        try:
            flood.waitFor(1500)
        finally:
            flood.stop()
        acknowledged = flood.acknowledged
        filler = Filler(smallDisk).start()
        try:
            redisServer.start()

            def checkpointFailures() -> int:
                failures: int = daemon.stats()["backend"]["forwarder"]["checkpointFailures"]
                return failures

            # Failing persistently: several attempts, after each of which
            # Redis holds no batch twice.
            for attempts in (1, 2, 3):
                waitFor(
                    lambda n=attempts: checkpointFailures() >= n,  # type: ignore[misc]
                    60,
                    f"{attempts} checkpoint failures",
                )
                samples.append(tally(acknowledged, redisNumbers(redisServer)))
                assert samples[-1]["duplicated"] == 0, f"a batch was resent: {samples[-1]}"
        finally:
            filler.stop()
        waitFor(
            lambda: set(acknowledged) <= set(redisNumbers(redisServer)),
            60,
            "every acknowledged event in Redis",
        )

        def drained() -> bool:
            stats = daemon.stats()
            return (
                stats["backend"]["forwarder"]["state"] == "idle"
                and journalStatus(stats)["bytes"] <= SEGMENT
            )

        waitFor(drained, 60, "the checkpoint to land and the forwarded segments to go")
        stats = daemon.stats()
    finally:
        stopDaemon(daemon)
    figures = tally(acknowledged, redisNumbers(redisServer))
    report(
        "checkpoint write failing",
        {
            **figures,
            "checkpointFailures": stats["backend"]["forwarder"]["checkpointFailures"],
            "journalBytes": journalStatus(stats)["bytes"],
            "whileFailing": samples,
        },
    )
    assert figures["lost"] == figures["duplicated"] == figures["reordered"] == 0, figures
    assert list(dataDir.glob("events/checkpoint.*")), "no checkpoint was written"
