"""
Retention in journal-only mode: segments freed once every consumer group
has passed them, and the limits for a group that stops reading.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.usage import UsageError

from mixingest.journal import Consumer, FsyncPolicy, Journal, RetentionPolicy
from mixingest.journal.framing import HEADER_SIZE, RECORD_HEADER_SIZE, listSegments, segmentPath
from mixingest.journal.reader import SegmentCounter, listCheckpoints, writeCheckpoint
from mixingest.journal.retention import DROP, QueueRetention, enforce, measureGroups
from mixingest.journal.service import RetentionExceeded
from mixingest.journal.writer import SegmentWriter
from mixingest.metrics import groupMetrics
from mixingest.options import Options
from mixingest.tap import _retention

RECORD = RECORD_HEADER_SIZE + 16
SEGMENT = HEADER_SIZE + 2 * RECORD


def item(n: int) -> bytes:
    return b'{"n":%010d}' % n  # 16 bytes


def write(queueDir: str, first: int, count: int) -> None:
    writer = SegmentWriter(queueDir, FsyncPolicy.never(), SEGMENT)
    for n in range(first, first + count):
        writer.commit([item(n)], sync=False)
    writer.close()


def consume(dataDir: Path, group: str, count: int) -> None:
    with Consumer(str(dataDir), "events", group) as consumer:
        assert len(consumer.poll(count)) == count
        consumer.commit()


def run(queueDir: str, **policy: object) -> QueueRetention:
    return enforce(queueDir, RetentionPolicy(**policy), time.time())  # type: ignore[arg-type]


def test_freedWhenEveryGroupPassed(tmp_path: Path) -> None:
    """
    A segment is deleted exactly when the last group's cursor moves past
    it; the newest never is.
    """
    queueDir = str(tmp_path / "events")
    write(queueDir, 0, 10)  # segments 0, 2, 4, 6, 8
    consume(tmp_path, "fast", 10)
    consume(tmp_path, "slow", 3)  # in segment 2
    assert run(queueDir).consumed == [0]
    assert listSegments(queueDir) == [2, 4, 6, 8]
    consume(tmp_path, "slow", 2)  # seq 5: in segment 4
    assert run(queueDir).consumed == [2]
    consume(tmp_path, "slow", 5)
    assert run(queueDir).consumed == [4, 6]
    assert listSegments(queueDir) == [8]


def test_noGroupKeepsEverything(tmp_path: Path) -> None:
    """
    The control: without any group, nothing is consumed and nothing freed.
    """
    queueDir = str(tmp_path / "events")
    write(queueDir, 0, 10)
    assert run(queueDir).consumed == []
    assert len(listSegments(queueDir)) == 5


def test_refuseOverBytes(tmp_path: Path) -> None:
    queueDir = str(tmp_path / "events")
    write(queueDir, 0, 10)
    consume(tmp_path, "slow", 1)
    result = run(queueDir, maxBytes=5 * SEGMENT)
    assert result.over == "" and result.dropped == []
    result = run(queueDir, maxBytes=4 * SEGMENT)
    assert "--retention-bytes" in result.over
    assert result.dropped == []
    assert len(listSegments(queueDir)) == 5


def test_dropOverBytes(tmp_path: Path) -> None:
    """
    Dropping deletes the oldest segments until the queue is under the
    limit; the group that had not read them continues after them.
    """
    queueDir = str(tmp_path / "events")
    write(queueDir, 0, 10)
    consume(tmp_path, "slow", 1)
    result = run(queueDir, maxBytes=3 * SEGMENT, policy=DROP)
    assert result.dropped == [0, 2]
    assert result.droppedBytes == 2 * SEGMENT
    assert result.over == ""
    with Consumer(str(tmp_path), "events", "slow") as consumer:
        assert [r.seq for r in consumer.poll()] == [4, 5, 6, 7, 8, 9]


def test_ageLimit(tmp_path: Path) -> None:
    """
    A sealed segment last written longer ago than the limit is over it;
    dropping removes only the old ones.
    """
    queueDir = str(tmp_path / "events")
    write(queueDir, 0, 6)
    old = time.time() - 1000
    for base in (0, 2):
        os.utime(segmentPath(queueDir, base), (old, old))
    assert run(queueDir, maxAge=2000).over == ""
    assert "--retention-age" in run(queueDir, maxAge=500).over
    result = run(queueDir, maxAge=500, policy=DROP)
    assert (result.dropped, result.over) == ([0, 2], "")


def test_groupExpiry(tmp_path: Path) -> None:
    """
    A group that has not committed for the expiry loses its cursor, and the
    segments kept for it go; the forwarder's checkpoint never expires.
    """
    queueDir = str(tmp_path / "events")
    write(queueDir, 0, 6)
    consume(tmp_path, "gone", 1)
    consume(tmp_path, "live", 6)
    writeCheckpoint(queueDir, "forwarder", None)
    old = time.time() - 1000
    for name in ("gone", "forwarder"):
        os.utime(os.path.join(queueDir, f"checkpoint.{name}"), (old, old))
    result = run(queueDir, groupExpiry=500)
    assert result.expired == ["gone"]
    assert listCheckpoints(queueDir) == ["forwarder", "live"]
    writeCheckpoint(queueDir, "forwarder", None)


def test_groupsReported(tmp_path: Path) -> None:
    queueDir = str(tmp_path / "events")
    write(queueDir, 0, 6)
    consume(tmp_path, "g", 2)
    groups = measureGroups(SegmentCounter(queueDir), time.time())
    assert groups["g"]["lagItems"] == 4
    assert groups["g"]["nextSeq"] == 2


def test_badPolicy() -> None:
    with pytest.raises(ValueError):
        RetentionPolicy(policy="keep")


def makeJournal(path: Path, **kwargs: object) -> Journal:
    return Journal(
        str(path),
        policy=FsyncPolicy.never(),
        segmentSize=SEGMENT,
        reactor=reactor,
        maxBytes=1 << 30,
        **kwargs,  # type: ignore[arg-type]
    )


async def put(journal: Journal, first: int, count: int) -> None:
    for n in range(first, first + count):
        await journal.put("events", [item(n)])


@pytest_twisted.ensureDeferred
async def test_journalRefusesThenRecovers(tmp_path: Path) -> None:
    """
    Under refuse, a queue over its limit answers appends with
    L{RetentionExceeded} (a 503) and is not ready; once the group catches
    up, the next pass frees the segments and appends work again.  Cursors
    and the refusal survive a restart of the journal.
    """
    journal = makeJournal(
        tmp_path, retention=RetentionPolicy(maxBytes=3 * SEGMENT), retentionInterval=3600
    )
    journal.startService()
    try:
        await put(journal, 0, 1)
        consume(tmp_path, "slow", 1)
        await put(journal, 1, 9)
        await journal.enforceRetention()
        assert not journal.ready()
        assert "events" in journal.status()["retention"]["refusing"]
        with pytest.raises(RetentionExceeded):
            await journal.put("events", [item(99)])
        assert journal.status()["groups"]["events"]["slow"]["lagItems"] == 9
    finally:
        await journal.stopService()
    journal = makeJournal(tmp_path, retention=RetentionPolicy(maxBytes=3 * SEGMENT))
    journal.startService()  # the first pass runs at start
    try:
        await journal.enforceRetention()
        with pytest.raises(RetentionExceeded):
            await journal.put("events", [item(99)])
        consume(tmp_path, "slow", 9)
        results = await journal.enforceRetention()
        assert results["events"].consumed
        assert journal.ready()
        await journal.put("events", [item(10)])
        metrics = {m.name: m for m in groupMetrics(journal.status())}
        lag = metrics["mixingest_journal_group_lag_items"].samples
        assert [(s.labels, s.value) for s in lag] == [({"queue": "events", "group": "slow"}, 0)]
    finally:
        await journal.stopService()


@pytest_twisted.ensureDeferred
async def test_journalDrops(tmp_path: Path) -> None:
    journal = makeJournal(
        tmp_path,
        retention=RetentionPolicy(maxBytes=3 * SEGMENT, policy=DROP),
        retentionInterval=3600,
    )
    journal.startService()
    try:
        await put(journal, 0, 1)
        consume(tmp_path, "slow", 1)
        await put(journal, 1, 9)
        await journal.enforceRetention()
        retention = journal.status()["retention"]
        assert retention["droppedSegments"] == 2
        assert retention["refusing"] == {}
        assert journal.ready()
        assert journal.bytes() <= 3 * SEGMENT
        await journal.put("events", [item(10)])
    finally:
        await journal.stopService()


def test_options() -> None:
    """
    The retention options reach the journal in journal-only mode, and only
    there: with a remote queue the forwarder deletes what it forwarded.
    """
    options = Options()
    options.parseOptions(
        [
            "--retention-bytes=1000",
            "--retention-age=60",
            "--retention-policy=drop",
            "--group-expiry=3600",
        ]
    )
    assert _retention(options) == RetentionPolicy(1000, 60.0, DROP, 3600.0)
    options = Options()
    options.parseOptions(["--queue=redis://127.0.0.1:6379/0"])
    assert _retention(options) is None
    with pytest.raises(UsageError):
        Options().parseOptions(["--retention-policy=keep"])
