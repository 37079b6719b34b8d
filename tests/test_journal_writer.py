"""
Appending through the Journal service: durability, group commit, fsync
policies, recovery of torn tails, rotation and failure handling.
"""

from __future__ import annotations

import errno
import os
import threading

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, gatherResults
from twisted.logger import globalLogPublisher

from mixingest.journal import FsyncPolicy, Journal, JournalLocked
from mixingest.journal.framing import HEADER_SIZE, listSegments, segmentPath
from mixingest.journal.reader import JournalReader
from mixingest.journal.writer import RETRY_DELAY, SegmentWriter
from mixingest.queues.base import EventQueue, QueueUnavailable


def item(n: int) -> bytes:
    return b'{"event":"e","n":%05d}' % n


def readAll(dataDir, queue="q"):
    with JournalReader(os.path.join(str(dataDir), queue)) as reader:
        return [payload for _, payload in reader]


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def waitUntil(predicate, timeout=10.0):
    """
    Poll in real time: for thread work whose end no Deferred reports.
    """

    @pytest_twisted.inlineCallbacks
    def poll():
        for _ in range(int(timeout / 0.01)):
            if predicate():
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("timed out")

    return poll()


@pytest.fixture
def started():
    """
    Start journals, and stop them after the test even if it fails: a
    running journal's writer thread would keep the interpreter alive.
    """
    journals = []

    def start(path, **kw) -> Journal:
        journal = Journal(str(path), **kw)
        journal.startService()
        journals.append(journal)
        return journal

    yield start
    for journal in journals:
        if journal.running:
            pytest_twisted.blockon(journal.stopService())


@pytest_twisted.inlineCallbacks
def test_appendAndReadBack(started, tmp_path):
    journal = started(tmp_path)
    assert isinstance(journal, EventQueue)
    assert journal.ready()
    yield journal.put("q", [item(0), item(1)])
    yield journal.put("other", [item(9)])
    yield journal.put("q", [item(2)])
    status = journal.status()
    yield journal.stopService()
    assert not journal.ready()
    assert readAll(tmp_path) == [item(0), item(1), item(2)]
    assert readAll(tmp_path, "other") == [item(9)]
    assert journal.queues() == ["other", "q"]
    assert status["ready"] and status["fsync"] == "always"
    assert status["queues"]["q"] == {
        "healthy": True,
        "segments": 1,
        "bytes": HEADER_SIZE + 3 * 8 + 3 * len(item(0)),
        "appended": 3,
        "pending": 0,
        "lastError": None,
    }
    assert os.listdir(tmp_path / "q") == ["00000000000000000000.seg"]


@pytest_twisted.inlineCallbacks
def test_reopenKeepsEverything(started, tmp_path):
    """
    A reopened journal keeps every record and appends to the same segment.
    """
    for round in range(3):
        journal = started(tmp_path)
        yield gatherResults([journal.put("q", [item(round * 10 + i)]) for i in range(10)])
        yield journal.stopService()
    assert readAll(tmp_path) == [item(n) for n in range(30)]
    assert listSegments(str(tmp_path / "q")) == [0]


@pytest_twisted.inlineCallbacks
def test_rotation(started, tmp_path):
    """
    A new segment, named by its first record's sequence number, starts
    before a group would take the current one past the size limit.
    """
    record = 8 + len(item(0))
    journal = started(tmp_path, segmentSize=HEADER_SIZE + 3 * record)
    for n in range(10):
        yield journal.put("q", [item(n)])
    yield journal.put("q", [item(n) for n in range(10, 15)])  # one group: larger than a segment
    yield journal.put("q", [item(15)])
    yield journal.stopService()
    assert listSegments(str(tmp_path / "q")) == [0, 3, 6, 9, 10, 15]
    sizes = [os.path.getsize(segmentPath(str(tmp_path / "q"), b)) for b in [0, 3, 6, 9, 10, 15]]
    assert sizes == [HEADER_SIZE + 3 * record] * 3 + [
        HEADER_SIZE + record,
        HEADER_SIZE + 5 * record,
        HEADER_SIZE + record,
    ]
    assert readAll(tmp_path) == [item(n) for n in range(16)]
    journal = started(tmp_path, segmentSize=HEADER_SIZE + 3 * record)
    yield journal.put("q", [item(16)])
    yield journal.stopService()
    assert listSegments(str(tmp_path / "q"))[-1] == 15
    assert readAll(tmp_path)[-1] == item(16)


def damageLastRecord(segment: str, how: str) -> None:
    with open(segment, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if how == "truncate":
            f.truncate(size - 5)
        elif how == "flip":
            f.seek(size - 3)
            byte = f.read(1)
            f.seek(size - 3)
            f.write(bytes([byte[0] ^ 0x20]))
        else:
            f.seek(size)
            f.write(bytes(4096))


@pytest.mark.parametrize("how", ["truncate", "flip", "zeros"])
@pytest_twisted.inlineCallbacks
def test_tornTail(started, tmp_path, logged, how):
    """
    A damaged last record (cut short, a flipped bit, zero-filled space after
    it) is never served: reopening logs it, cuts it off, and appends go on
    after the last good record.
    """
    journal = started(tmp_path)
    yield gatherResults([journal.put("q", [item(n)]) for n in range(5)])
    yield journal.stopService()
    segment = segmentPath(str(tmp_path / "q"), 0)
    damageLastRecord(segment, how)
    expected = [item(n) for n in range(4 if how != "zeros" else 5)]
    assert readAll(tmp_path) == expected
    journal = started(tmp_path)
    yield journal.put("q", [item(99)])
    yield journal.stopService()
    assert readAll(tmp_path) == [*expected, item(99)]
    warnings = [e for e in logged if "dropping" in e.get("log_format", "")]
    assert len(warnings) == 1
    assert warnings[0]["offset"] == HEADER_SIZE + len(expected) * (8 + len(item(0)))


@pytest_twisted.inlineCallbacks
def test_tornHeaderRewritten(started, tmp_path):
    """
    A newest segment whose header did not make it to disk is started over.
    """
    queueDir = tmp_path / "q"
    queueDir.mkdir()
    (queueDir / "00000000000000000000.seg").write_bytes(bytes(5))
    journal = started(tmp_path)
    yield journal.put("q", [item(1)])
    yield journal.stopService()
    assert readAll(tmp_path) == [item(1)]


@pytest_twisted.inlineCallbacks
def test_groupCommit(started, tmp_path, monkeypatch):
    """
    While one write+fsync is in flight, every append that arrives waits and
    then goes out in one more group: one thread hop and one fsync for all.
    """
    syncs, entered, release = [], threading.Event(), threading.Event()

    def sync(fd):
        syncs.append(fd)
        if len(syncs) == 2:
            entered.set()
            release.wait(10)

    groups = []
    original = SegmentWriter.commit

    def commit(self, items, sync):
        groups.append(len(items))
        original(self, items, sync)

    monkeypatch.setattr(SegmentWriter, "commit", commit)
    journal = started(tmp_path, sync=sync)
    try:
        yield journal.put("q", [item(0)])
        first = journal.put("q", [item(1)])
        assert entered.wait(10)
        waiting = [journal.put("q", [item(n), item(n + 100)]) for n in range(2, 52)]
        assert not first.called and not any(d.called for d in waiting)
        assert journal.status()["queues"]["q"]["pending"] == 100
        release.set()
        yield gatherResults([first, *waiting])
    finally:
        release.set()
        yield journal.stopService()
    assert len(syncs) == 3
    assert groups[:3] == [1, 1, 100]
    assert readAll(tmp_path)[2:4] == [item(2), item(102)]


@pytest_twisted.inlineCallbacks
def test_intervalPolicy(started, tmp_path):
    """
    With interval:MS, appends fire once written and an fsync follows MS
    later; an idle journal schedules nothing.
    """
    clock, syncs = task.Clock(), []
    journal = started(
        tmp_path, policy=FsyncPolicy.parse("interval:250"), clock=clock, sync=syncs.append
    )
    yield journal.put("q", [item(0)])
    yield journal.put("q", [item(1)])
    assert syncs == []
    [call] = clock.getDelayedCalls()
    assert call.getTime() == 0.25
    clock.advance(0.25)
    # This append queues behind the fsync that the timer started.
    yield journal.put("q", [item(2)])
    assert len(syncs) == 1
    clock.advance(0.25)
    yield journal.put("q", [item(3)])
    assert len(syncs) == 2
    yield journal.stopService()
    assert len(syncs) == 3
    assert clock.getDelayedCalls() == []
    assert readAll(tmp_path) == [item(n) for n in range(4)]


@pytest_twisted.inlineCallbacks
def test_neverPolicy(started, tmp_path):
    """
    With never, appends fire once written and nothing is fsynced except on
    an explicit flush (which includes closing).
    """
    clock, syncs = task.Clock(), []
    journal = started(tmp_path, policy=FsyncPolicy.never(), clock=clock, sync=syncs.append)
    yield gatherResults([journal.put("q", [item(n)]) for n in range(5)])
    assert syncs == [] and clock.getDelayedCalls() == []
    yield journal.flush()
    assert len(syncs) == 1
    yield journal.flush()  # nothing new to sync
    assert len(syncs) == 1
    pending = journal.put("q", [item(5)])
    yield journal.stopService()
    assert pending.called
    assert len(syncs) == 2
    assert readAll(tmp_path) == [item(n) for n in range(6)]


@pytest_twisted.inlineCallbacks
def test_failedSync(started, tmp_path, logged):
    """
    A failed fsync fails its group and everything queued behind it, makes
    the journal unready and refuses appends; a retry on the clock starts a
    fresh segment, and once that works appends are taken again.
    """
    clock, syncs, failing = task.Clock(), [], [False]

    def sync(fd):
        syncs.append(fd)
        if failing[0]:
            raise OSError(errno.EIO, "simulated EIO")

    journal = started(tmp_path, clock=clock, sync=sync)
    yield journal.put("q", [item(0)])
    failing[0] = True
    inFlight = journal.put("q", [item(1)])
    queued = journal.put("q", [item(2)])
    for d in [inFlight, queued]:
        with pytest.raises(QueueUnavailable, match="simulated EIO"):
            yield d
    assert not journal.ready()
    assert "simulated EIO" in journal.status()["queues"]["q"]["lastError"]
    with pytest.raises(QueueUnavailable):
        yield journal.put("q", [item(3)])
    with pytest.raises(QueueUnavailable):
        yield journal.flush()

    # A retry that fails too leaves no empty segment behind.
    tries = len(syncs)
    clock.advance(RETRY_DELAY)
    yield waitUntil(lambda: len(syncs) > tries and clock.getDelayedCalls())
    assert not journal.ready()
    assert listSegments(str(tmp_path / "q")) == [0]

    failing[0] = False
    clock.advance(RETRY_DELAY)
    yield waitUntil(journal.ready)
    yield journal.put("q", [item(4)])
    yield journal.stopService()
    assert clock.getDelayedCalls() == []
    segments = listSegments(str(tmp_path / "q"))
    assert len(segments) == 2 and segments[1] > 2
    # item(1) reached the file before its fsync failed: at-least-once.
    assert readAll(tmp_path) == [item(0), item(1), item(4)]
    failures = [e for e in logged if "write failed" in e.get("log_format", "")]
    assert len(failures) == 1


@pytest_twisted.inlineCallbacks
def test_cancelledAppendIsStillWritten(started, tmp_path):
    """
    Cancelling an append (Klein does when a client leaves) only detaches
    the caller.
    """
    journal = started(tmp_path)
    d = journal.put("q", [item(0)])
    d.cancel()
    with pytest.raises(CancelledError):
        yield d
    yield journal.put("q", [item(1)])
    yield journal.stopService()
    assert readAll(tmp_path) == [item(0), item(1)]


@pytest_twisted.inlineCallbacks
def test_badInput(tmp_path):
    journal = Journal(str(tmp_path))
    with pytest.raises(QueueUnavailable, match="not running"):
        yield journal.put("q", [item(0)])
    journal.startService()
    try:
        for queue, items in [
            ("a/b", [item(0)]),
            ("q", ["text"]),
            ("q", [b""]),
            ("q", [item(0), 5]),
        ]:
            with pytest.raises(ValueError):
                yield journal.put(queue, items)
        yield journal.put("q", [])
    finally:
        yield journal.stopService()
    with pytest.raises(QueueUnavailable):
        yield journal.put("q", [item(0)])
    assert readAll(tmp_path) == []


@pytest_twisted.inlineCallbacks
def test_locked(started, tmp_path):
    """
    Two journals never write one directory.
    """
    journal = started(tmp_path)
    with pytest.raises(JournalLocked):
        Journal(str(tmp_path)).startService()
    yield journal.stopService()
    other = started(tmp_path)
    yield other.stopService()


@pytest_twisted.inlineCallbacks
def test_deleteConsumed(started, tmp_path):
    """
    Retention is explicit: segments wholly before every checkpoint go.
    """
    record = 8 + len(item(0))
    journal = started(tmp_path, segmentSize=HEADER_SIZE + 2 * record)
    for n in range(7):
        yield journal.put("q", [item(n)])
    assert (yield journal.deleteConsumed("q")) == []  # no checkpoint: keep all
    reader = journal.reader("q", "fwd")
    batch = reader.read(maxItems=5)
    reader.commit(batch[-1][0])
    assert (yield journal.deleteConsumed("q")) == [0, 2]
    assert journal.status()["queues"]["q"]["segments"] == 2
    assert reader.backlog() == (2, 2 * record)
    yield journal.stopService()
    assert [p for _, p in journal.reader("q", "fwd")] == [item(5), item(6)]
