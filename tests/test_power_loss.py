"""
Power loss under load: the real daemon journals onto a file system that
forgets every byte and directory entry not yet fsynced (L{tests.powerloss_fs}),
several clients send numbered events, and the daemon is killed with SIGKILL
at the moment the file system loses its cache.  After the file system and
the daemon are back, the journal must hold every event that was answered
C{1} under C{--fsync always}, may lose only what was acknowledged after the
last fsync under C{--fsync interval:MS}, and with C{--fsync never} (the
control, proving that the test sees a loss) does lose events.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

from tests.daemon import Daemon, Flood, encoded, journaledNumbers, tally
from tests.powerloss_fs import PowerLossMount, powerLossMount  # noqa: F401 - the fixture

CLIENTS = 4
LOAD_SECONDS = 2.0
"""How long the clients send before the power goes (at least MIN_ACKS)."""
MIN_ACKS = 200


def syncDirectory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def powerCut(
    mount: PowerLossMount,
    tmp_path: Path,
    policy: str,
    during: Optional[Callable[[Daemon, Flood], Dict[str, Any]]] = None,
) -> Dict[str, Any]:
    """
    Load a daemon journaling on C{mount}, cut the power, bring the file
    system and the daemon back and append one more event.

    @param during: called once the load is under way, for another fault
        before the power cut; what it returns is in the figures as
        C{during}.
    @return: the figures: C{flood}, C{stored} (the journal's numbers after
        recovery, without the extra event), C{crash} (what the file system
        dropped and when it last synced), C{during}.
    """
    run = tmp_path / "run"
    run.mkdir()
    dataDir = mount.mountpoint / "data"
    # Installed beforehand, as an operator would: the directory is durable.
    dataDir.mkdir()
    syncDirectory(mount.mountpoint)
    daemon = Daemon(run, "--fsync", policy, dataDir=dataDir).start()
    flood = Flood(daemon, CLIENTS).start()
    started = time.monotonic()
    try:
        flood.waitFor(MIN_ACKS)
        duringFigures = during(daemon, flood) if during is not None else {}
        time.sleep(max(0.0, started + LOAD_SECONDS - time.monotonic()))
        # The daemon dies first, so that nothing is acknowledged after the
        # cache is gone; nothing is made durable in between, since only the
        # daemon writes there.
        daemon.kill()
        crash = mount.crash()
    finally:
        flood.stop()

    mount.mount()
    # The restarted daemon's log is checked on its own (a fault before the
    # cut may have logged a traceback).
    for log in (daemon.logFile, run / "output.log"):
        if log.exists():
            log.rename(log.with_name(f"before-the-cut-{log.name}"))
    daemon = Daemon(run, "--fsync", policy, dataDir=dataDir, port=daemon.port).start()
    try:
        event = {"event": "e", "properties": {"token": "tok", "n": -1}}
        status, _, body = daemon.request(f"/track?data={encoded(event)}")
        assert (status, body) == (200, b"1"), daemon.log()[-3000:]
    finally:
        daemon.terminate()
    stored = journaledNumbers(dataDir)
    assert stored[-1:] == [-1], "the restarted daemon did not append after what survived"
    return {"flood": flood, "stored": stored[:-1], "crash": crash, "during": duringFigures}


def check(figures: Dict[str, Any], contiguous: bool = True) -> Dict[str, Any]:
    """
    What holds whatever the policy: no event is stored twice, each client's
    stored events are in order and, with C{contiguous}, without a hole (the
    journal keeps a prefix of what was appended); and the figures of the
    run.  Failed fsyncs make holes: the requests they refused (whose
    numbers the clients skip), and what an interval fsync loses.
    """
    flood: Flood = figures["flood"]
    stored: List[int] = figures["stored"]
    result: Dict[str, Any] = tally(flood.acknowledged, stored)
    result["droppedBytes"] = figures["crash"]["droppedBytes"]
    result["fsyncs"] = figures["crash"]["fsyncs"]
    sys.stderr.write(f"power loss figures: {result}\n")
    assert result["duplicated"] == 0, f"{result['duplicated']} events stored twice"
    for k in range(CLIENTS):
        mine = [n for n in stored if k * 1_000_000 <= n < (k + 1) * 1_000_000]
        expected = list(range(k * 1_000_000, k * 1_000_000 + len(mine)))
        assert mine == (expected if contiguous else sorted(mine)), (
            f"client {k}'s events are out of order or have a hole"
        )
    result["lostNumbers"] = sorted(set(flood.acknowledged) - set(stored))
    return result


def test_fsyncAlwaysLosesNothing(tmp_path: Path, powerLossMount: PowerLossMount) -> None:  # noqa: F811
    """
    With C{--fsync always} an event is answered C{1} only once it is on the
    disk: a power cut loses none of them.
    """
    figures = powerCut(powerLossMount, tmp_path, "always")
    result = check(figures)
    assert result["lost"] == 0, (
        f"{result['lost']} acknowledged events lost: {result['lostNumbers'][:20]}"
    )
    assert figures["crash"]["fsyncs"] > 0


def test_fsyncIntervalLosesOnlyTheLastInterval(
    tmp_path: Path,
    powerLossMount: PowerLossMount,  # noqa: F811
) -> None:
    """
    With C{--fsync interval:200} an acknowledged event may live only in the
    cache until the next fsync: what a power cut loses was all acknowledged
    after the last fsync the file system saw began.
    """
    figures = powerCut(powerLossMount, tmp_path, "interval:200")
    result = check(figures)
    flood: Flood = figures["flood"]
    lastFsync = figures["crash"]["lastFsync"]
    assert lastFsync is not None, "the daemon never fsynced under interval:200"
    early = [n for n in result["lostNumbers"] if flood.acknowledgedAt[n] < lastFsync]
    assert not early, f"{len(early)} events acknowledged before the last fsync were lost"
    if result["lost"]:
        oldest = min(flood.acknowledgedAt[n] for n in result["lostNumbers"])
        sys.stderr.write(
            f"interval:200 lost {result['lost']} events, the oldest acknowledged "
            f"{oldest - lastFsync:.3f} s after the last fsync began\n"
        )


def test_fsyncNeverLosesEvents(tmp_path: Path, powerLossMount: PowerLossMount) -> None:  # noqa: F811
    """
    The control: with C{--fsync never}, acknowledged events are only in the
    cache, and the power cut does lose them.  A pass of the two tests above
    means something only because this one sees the loss.
    """
    figures = powerCut(powerLossMount, tmp_path, "never")
    result = check(figures)
    assert result["lost"] > 0, "no loss seen: the file system does not model a power cut"
    assert figures["crash"]["droppedBytes"] > 0


def test_firstRunDataDirectorySurvives(
    tmp_path: Path,
    powerLossMount: PowerLossMount,  # noqa: F811
) -> None:
    """
    The daemon creates its data directory itself on a first run; that
    directory's entry must be durable before any event is acknowledged, or
    a power cut takes the whole journal with it.
    """
    run = tmp_path / "run"
    run.mkdir()
    dataDir = powerLossMount.mountpoint / "data"
    daemon = Daemon(run, "--fsync", "always", dataDir=dataDir).start()
    flood = Flood(daemon, 2).start()
    try:
        flood.waitFor(50)
        daemon.kill()
        powerLossMount.crash()
    finally:
        flood.stop()
    powerLossMount.mount()
    stored = set(journaledNumbers(dataDir))
    lost = set(flood.acknowledged) - stored
    assert not lost, f"{len(lost)} of {len(flood.acknowledged)} acknowledged events lost"


FAILED_FSYNCS = 3


def failingFsyncs(mount: PowerLossMount) -> Callable[[Daemon, Flood], Dict[str, Any]]:
    """
    The fault for L{powerCut}'s C{during}: the next L{FAILED_FSYNCS} fsyncs
    fail with EIO (their bytes lost, as Linux loses them), then the
    daemon must answer C{1} again by itself.

    @return: the daemon's journal figures once it does, and when the
        first failure was asked for.
    """

    def during(daemon: Daemon, flood: Flood) -> Dict[str, Any]:
        asked = time.monotonic()
        mount.failFsyncs(FAILED_FSYNCS)
        deadline = asked + 30
        while mount.stats()["failedFsyncs"] < FAILED_FSYNCS:
            assert time.monotonic() < deadline, "the daemon stopped fsyncing"
            time.sleep(0.02)
        flood.waitFor(len(flood.acknowledged) + MIN_ACKS)
        journal = daemon.stats()["backend"]["queues"]["events"]
        return {"asked": asked, "journal": journal}

    return during


def test_fsyncFailureAlwaysLosesNothing(
    tmp_path: Path,
    powerLossMount: PowerLossMount,  # noqa: F811
) -> None:
    """
    Under C{--fsync always}, fsyncs that fail with EIO (a real writeback
    error: their bytes are never written) cost the requests waiting on
    them a 503, never an acknowledged event: a power cut afterwards loses
    none.  The daemon answers C{1} again by itself.
    """
    figures = powerCut(powerLossMount, tmp_path, "always", failingFsyncs(powerLossMount))
    result = check(figures, contiguous=False)
    journal = figures["during"]["journal"]
    assert figures["flood"].refused.get(503), "no request saw the failed fsyncs"
    assert journal["fsyncFailures"] >= 1 and journal["possiblyLost"] == 0, journal
    assert result["lost"] == 0, (
        f"{result['lost']} acknowledged events lost: {result['lostNumbers'][:20]}"
    )


def test_fsyncFailureIntervalCounted(
    tmp_path: Path,
    powerLossMount: PowerLossMount,  # noqa: F811
) -> None:
    """
    The control: under C{--fsync interval:200} a failed periodic fsync
    loses events that were already answered C{1}.  The daemon cannot take
    that back; it counts them (C{possiblyLost}), and the power cut shows
    the count is honest: the events lost that had been answered before the
    daemon's last good fsync are the ones the failure took, no more than
    it counted.
    """
    figures = powerCut(powerLossMount, tmp_path, "interval:200", failingFsyncs(powerLossMount))
    result = check(figures, contiguous=False)
    flood: Flood = figures["flood"]
    journal = figures["during"]["journal"]
    counted = journal["possiblyLost"]
    lastFsync = figures["crash"]["lastFsync"]
    early = [n for n in result["lostNumbers"] if flood.acknowledgedAt[n] < lastFsync]
    sys.stderr.write(
        f"interval:200 with failed fsyncs: counted {counted}, lost early {len(early)}\n"
    )
    assert journal["fsyncFailures"] >= 1, journal
    assert 0 < len(early) <= counted, (len(early), counted)


@pytest.fixture(autouse=True)
def _noStrayMounts(tmp_path: Path) -> Any:
    """
    Fail loudly, not later, if a test left its mount behind.
    """
    yield
    assert not os.path.ismount(tmp_path / "mnt")
