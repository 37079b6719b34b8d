"""
Orphaned journals: which directories a change of C{--workers} leaves
without an owner, and how L{OrphanJournals} adopts, forwards and releases
them.  The real thing, with Redis and C{twistd}, is in tests/test_workers.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, globalLogPublisher

from mixingest.journal import JournalLocked
from mixingest.orphans import OrphanJournals, forwarded, orphanDirectories
from mixingest.workers import workerDirectory

DRAINED = {"forwarder": {"state": "idle", "uncommitted": []}, "diverted": []}
BUSY = {"forwarder": {"state": "forwarding", "uncommitted": []}, "diverted": ["events"]}


def journalDir(path: Path, *queues: str) -> Path:
    path.mkdir(parents=True)
    (path / "lock").touch()
    for queue in queues:
        (path / queue).mkdir()
    return path


def test_workerDirectory(tmp_path: Path) -> None:
    assert workerDirectory(str(tmp_path), 3) == str(tmp_path / "worker-3")


def test_orphansOfASingleProcess(tmp_path: Path) -> None:
    """
    A single process owns C{DATA_DIR}'s own queues: every worker directory
    is an orphan, and nothing else is (a file named like one included).
    """
    journalDir(tmp_path / "data", "events", "people")
    for k in (0, 1, 10):
        journalDir(tmp_path / "data" / f"worker-{k}", "events")
    (tmp_path / "data" / "worker-7").touch()
    data = str(tmp_path / "data")
    assert orphanDirectories(data, 1) == [
        f"{data}/worker-0",
        f"{data}/worker-1",
        f"{data}/worker-10",
    ]


def test_orphansOfWorkers(tmp_path: Path) -> None:
    """
    With N workers, C{worker-K} for K >= N is an orphan, and so is
    C{DATA_DIR} itself if a single process left queues in it.
    """
    data = tmp_path / "data"
    journalDir(data)
    for k in range(4):
        journalDir(data / f"worker-{k}", "events")
    assert orphanDirectories(str(data), 2) == [str(data / "worker-2"), str(data / "worker-3")]
    assert orphanDirectories(str(data), 4) == []
    (data / "events").mkdir()
    assert orphanDirectories(str(data), 4) == [str(data)]


def test_noDataDirectory(tmp_path: Path) -> None:
    assert orphanDirectories(str(tmp_path / "missing"), 1) == []
    assert orphanDirectories(str(tmp_path / "missing"), 3) == []


@pytest.mark.parametrize(
    "status, expected",
    [
        (DRAINED, True),
        (BUSY, False),
        ({"forwarder": {"state": "scanning"}, "diverted": []}, False),
        ({"forwarder": {"state": "idle", "uncommitted": ["events"]}, "diverted": []}, False),
        ({"forwarder": {"state": "waiting"}, "diverted": []}, False),
    ],
)
def test_forwarded(status: Mapping[str, Any], expected: bool) -> None:
    assert forwarded(status) is expected


class FakeForwarder:
    """
    A store-and-forward queue over one orphan: locked or not, and forwarded
    when the test says so.
    """

    def __init__(self, path: str, locked: bool = False) -> None:
        self.path = path
        self.locked = locked
        self.running = False
        self.stopped = 0
        self.state: Mapping[str, Any] = BUSY

    def startService(self) -> None:
        if self.locked:
            raise JournalLocked(self.path)
        self.running = True

    def stopService(self) -> Deferred[None]:
        self.running = False
        self.stopped += 1
        return succeed(None)

    def status(self) -> Mapping[str, Any]:
        return self.state


@pytest.fixture
def events() -> Any:
    captured: List[LogEvent] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def makeOrphans(
    tmp_path: Path, forwarders: Optional[Dict[str, FakeForwarder]], workers: int = 1
) -> Tuple[OrphanJournals, Clock]:
    def inline(f: Any, *args: Any) -> Deferred[Any]:
        return succeed(f(*args))

    def forwarderFor(path: str) -> FakeForwarder:
        assert forwarders is not None
        return forwarders.setdefault(path, FakeForwarder(path))

    clock = Clock()
    orphans = OrphanJournals(
        str(tmp_path),
        workers,
        None if forwarders is None else forwarderFor,
        clock,
        runInThread=inline,
        pollInterval=1.0,
    )
    return orphans, clock


def test_adoptForwardRelease(tmp_path: Path, events: List[LogEvent]) -> None:
    """
    Every orphan whose lock is free is forwarded until its forwarder says
    it is done, then released; a locked one is left to its owner.
    """
    for k in range(3):
        journalDir(tmp_path / f"worker-{k}", "events")
    locked = str(tmp_path / "worker-1")
    forwarders = {locked: FakeForwarder(locked, locked=True)}
    orphans, clock = makeOrphans(tmp_path, forwarders)
    orphans.startService()
    w0, w2 = str(tmp_path / "worker-0"), str(tmp_path / "worker-2")
    assert sorted(orphans.adopted) == [w0, w2]
    assert forwarders[w0].running and forwarders[w2].running
    assert any("in use by another process" in str(e.get("log_format")) for e in events)

    forwarders[w0].state = DRAINED
    clock.advance(1.0)
    assert sorted(orphans.adopted) == [w2]
    assert forwarders[w0].stopped == 1 and forwarders[w2].running

    forwarders[w2].state = DRAINED
    clock.advance(1.0)
    assert orphans.adopted == {}
    assert clock.getDelayedCalls() == []
    orphans.stopService()
    assert forwarders[w0].stopped == forwarders[w2].stopped == 1


def test_stopReleasesWhatIsBeingForwarded(tmp_path: Path) -> None:
    """
    Stopping the daemon stops the forwarders of orphans not yet forwarded
    (their checkpoints stay, the next start adopts them again).
    """
    journalDir(tmp_path / "worker-0", "events")
    forwarders: Dict[str, FakeForwarder] = {}
    orphans, clock = makeOrphans(tmp_path, forwarders)
    orphans.startService()
    [forwarder] = forwarders.values()
    assert forwarder.running
    done = orphans.stopService()
    assert done.called and not forwarder.running and forwarder.stopped == 1
    assert clock.getDelayedCalls() == []


def test_journalOnlyLeavesOrphansInPlace(tmp_path: Path, events: List[LogEvent]) -> None:
    """
    Without a remote queue orphans are only named, as warnings, with the
    command that reads them.
    """
    journalDir(tmp_path / "worker-0", "events")
    journalDir(tmp_path / "worker-3", "events")
    orphans, _ = makeOrphans(tmp_path, None)
    orphans.startService()
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert [e["path"] for e in warnings] == [
        str(tmp_path / "worker-0"),
        str(tmp_path / "worker-3"),
    ]
    assert "python -m mixingest.journal cat" in warnings[0]["log_format"]
    assert orphans.adopted == {}
    orphans.stopService()


def test_noOrphansNoPolling(tmp_path: Path) -> None:
    orphans, clock = makeOrphans(tmp_path, {}, workers=2)
    orphans.startService()
    assert clock.getDelayedCalls() == []
    orphans.stopService()
