"""
Reading a journal queue: checkpoints, limits, a concurrent writer, damage
in older segments, backlog and retention.
"""

from __future__ import annotations

import os
import threading
import zlib

import pytest
from twisted.logger import globalLogPublisher

from mixingest.journal.framing import HEADER_SIZE, encodeRecords, listSegments, segmentPath
from mixingest.journal.fsync import FsyncPolicy
from mixingest.journal.reader import (
    JournalReader,
    Position,
    deleteConsumedSegments,
    listCheckpoints,
    loadCheckpoint,
)
from mixingest.journal.writer import SegmentWriter

RECORD = 8 + 16


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
    record = bytes(encodeRecords([item(1)]))
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


def test_damageInOlderSegmentSkipped(tmp_path, logged):
    """
    Damage in a segment that is not the newest is logged and skipped: the
    reader goes on with the next segment.
    """
    q = tmp_path / "q"
    write(q, [item(n) for n in range(9)], segmentSize=HEADER_SIZE + 3 * RECORD, groups=9)
    assert listSegments(str(q)) == [0, 3, 6]
    with open(segmentPath(str(q), 3), "r+b") as f:
        f.seek(HEADER_SIZE + RECORD + 10)
        f.write(b"X")
    with JournalReader(str(q)) as reader:
        assert payloads(reader) == [item(n) for n in [0, 1, 2, 3, 6, 7, 8]]
    [warning] = [e for e in logged if "damaged" in e["log_format"]]
    assert warning["offset"] == HEADER_SIZE + RECORD and warning["later"] == 6


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
