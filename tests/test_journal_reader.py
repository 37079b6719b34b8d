"""
Reading a journal queue: checkpoints, limits, a concurrent writer, damage,
markers, format 1 segments, backlog and retention.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib

import pytest
from twisted.logger import globalLogPublisher

from mixingest.journal.framing import (
    HEADER_SIZE,
    HEADER_V1,
    RECORD_HEADER_SIZE,
    JournalFormatError,
    Marker,
    encodeRecords,
    listSegments,
    segmentPath,
)
from mixingest.journal.fsync import FsyncPolicy
from mixingest.journal.reader import (
    JournalReader,
    Position,
    deleteConsumedSegments,
    listCheckpoints,
    loadCheckpoint,
)
from mixingest.journal.writer import SegmentWriter
from tests.damage import flip

RECORD = RECORD_HEADER_SIZE + 16


def item(n: int) -> bytes:
    return b'{"n":%010d}' % n  # 16 bytes


def write(queueDir, items, segmentSize=1 << 20, groups=1) -> None:
    writer = SegmentWriter(str(queueDir), FsyncPolicy.never(), segmentSize)
    for i in range(groups):
        writer.commit(items[i::groups] if groups > 1 else items, sync=False)
    writer.close()


def payloads(reader):
    return [payload for _, payload in reader]


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_readAndPositions(tmp_path):
    """
    Each item comes with the position just after it; reading resumes there.
    """
    q = tmp_path / "q"
    write(q, [item(n) for n in range(5)])
    reader = JournalReader(str(q))
    batch = reader.read(maxItems=2)
    assert batch == [
        (Position(0, HEADER_SIZE + RECORD, 1, zlib.crc32(item(0))), item(0)),
        (Position(0, HEADER_SIZE + 2 * RECORD, 2, zlib.crc32(item(1))), item(1)),
    ]
    assert payloads(reader) == [item(n) for n in range(2, 5)]
    assert reader.read() == []
    reader.seek(batch[0][0])
    assert payloads(reader) == [item(n) for n in range(1, 5)]
    reader.close()


def test_maxBytes(tmp_path):
    """
    maxBytes caps a batch, but an item larger than it still comes alone.
    """
    q = tmp_path / "q"
    big = b'{"x":"' + b"y" * 100 + b'"}'
    write(q, [item(0), item(1), big, item(2)])
    with JournalReader(str(q)) as reader:
        assert [p for _, p in reader.read(maxBytes=40)] == [item(0), item(1)]
        assert [p for _, p in reader.read(maxBytes=40)] == [big]
        assert [p for _, p in reader.read(maxBytes=40)] == [item(2)]


def test_emptyQueue(tmp_path):
    reader = JournalReader(str(tmp_path / "nothing"), "fwd")
    assert reader.read() == [] and reader.position is None
    assert reader.backlog() == (0, 0)


def test_checkpointDurable(tmp_path, monkeypatch):
    """
    A committed checkpoint is fsynced, renamed into place and fsynced in its
    directory; a reader opened later resumes after it.
    """
    q = tmp_path / "q"
    write(q, [item(n) for n in range(10)])
    synced = []
    realFsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), realFsync(fd)))
    reader = JournalReader(str(q), "fwd")
    batch = reader.read(maxItems=4)
    reader.commit(batch[-1][0])
    assert len(synced) == 2  # the file, then the directory
    assert sorted(os.listdir(q)) == ["00000000000000000000.seg", "checkpoint.fwd"]
    assert listCheckpoints(str(q)) == ["fwd"]
    assert loadCheckpoint(str(q), "fwd") == batch[-1][0]
    # An uncommitted read is not remembered.
    reader.read(maxItems=3)
    reader.close()
    again = JournalReader(str(q), "fwd")
    assert again.committed == batch[-1][0]
    assert payloads(again) == [item(n) for n in range(4, 10)]
    assert JournalReader(str(q), "other").committed is None
    with pytest.raises(ValueError, match="no checkpoint"):
        JournalReader(str(q)).commit(batch[0][0])
    with pytest.raises(ValueError, match="invalid checkpoint name"):
        JournalReader(str(q), "../x")


def test_damagedCheckpoint(tmp_path):
    (tmp_path / "checkpoint.fwd").write_bytes(b'{"segment": 0, "off')
    with pytest.raises(ValueError, match="damaged checkpoint"):
        JournalReader(str(tmp_path), "fwd")


def test_incompleteTailIsNotYet(tmp_path, logged):
    """
    A record still being written is "not yet": no item, no warning, and it
    is read once complete.
    """
    q = tmp_path / "q"
    write(q, [item(0)])
    record = bytes(encodeRecords([item(1)], 1))
    segment = segmentPath(str(q), 0)
    reader = JournalReader(str(q))
    assert payloads(reader) == [item(0)]
    for cut in [3, 12, len(record)]:
        with open(segment, "ab") as f:
            f.write(record[f.tell() - HEADER_SIZE - RECORD : cut])
        expected = [item(1)] if cut == len(record) else []
        assert payloads(reader) == expected
    assert logged == []


def test_concurrentWriter(tmp_path, logged):
    """
    A reader polling while a writer appends and rotates sees every item,
    in order, exactly once.
    """
    q = tmp_path / "q"
    total = 3000
    writer = SegmentWriter(str(q), FsyncPolicy.never(), HEADER_SIZE + 50 * RECORD)

    def append():
        for start in range(0, total, 7):
            writer.commit([item(n) for n in range(start, min(start + 7, total))], sync=False)
        writer.close()

    thread = threading.Thread(target=append)
    thread.start()
    reader = JournalReader(str(q), "fwd")
    seen = []
    while len(seen) < total:
        batch = reader.read(maxItems=100)
        if batch:
            reader.commit(batch[-1][0])
        seen.extend(p for _, p in batch)
        if not thread.is_alive() and not batch and len(seen) < total:
            break
    thread.join()
    assert seen == [item(n) for n in range(total)]
    assert len(listSegments(str(q))) > 10
    assert reader.backlog() == (0, 0)
    assert logged == []


def damageEvents(logged):
    return [e for e in logged if "damaged bytes" in e.get("log_format", "")]


def test_damageInOlderSegmentSkipped(tmp_path, logged):
    """
    Damage in a segment that is not the newest costs only the damaged
    record: it is logged once and skipped, and the records after it in the
    same segment are read.
    """
    q = tmp_path / "q"
    write(q, [item(n) for n in range(9)], segmentSize=HEADER_SIZE + 3 * RECORD, groups=9)
    assert listSegments(str(q)) == [0, 3, 6]
    flip(segmentPath(str(q), 3), HEADER_SIZE + RECORD + 10)
    with JournalReader(str(q)) as reader:
        assert payloads(reader) == [item(n) for n in [0, 1, 2, 3, 5, 6, 7, 8]]
        assert (reader.damaged, reader.damagedRanges) == (RECORD, 1)
    [error] = damageEvents(logged)
    assert error["offset"] == HEADER_SIZE + RECORD and error["length"] == RECORD
    assert error["path"] == segmentPath(str(q), 3)


# Offsets in a record: sync marker, kind and length, sequence number,
# payload CRC, header CRC, payload.
IN_RECORD = [0, 3, 5, 10, 17, 21, RECORD_HEADER_SIZE + 3, RECORD - 1]


@pytest.mark.parametrize("where", IN_RECORD)
@pytest.mark.parametrize("sealed", [False, True], ids=["newest", "sealed"])
def test_damageCostsOneRecord(tmp_path, logged, where, sealed):
    """
    A byte flipped anywhere in a record, in the newest segment or a sealed
    one, loses that record only; the numbers of the records after it do not
    change.
    """
    q = tmp_path / "q"
    write(q, [item(n) for n in range(6)])
    if sealed:
        write(q, [item(6)], segmentSize=HEADER_SIZE + 6 * RECORD)
        assert listSegments(str(q)) == [0, 6]
    flip(segmentPath(str(q), 0), HEADER_SIZE + 2 * RECORD + where)
    with JournalReader(str(q)) as reader:
        got = reader.read()
        assert [p for _, p in got] == [item(n) for n in [0, 1, 3, 4, 5] + [6] * sealed]
        assert [position.seq - 1 for position, _ in got] == [0, 1, 3, 4, 5] + [6] * sealed
        assert (reader.damaged, reader.damagedRanges) == (RECORD, 1)
        assert reader.read() == []
        # Bytes measure disk use: the damaged record's too.
        assert reader.backlog() == (6 + sealed - 1, (6 + sealed) * RECORD)
    [error] = damageEvents(logged)
    assert (error["offset"], error["length"]) == (HEADER_SIZE + 2 * RECORD, RECORD)


def test_damagedTailOfNewestWaits(tmp_path, logged):
    """
    Bad bytes at the end of the newest segment may be a record still being
    written, as far as a reader can tell: it skips them only once an intact
    record follows them, or a newer segment exists.
    """
    q = tmp_path / "q"
    write(q, [item(n) for n in range(3)])
    flip(segmentPath(str(q), 0), HEADER_SIZE + 2 * RECORD + 30)
    reader = JournalReader(str(q))
    assert payloads(reader) == [item(0), item(1)]
    assert payloads(reader) == [] and damageEvents(logged) == []
    # Records appended after them prove that they are damage.
    with open(segmentPath(str(q), 0), "ab") as f:
        f.write(bytes(encodeRecords([item(3)], 3)))
    assert payloads(reader) == [item(3)]
    assert reader.damagedRanges == 1
    # The same, when the writer moved on to a new segment instead.
    (q / "00000000000000000004.seg").write_bytes(bytes(HEADER_SIZE))
    flip(segmentPath(str(q), 0), os.path.getsize(segmentPath(str(q), 0)) - 1)
    more = JournalReader(str(q))
    assert payloads(more) == [item(0), item(1)]
    with open(segmentPath(str(q), 4), "wb") as f:
        f.write(b"MXJRNL\x00\x02" + bytes(encodeRecords([item(4)], 4)))
    assert payloads(more) == [item(4)]
    # Records 2 and 3 are both damaged: one range, to the end of the segment.
    assert (more.damagedRanges, more.damaged) == (1, 2 * RECORD)
    reader.close()
    more.close()


@pytest.mark.parametrize("where", [0, 10, 21, RECORD - 1])
def test_checkpointAcrossDamage(tmp_path, logged, where):
    """
    A checkpoint written before damage resumes where it was: damage before
    it does not make the reader reread the segment, and damage just after
    it costs that record only.
    """
    q = tmp_path / "q"
    write(q, [item(n) for n in range(8)])
    reader = JournalReader(str(q), "fwd")
    reader.commit(reader.read(maxItems=4)[-1][0])
    reader.close()
    segment = segmentPath(str(q), 0)
    flip(segment, HEADER_SIZE + 1 * RECORD + where)  # before the checkpoint
    flip(segment, HEADER_SIZE + 4 * RECORD + where)  # just after it
    again = JournalReader(str(q), "fwd")
    assert payloads(again) == [item(n) for n in [5, 6, 7]]
    assert not [e for e in logged if "does not match" in e.get("log_format", "")]
    assert again.damagedRanges == 1
    # A checkpoint right after the skipped range holds too.
    again.seek(again.committed)
    batch = again.read(maxItems=1)
    again.commit(again.position)
    assert again.position.offset == HEADER_SIZE + 6 * RECORD and batch[0][1] == item(5)
    assert payloads(JournalReader(str(q), "fwd")) == [item(6), item(7)]


def test_checkpointAfterSkippedDamage(tmp_path, logged):
    """
    A reader that stops right after skipping damage holds a position at the
    start of the next intact record, numbered like it; committed, it
    resumes there.
    """
    q = tmp_path / "q"
    write(q, [item(n) for n in range(4)])
    flip(segmentPath(str(q), 0), HEADER_SIZE + RECORD + 30)
    reader = JournalReader(str(q), "fwd")
    assert [p for _, p in reader.read(maxBytes=len(item(0)))] == [item(0)]
    assert reader.position == Position(0, HEADER_SIZE + 2 * RECORD, 2, 0)
    reader.commit(reader.position)
    again = JournalReader(str(q), "fwd")
    assert payloads(again) == [item(2), item(3)]
    assert again.damagedRanges == 0
    assert not [e for e in logged if "does not match" in e.get("log_format", "")]


def test_markers(tmp_path):
    """
    Markers are skipped by default (the position moves past them) and
    returned as Marker payloads on request; backlog counts them.
    """
    q = tmp_path / "q"
    writer = SegmentWriter(str(q), FsyncPolicy.never(), 1 << 20)
    writer.commit([item(0), Marker(b"note"), item(1)], sync=False)
    writer.commit([Marker(b"last")], sync=False)
    writer.close()
    with JournalReader(str(q), "plain") as reader:
        assert reader.backlog() == (4, 2 * RECORD + 2 * (RECORD_HEADER_SIZE + 4))
        got = reader.read()
        assert [p for _, p in got] == [item(0), item(1)]
        assert all(type(p) is bytes for _, p in got)
        assert got[1][0].seq == 3
        assert reader.position.seq == 4  # past the last marker too
        reader.commit(reader.position)
        assert reader.backlog() == (0, 0)
    with JournalReader(str(q)) as reader:
        got = reader.read(markers=True)
    assert [p for _, p in got] == [item(0), b"note", item(1), b"last"]
    assert [type(p) for _, p in got] == [bytes, Marker, bytes, Marker]
    assert [position.seq for position, _ in got] == [1, 2, 3, 4]


def writeV1(queueDir, base: int, items, tail: bytes = b"") -> None:
    """
    A format 1 segment, as the code before format 2 wrote it.
    """
    os.makedirs(queueDir, exist_ok=True)
    body = b"".join(struct.pack(">II", len(x), zlib.crc32(x)) + x for x in items)
    with open(segmentPath(str(queueDir), base), "wb") as f:
        f.write(HEADER_V1 + body + tail)


def test_formatOne(tmp_path, logged):
    """
    Format 1 segments are read as before, numbered by counting, with their
    checkpoints; damage in a sealed one skips the rest of it (no sync
    marker to find the next record by).
    """
    q = tmp_path / "q"
    writeV1(q, 0, [item(n) for n in range(3)])
    writeV1(q, 3, [item(n) for n in range(3, 6)])
    flip(segmentPath(str(q), 3), HEADER_SIZE + 8 + 16 + 3)
    writeV1(q, 6, [item(6), item(7)])
    reader = JournalReader(str(q), "fwd")
    # Records counted up to the damage; bytes as on disk.
    assert reader.backlog() == (3 + 1 + 2, 8 * (8 + 16))
    got = reader.read()
    assert [p for _, p in got] == [item(n) for n in [0, 1, 2, 3, 6, 7]]
    assert [position.seq for position, _ in got] == [1, 2, 3, 4, 7, 8]
    assert reader.damagedRanges == 1
    [error] = damageEvents(logged)
    assert error["offset"] == HEADER_SIZE + 24 and "segment 6" in error["then"]
    reader.commit(got[1][0])
    again = JournalReader(str(q), "fwd")
    assert payloads(again) == [item(n) for n in [2, 3, 6, 7]]
    assert again.backlog()[0] == 1 + 1 + 2


def test_unknownFormat(tmp_path):
    """
    A reader that reaches a segment of an unknown format stops with an
    error instead of skipping it.
    """
    q = tmp_path / "q"
    write(q, [item(0)])
    (q / "00000000000000000001.seg").write_bytes(b"MXJRNL\x00\x09" + b"x" * 40)
    reader = JournalReader(str(q))
    with pytest.raises(JournalFormatError, match="format version 9"):
        reader.read()
    with pytest.raises(JournalFormatError):
        reader.backlog()


def test_backlog(tmp_path):
    """
    Backlog is what lies after the committed checkpoint, and stays right as
    the queue grows and rotates.
    """
    q = tmp_path / "q"
    size = HEADER_SIZE + 4 * RECORD
    write(q, [item(n) for n in range(6)], segmentSize=size, groups=6)
    reader = JournalReader(str(q), "fwd")
    assert reader.backlog() == (6, 6 * RECORD)
    batch = reader.read(maxItems=5)
    assert reader.backlog() == (6, 6 * RECORD)  # not committed yet
    reader.commit(batch[-1][0])
    assert reader.backlog() == (1, RECORD)
    write(q, [item(n) for n in range(6, 12)], segmentSize=size, groups=6)
    assert reader.backlog() == (7, 7 * RECORD)
    assert payloads(reader) == [item(n) for n in range(5, 12)]


def test_deleteConsumed(tmp_path, logged):
    """
    Only segments wholly before every checkpoint are deleted, never the
    newest; a reader whose segment is gone continues at the next one.
    """
    q = tmp_path / "q"
    write(q, [item(n) for n in range(10)], segmentSize=HEADER_SIZE + 2 * RECORD, groups=10)
    assert listSegments(str(q)) == [0, 2, 4, 6, 8]
    assert deleteConsumedSegments(str(q)) == []
    fast, slow = JournalReader(str(q), "fast"), JournalReader(str(q), "slow")
    fast.commit(fast.read(maxItems=10)[-1][0])
    slow.commit(slow.read(maxItems=3)[-1][0])  # in segment 2
    assert deleteConsumedSegments(str(q)) == [0]
    slow.commit(slow.read()[-1][0])
    assert deleteConsumedSegments(str(q)) == [2, 4, 6]
    assert listSegments(str(q)) == [8]
    # An uncheckpointed reader that was in a deleted segment moves on.
    stale = JournalReader(str(q))
    stale.seek(Position(2, HEADER_SIZE, 2))
    assert payloads(stale) == [item(8), item(9)]
    assert any("is gone" in e["log_format"] for e in logged)


def test_checkpointPastLostData(tmp_path, logged):
    """
    After a machine crash took data that a reader had already committed
    past, and the writer appended in its place, the reader rereads the
    segment rather than stall mid-record or skip the new records.
    """
    q = tmp_path / "q"
    write(q, [item(n) for n in range(5)])
    reader = JournalReader(str(q), "fwd")
    reader.commit(reader.read(maxItems=4)[-1][0])
    with open(segmentPath(str(q), 0), "r+b") as f:
        f.truncate(HEADER_SIZE + 2 * RECORD + 3)
    write(q, [item(n) for n in range(100, 104)])
    again = JournalReader(str(q), "fwd")
    assert payloads(again) == [item(0), item(1)] + [item(n) for n in range(100, 104)]
    [error] = [e for e in logged if "does not match" in e["log_format"]]
    assert error["offset"] == HEADER_SIZE + 4 * RECORD
    # A checkpoint that matches is trusted without fuss.
    again.commit(again.position)
    assert payloads(JournalReader(str(q), "fwd")) == []
    assert len(logged) == 2  # the writer's torn-tail warning and the error
