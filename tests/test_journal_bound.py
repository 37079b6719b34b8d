"""
Tests for the journal's bound on its size (C{--max-journal-bytes}), its
durable identity, and its refusal to start on a segment it cannot read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from mixingest.journal import FsyncPolicy, Journal
from mixingest.journal.framing import HEADER, JournalFormatError
from mixingest.journal.service import AUTO_SHARE, JournalFull


def makeJournal(path: Path, **kwargs: object) -> Journal:
    return Journal(str(path), FsyncPolicy.never(), reactor=reactor, **kwargs)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_refusesPastItsBound(tmp_path: Path) -> None:
    """
    Past C{maxBytes} an append is refused before it is written, the journal
    is not ready and its status says why; what was acknowledged is kept.
    """
    journal = makeJournal(tmp_path, maxBytes=2000)
    journal.startService()
    acknowledged = []
    try:
        for n in range(100):
            item = b'{"n":%d,"pad":"%s"}' % (n, b"x" * 80)
            try:
                await journal.put("events", [item])
            except JournalFull as e:
                assert "--max-journal-bytes" in str(e)
                break
            acknowledged.append(item)
        else:
            pytest.fail("the journal never refused")
        assert not journal.ready()
        status = journal.status()
        assert status["full"] is True
        assert status["bytes"] >= status["maxBytes"] == 2000
        assert journal.bytes() < 2000 + 200
    finally:
        await journal.stopService()
    with makeJournal(tmp_path).reader("events") as reader:
        assert [item for _, item in reader] == acknowledged


@pytest_twisted.ensureDeferred
async def test_boundCountsWhatAnEarlierRunLeft(tmp_path: Path) -> None:
    """
    A restarted journal counts the segments already on disk against its
    bound, before any of its queues is written again.
    """
    first = makeJournal(tmp_path)
    first.startService()
    await first.put("events", [b'{"pad":"%s"}' % (b"x" * 3000)])
    await first.stopService()
    second = makeJournal(tmp_path, maxBytes=3000)
    second.startService()
    try:
        assert second.bytes() > 3000
        assert second.full() and not second.ready()
        with pytest.raises(JournalFull):
            await second.put("people", [b"{}"])
    finally:
        await second.stopService()


@pytest_twisted.ensureDeferred
async def test_automaticBound(tmp_path: Path) -> None:
    """
    Without a bound given, the journal may use a share of the space it had
    at start: its own segments plus the free space of its file system.
    """
    journal = makeJournal(tmp_path)
    journal.startService()
    try:
        stats = os.statvfs(tmp_path)
        free = stats.f_bavail * stats.f_frsize
        assert abs(journal.maxBytes - free * AUTO_SHARE) < 0.01 * free
        assert journal.ready()
    finally:
        await journal.stopService()


@pytest_twisted.ensureDeferred
async def test_durableIdentity(tmp_path: Path) -> None:
    """
    The journal's identity (what a deduplicating remote keys on) is created
    once, private, and the same after a restart.
    """
    journal = makeJournal(tmp_path)
    journal.startService()
    source = journal.source
    await journal.put("events", [b"{}"])
    await journal.stopService()
    assert len(source) == 16
    assert stat.S_IMODE(os.stat(tmp_path / "journal-id").st_mode) == 0o600
    again = makeJournal(tmp_path)
    again.startService()
    try:
        assert again.source == source
    finally:
        await again.stopService()


def test_unknownFormatStopsTheStart(tmp_path: Path) -> None:
    """
    A segment of an unknown format version stops the start with an error
    naming the file and the version, and leaves the directory unlocked.
    """
    queueDir = tmp_path / "events"
    queueDir.mkdir()
    bad = queueDir / f"{0:020d}.seg"
    bad.write_bytes(HEADER[:-1] + b"\x09" + b"\x00" * 40)
    journal = makeJournal(tmp_path)
    with pytest.raises(JournalFormatError, match="9") as caught:
        journal.startService()
    assert str(bad) in str(caught.value)
    bad.unlink()
    journal.startService()
    journal.stopService()
