"""
mixingest.journal.Consumer: consumer groups with durable cursors.
"""

from __future__ import annotations

import os
import time

import pytest

from mixingest.journal import Consumer, GroupInUse, Position, resetGroup
from mixingest.journal.consumer import HEARTBEAT, groupStatus
from mixingest.journal.framing import HEADER_SIZE, RECORD_HEADER_SIZE, listSegments, segmentPath
from mixingest.journal.fsync import FsyncPolicy
from mixingest.journal.reader import (
    SegmentCounter,
    checkpointTime,
    deleteConsumedSegments,
    listCheckpoints,
    loadCheckpoint,
)
from mixingest.journal.writer import SegmentWriter

RECORD = RECORD_HEADER_SIZE + 16


def item(n: int) -> bytes:
    return b'{"n":%010d}' % n  # 16 bytes


def write(dataDir, first: int, count: int, segmentSize: int = 1 << 20) -> None:
    writer = SegmentWriter(os.path.join(str(dataDir), "events"), FsyncPolicy.never(), segmentSize)
    for n in range(first, first + count):
        writer.commit([item(n)], sync=False)
    writer.close()


def drain(consumer: Consumer, batch: int = 7) -> list:
    out = []
    while True:
        records = consumer.poll(batch)
        if not records:
            return out
        out.extend(records)


def numbers(records) -> list:
    return [int(r.payload[5:15]) for r in records]


def test_pollCommitResume(tmp_path):
    """
    A group reads every item once, in order, with increasing sequence
    numbers, across segments; reopened, it resumes after its commit.
    """
    write(tmp_path, 0, 30, segmentSize=HEADER_SIZE + 5 * RECORD)
    with Consumer(str(tmp_path), "events", "loader") as consumer:
        first = consumer.poll(12)
        assert numbers(first) == list(range(12))
        assert [r.seq for r in first] == list(range(12))
        consumer.commit(first[-1].position)
    with Consumer(str(tmp_path), "events", "loader") as consumer:
        assert numbers(drain(consumer)) == list(range(12, 30))


def test_uncommittedSeenAgain(tmp_path):
    """
    The documented window: what was polled after the last commit is exactly
    what a consumer opened after a crash sees again; never a gap.
    """
    write(tmp_path, 0, 20)
    consumer = Consumer(str(tmp_path), "events", "g")
    batch = consumer.poll(10)
    consumer.commit(batch[4].position)  # processed 0-4, then "killed"
    consumer.close()  # releases the group, commits nothing
    with Consumer(str(tmp_path), "events", "g") as again:
        assert numbers(drain(again)) == list(range(5, 20))


def test_groupsAreIndependent(tmp_path):
    write(tmp_path, 0, 10)
    with Consumer(str(tmp_path), "events", "a") as a, Consumer(str(tmp_path), "events", "b") as b:
        a.poll(8)
        a.commit()
        assert numbers(drain(b)) == list(range(10))
    with Consumer(str(tmp_path), "events", "a") as a:
        assert numbers(drain(a)) == [8, 9]
    assert listCheckpoints(str(tmp_path / "events")) == ["a", "b"]


def test_oneConsumerPerGroup(tmp_path):
    """
    A second consumer of a group that is open is refused, and so is a
    reset of its cursor, rather than both reading every item and
    committing over each other; other groups are not affected, and the
    group is free again once its consumer is closed.
    """
    write(tmp_path, 0, 3)
    with Consumer(str(tmp_path), "events", "g") as first:
        with pytest.raises(GroupInUse, match="'g'"):
            Consumer(str(tmp_path), "events", "g")
        with pytest.raises(GroupInUse):
            resetGroup(str(tmp_path), "events", "g", "end")
        with Consumer(str(tmp_path), "events", "other") as other:
            assert numbers(drain(other)) == [0, 1, 2]
        first.poll(2)
        first.commit()
    with Consumer(str(tmp_path), "events", "g") as again:
        assert numbers(drain(again)) == [2]


def test_readsWhatIsAppendedLater(tmp_path):
    """
    An empty poll is "not yet": items appended afterwards (as the daemon
    does while consumers read) come on the next poll.
    """
    write(tmp_path, 0, 3)
    with Consumer(str(tmp_path), "events", "g") as consumer:
        assert numbers(drain(consumer)) == [0, 1, 2]
        write(tmp_path, 3, 2)
        assert numbers(drain(consumer)) == [3, 4]


def test_fromEnd(tmp_path):
    """
    A new group opened at the end sees only later items; an existing group
    resumes at its cursor whatever C{start} says.
    """
    write(tmp_path, 0, 5, segmentSize=HEADER_SIZE + 2 * RECORD)
    with Consumer(str(tmp_path), "events", "late", start="end") as late:
        assert late.poll() == []
    with Consumer(str(tmp_path), "events", "early") as early:
        early.poll(2)
        early.commit()
    write(tmp_path, 5, 2)
    with Consumer(str(tmp_path), "events", "late", start="start") as late:
        assert numbers(drain(late)) == [5, 6]
    with Consumer(str(tmp_path), "events", "early", start="end") as early:
        assert numbers(drain(early)) == [2, 3, 4, 5, 6]


def test_registeredBeforeFirstEvent(tmp_path):
    """
    A group opened before the queue exists is registered at once, so that
    retention keeps every segment for it until it commits.
    """
    Consumer(str(tmp_path), "events", "g").close()
    queueDir = str(tmp_path / "events")
    assert listCheckpoints(queueDir) == ["g"]
    assert loadCheckpoint(queueDir, "g") is None
    write(tmp_path, 0, 6, segmentSize=HEADER_SIZE + 2 * RECORD)
    assert deleteConsumedSegments(queueDir) == []
    with Consumer(str(tmp_path), "events", "g") as consumer:
        assert numbers(consumer.poll(4)) == [0, 1, 2, 3]
        consumer.commit()
    assert deleteConsumedSegments(queueDir) == [0]  # the cursor is in segment 2


@pytest.mark.parametrize("group", ["forwarder", "bad/name", ""])
def test_badGroups(tmp_path, group):
    with pytest.raises(ValueError):
        Consumer(str(tmp_path), "events", group)


def test_noJournalDirectory(tmp_path):
    with pytest.raises(FileNotFoundError):
        Consumer(str(tmp_path / "missing"), "events", "g")


@pytest.mark.parametrize(
    "to, expected",
    [("start", list(range(10))), ("end", []), ("4", list(range(4, 10))), ("99", [])],
)
def test_reset(tmp_path, to, expected):
    write(tmp_path, 0, 10, segmentSize=HEADER_SIZE + 3 * RECORD)
    with Consumer(str(tmp_path), "events", "g") as consumer:
        consumer.poll(7)
        consumer.commit()
    resetGroup(str(tmp_path), "events", "g", to)
    with Consumer(str(tmp_path), "events", "g") as consumer:
        assert numbers(drain(consumer)) == expected


def test_resetBadTarget(tmp_path):
    with pytest.raises(ValueError):
        resetGroup(str(tmp_path), "events", "g", "yesterday")


def test_heartbeat(tmp_path):
    """
    An idle consumer rewrites its cursor once a heartbeat has passed, so
    that --group-expiry does not take a live group; not before.
    """
    write(tmp_path, 0, 2)
    now = [1000.0]
    queueDir = str(tmp_path / "events")
    with Consumer(str(tmp_path), "events", "g", clock=lambda: now[0]) as consumer:
        drain(consumer)
        consumer.commit()
        os.utime(os.path.join(queueDir, "checkpoint.g"), (1, 1))
        now[0] += HEARTBEAT - 1
        assert consumer.poll() == []
        assert checkpointTime(queueDir, "g") == 1
        now[0] += 1
        assert consumer.poll() == []
        assert checkpointTime(queueDir, "g") > 1
        assert loadCheckpoint(queueDir, "g") == consumer.committed


def test_damageSkipped(tmp_path):
    """
    A consumer that meets damage skips it, counts it and carries on.
    """
    write(tmp_path, 0, 10, segmentSize=HEADER_SIZE + 5 * RECORD)
    path = segmentPath(str(tmp_path / "events"), 0)
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE + 2 * RECORD + RECORD_HEADER_SIZE + 3)
        f.write(b"X")
    with Consumer(str(tmp_path), "events", "g") as consumer:
        assert numbers(drain(consumer)) == [0, 1, 3, 4, 5, 6, 7, 8, 9]
        assert consumer.damagedRanges == 1


def test_groupStatus(tmp_path):
    """
    Lag in items counts what follows the cursor; lag in seconds is 0 when
    caught up and the age of the segment holding the next item otherwise.
    """
    write(tmp_path, 0, 10, segmentSize=HEADER_SIZE + 5 * RECORD)
    queueDir = str(tmp_path / "events")
    with Consumer(str(tmp_path), "events", "g") as consumer:
        consumer.poll(3)
        consumer.commit()
    bases = listSegments(queueDir)
    os.utime(segmentPath(queueDir, bases[0]), (time.time() - 100, time.time() - 100))
    counter = SegmentCounter(queueDir)
    status = groupStatus(counter, "g", time.time())
    assert status["lagItems"] == 7
    assert status["nextSeq"] == 3
    assert status["lagSeconds"] >= 99
    position = Position(**status["position"])
    assert position[:3] == (0, HEADER_SIZE + 3 * RECORD, 3)
    with Consumer(str(tmp_path), "events", "g") as consumer:
        drain(consumer)
        consumer.commit()
    status = groupStatus(counter, "g", time.time())
    assert (status["lagItems"], status["lagSeconds"]) == (0, 0.0)
