"""
Appending through the Journal service: durability, group commit, fsync
policies, recovery of torn tails and of damage, format 1 segments, rotation,
failure handling and file modes.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
import zlib

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, gatherResults
from twisted.logger import globalLogPublisher

from mixingest.errors import QueueUnavailable
from mixingest.journal import FsyncPolicy, Journal, JournalLocked
from mixingest.journal.framing import (
    HEADER_SIZE,
    HEADER_V1,
    RECORD_HEADER_SIZE,
    JournalFormatError,
    Marker,
    listSegments,
    segmentPath,
)
from mixingest.journal.reader import JournalReader, Position
from mixingest.journal.writer import RETRY_DELAY, SegmentWriter
from mixingest.queues.base import EventQueue
from tests.damage import flip


def item(n: int) -> bytes:
    return b'{"event":"e","n":%05d}' % n


RECORD = RECORD_HEADER_SIZE + len(item(0))


def readAll(dataDir, queue="q"):
    with JournalReader(os.path.join(str(dataDir), queue)) as reader:
        return [payload for _, payload in reader]


def readSeqs(dataDir, queue="q"):
    with JournalReader(os.path.join(str(dataDir), queue)) as reader:
        return [position.seq - 1 for position, _ in reader]


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
        "bytes": HEADER_SIZE + 3 * RECORD,
        "appended": 3,
        "pending": 0,
        "lastError": None,
        "unsynced": 0,
        "possiblyLost": 0,
        "fsyncs": 2,
        "fsyncFailures": 0,
        "lastFsyncSeconds": status["queues"]["q"]["lastFsyncSeconds"],
        "fsyncBuckets": status["queues"]["q"]["fsyncBuckets"],
        "fsyncSecondsTotal": status["queues"]["q"]["fsyncSecondsTotal"],
    }
    assert isinstance(status["queues"]["q"]["lastFsyncSeconds"], float)
    # Each fsync is observed once, in the histogram /metrics exposes.
    assert sum(status["queues"]["q"]["fsyncBuckets"]) == 2
    assert status["queues"]["q"]["fsyncSecondsTotal"] >= status["queues"]["q"]["lastFsyncSeconds"]
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
    record = RECORD
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
    assert warnings[0]["offset"] == HEADER_SIZE + len(expected) * RECORD
    assert not [e for e in logged if "are kept" in e.get("log_format", "")]


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

    def commit(self, items, sync, markers=True):
        groups.append(len(items))
        original(self, items, sync, markers)

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
    status = journal.status()["queues"]["q"]
    assert "simulated EIO" in status["lastError"]
    # Under always nothing was acknowledged before its fsync: nothing lost.
    assert (status["possiblyLost"], status["fsyncFailures"]) == (0, 1)
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
    record = RECORD
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


# Offsets in a record: sync marker, kind and length, sequence number,
# payload CRC, header CRC, payload.
IN_RECORD = [0, 5, 10, 17, 21, RECORD_HEADER_SIZE + 4, RECORD - 1]


@pytest.mark.parametrize("where", IN_RECORD)
@pytest_twisted.inlineCallbacks
def test_middleDamageKept(started, tmp_path, logged, where):
    """
    A byte flipped in the middle of the newest segment costs that record
    only: reopening keeps every record before and after it (it does not cut
    the segment there), logs the damage, and appends go on after the last
    record with the next number.
    """
    journal = started(tmp_path)
    yield journal.put("q", [item(n) for n in range(30)])
    yield journal.stopService()
    segment = segmentPath(str(tmp_path / "q"), 0)
    size = os.path.getsize(segment)
    flip(segment, HEADER_SIZE + 15 * RECORD + where)
    journal = started(tmp_path)
    yield journal.put("q", [item(99)])
    yield journal.stopService()
    assert readAll(tmp_path) == [item(n) for n in range(30) if n != 15] + [item(99)]
    assert readSeqs(tmp_path) == [n for n in range(30) if n != 15] + [30]
    assert os.path.getsize(segment) == size + RECORD
    [error] = [e for e in logged if "are kept" in e.get("log_format", "")]
    assert error["log_level"].name == "error"
    assert (error["path"], error["offset"], error["length"]) == (
        segment,
        HEADER_SIZE + 15 * RECORD,
        RECORD,
    )
    assert not [e for e in logged if "dropping" in e.get("log_format", "")]


@pytest_twisted.inlineCallbacks
def test_middleDamageAndTornTail(started, tmp_path, logged):
    """
    Damage with intact records after it is kept; a torn record with nothing
    intact after it is cut, and so is zero-filled space after that.
    """
    journal = started(tmp_path)
    yield journal.put("q", [item(n) for n in range(6)])
    yield journal.stopService()
    segment = segmentPath(str(tmp_path / "q"), 0)
    flip(segment, HEADER_SIZE + 2 * RECORD + 30)
    with open(segment, "r+b") as f:
        f.truncate(HEADER_SIZE + 6 * RECORD - 7)
        f.seek(0, os.SEEK_END)
        f.write(bytes(1000))
    journal = started(tmp_path)
    yield journal.put("q", [item(99)])
    yield journal.stopService()
    assert readAll(tmp_path) == [item(n) for n in [0, 1, 3, 4]] + [item(99)]
    # The cut bytes could have held that many records (numbered from 5),
    # which a reader may have returned before the crash: their numbers are
    # not given again.
    cut = RECORD - 7 + 1000
    assert readSeqs(tmp_path) == [0, 1, 3, 4, 5 + -(-cut // (RECORD_HEADER_SIZE + 1))]
    [dropped] = [e for e in logged if "dropping" in e.get("log_format", "")]
    assert dropped["offset"] == HEADER_SIZE + 5 * RECORD
    assert dropped["dropped"] == RECORD - 7 + 1000
    assert len([e for e in logged if "are kept" in e.get("log_format", "")]) == 1


def test_newNumbersPassCheckpoints(tmp_path):
    """
    After a power loss took records that a reader had already checkpointed
    past, new records are numbered past the checkpoint: never the number of
    a record that was passed on.
    """
    queueDir = str(tmp_path / "q")
    writer = SegmentWriter(queueDir, FsyncPolicy.never(), 1 << 20)
    writer.commit([item(n) for n in range(6)], sync=False)
    writer.close()
    reader = JournalReader(queueDir, "fwd")
    reader.commit(reader.read()[-1][0])
    with open(segmentPath(queueDir, 0), "r+b") as f:
        f.truncate(HEADER_SIZE + 3 * RECORD)
    writer = SegmentWriter(queueDir, FsyncPolicy.never(), 1 << 20)
    writer.commit([item(10), item(11)], sync=False)
    writer.close()
    assert readSeqs(tmp_path) == [0, 1, 2, 6, 7]
    again = JournalReader(queueDir, "fwd")
    # The stale checkpoint still counts the new records as unread.
    assert again.backlog()[0] == 2
    assert [p for _, p in again] == [item(0), item(1), item(2), item(10), item(11)]
    again.commit(again.position)
    assert again.backlog() == (0, 0)


def writeV1(queueDir, base: int, items, tail: bytes = b"") -> str:
    """
    A format 1 segment, as the code before format 2 wrote it.
    """
    os.makedirs(queueDir, exist_ok=True)
    body = b"".join(struct.pack(">II", len(x), zlib.crc32(x)) + x for x in items)
    path = segmentPath(str(queueDir), base)
    with open(path, "wb") as f:
        f.write(HEADER_V1 + body + tail)
    return path


@pytest_twisted.inlineCallbacks
def test_formatOneContinuesInFormatTwo(started, tmp_path, logged):
    """
    A data directory written by the old code is read as it is; the writer
    cuts the torn tail of its newest format 1 segment, never appends to it,
    and goes on in a new format 2 segment numbered after it.
    """
    q = tmp_path / "q"
    writeV1(q, 0, [item(n) for n in range(3)])
    old = writeV1(q, 3, [item(3), item(4)], tail=b"\x00\x00\x00\x07ab")
    journal = started(tmp_path)
    yield journal.put("q", [item(5)])
    yield journal.stopService()
    # The 6 cut bytes could have held one format 1 record, numbered 5.
    assert listSegments(str(q)) == [0, 3, 6]
    assert os.path.getsize(old) == HEADER_SIZE + 2 * (8 + len(item(0)))
    with open(segmentPath(str(q), 6), "rb") as f:
        assert f.read(HEADER_SIZE) == b"MXJRNL\x00\x02"
    assert readAll(tmp_path) == [item(n) for n in range(6)]
    assert readSeqs(tmp_path) == [0, 1, 2, 3, 4, 6]
    assert len([e for e in logged if "dropping" in e.get("log_format", "")]) == 1


def test_emptyFormatOneSegment(tmp_path):
    """
    A newest format 1 segment with no records keeps its name: the new
    segment is numbered one past it (a reader may have it open).
    """
    q = tmp_path / "q"
    writeV1(q, 4, [])
    writer = SegmentWriter(str(q), FsyncPolicy.never(), 1 << 20)
    writer.commit([item(0)], sync=False)
    writer.close()
    assert listSegments(str(q)) == [4, 5]
    assert readAll(tmp_path) == [item(0)] and readSeqs(tmp_path) == [5]


def test_unknownFormatRefused(tmp_path):
    """
    Recovery of a newest segment of an unknown format raises
    JournalFormatError, every time, and writes nothing.
    """
    q = tmp_path / "q"
    q.mkdir()
    path = q / "00000000000000000000.seg"
    path.write_bytes(b"MXJRNL\x00\x05" + b"future records")
    writer = SegmentWriter(str(q), FsyncPolicy.never(), 1 << 20)
    for _ in range(2):
        with pytest.raises(JournalFormatError, match="format version 5") as caught:
            writer.commit([item(0)], sync=False)
        assert str(path) in str(caught.value)
    assert listSegments(str(q)) == [0]
    assert path.read_bytes() == b"MXJRNL\x00\x05" + b"future records"


@pytest_twisted.inlineCallbacks
def test_markersAppended(started, tmp_path):
    """
    A Marker in an append is written as a marker record; plain readers skip
    it.
    """
    journal = started(tmp_path)
    yield journal.put("q", [item(0)])
    yield journal.put("q", [Marker(b"note"), item(1)])
    yield journal.stopService()
    assert readAll(tmp_path) == [item(0), item(1)]
    with JournalReader(str(tmp_path / "q")) as reader:
        got = reader.read(markers=True)
    assert [p for _, p in got] == [item(0), b"note", item(1)]
    assert [type(p) for _, p in got] == [bytes, Marker, bytes]


@pytest_twisted.inlineCallbacks
def test_intervalFsyncFailureCounted(started, tmp_path, logged):
    """
    Under interval:MS, appends are acknowledged before their fsync: when the
    periodic fsync fails, those records may be lost.  They are counted and
    logged at error, the writer refuses appends until a retry works, and a
    successful periodic fsync (the control) counts nothing.
    """
    clock, failing = task.Clock(), [False]

    def sync(fd):
        if failing[0]:
            raise OSError(errno.EIO, "simulated EIO")

    journal = started(tmp_path, policy=FsyncPolicy.parse("interval:250"), clock=clock, sync=sync)

    def status():
        return journal.status()["queues"]["q"]

    yield journal.put("q", [item(0)])
    assert status()["unsynced"] == 1
    clock.advance(0.25)
    yield waitUntil(lambda: status()["fsyncs"] == 1 and status()["unsynced"] == 0)
    assert status()["possiblyLost"] == 0

    yield journal.put("q", [item(1), item(2)])
    yield journal.put("q", [item(3)])
    assert status()["unsynced"] == 3
    failing[0] = True
    clock.advance(0.25)
    yield waitUntil(lambda: not journal.ready())
    s = status()
    assert (s["possiblyLost"], s["unsynced"], s["fsyncs"], s["fsyncFailures"]) == (3, 0, 2, 1)
    assert not s["healthy"] and "simulated EIO" in s["lastError"]
    [error] = [e for e in logged if "may be lost" in e.get("log_format", "")]
    assert error["log_level"].name == "error" and error["count"] == 3
    assert "simulated EIO" in error["error"]
    with pytest.raises(QueueUnavailable):
        yield journal.put("q", [item(4)])

    failing[0] = False
    clock.advance(RETRY_DELAY)
    yield waitUntil(journal.ready)
    yield journal.put("q", [item(5)])
    assert status()["possiblyLost"] == 3
    yield journal.stopService()
    assert readAll(tmp_path) == [item(n) for n in [0, 1, 2, 3, 5]]


@pytest_twisted.inlineCallbacks
def test_fileModes(started, tmp_path):
    """
    Segments and checkpoints hold client IPs: only the owner may read them,
    whatever the umask allows.  So are the directories the journal creates
    (C{DATA_DIR}, any missing parent of it, each queue's) and the files
    beside the queues (the lock, the journal's identity).
    """
    dataDir = tmp_path / "state" / "data"
    old = os.umask(0o022)
    try:
        journal = started(dataDir)
        yield journal.put("q", [item(0)])
        yield journal.stopService()
        reader = JournalReader(str(dataDir / "q"), "fwd")
        reader.commit(Position(0, HEADER_SIZE + RECORD, 1, zlib.crc32(item(0))))
    finally:
        os.umask(old)

    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    assert mode(tmp_path / "state") == 0o700
    assert mode(dataDir) == 0o700
    assert mode(dataDir / "lock") == 0o600
    assert mode(dataDir / "journal-id") == 0o600
    assert mode(dataDir / "q") == 0o700
    assert mode(segmentPath(str(dataDir / "q"), 0)) == 0o600
    assert mode(dataDir / "q" / "checkpoint.fwd") == 0o600
