"""
A byte flipped in a journal that store-and-forward has yet to forward (bit
rot, a bad sector, a stray write): the forwarder skips exactly the damaged
record and delivers every other one to the remote once and in order, with
the damage logged and counted.  The damage is in a sealed segment, or in the
newest one, which the writer recovers and appends to behind the damage.

The journal is written first, as by an earlier run whose remote was down,
and damaged while no daemon runs; then a forwarder drains it into a
recording remote (plain puts, as to Kestrel) or a real C{redis-server}
(puts numbered by journal sequence number, which skip the damaged one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Tuple

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import LogEvent, LogLevel, globalLogPublisher

from mixingest.journal import Journal
from mixingest.journal.framing import RECORD_HEADER_SIZE, listSegments, segmentPath
from mixingest.journal.reader import JournalReader
from mixingest.queues.base import EventQueue
from mixingest.queues.redis import RedisQueue
from tests.damage import flip
from tests.servers import RedisServer, redisServer, waitUntil  # noqa: F401 - the fixture
from tests.test_forwarding import FakeRemote, drained, items, makeForwarding, makeJournal, started

SEGMENT_SIZE = 1024
"""Small segments: the 30 events below take three of them, 10 each."""
EVENTS = 30
AFTER = 5
"""Events put after the restart: the recovered writer appends them after the damage."""


def event(n: int) -> bytes:
    return items(b"n", 1, n, pad=60)[0]


@pytest.fixture
def logged() -> Any:
    events: List[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


class Remote:
    """
    The remote to forward to: the recording double or a real
    C{redis-server}, which the test takes down and brings back.
    """

    def __init__(self, kind: str, request: pytest.FixtureRequest) -> None:
        self.double: FakeRemote | None = None
        self.server: RedisServer | None = None
        if kind == "recording":
            self.double = FakeRemote()
        else:
            self.server = request.getfixturevalue("redisServer")

    def client(self) -> EventQueue:
        """
        A client for a forwarder to own (and stop).
        """
        if self.double is not None:
            return self.double
        assert self.server is not None
        return RedisQueue(
            HostnameEndpoint(reactor, self.server.host, self.server.port, timeout=1),
            reactor,
            address="test",
            writeTimeout=0.5,
            reconnectInitialDelay=0.05,
            reconnectMaxDelay=0.2,
        )

    def up(self, up: bool) -> None:
        if self.double is not None:
            self.double.failing = not up
        elif up:
            assert self.server is not None
            self.server.start()
        else:
            assert self.server is not None
            self.server.stop()

    def stored(self) -> List[bytes]:
        """
        What the remote holds in C{events}, oldest first.
        """
        if self.double is not None:
            return self.double.items.get("events", [])
        assert self.server is not None
        return self.server.items("events")


async def spool(tmp_path: Path) -> Path:
    """
    Journal L{EVENTS} events, one append each, as a store-and-forward
    daemon does while its remote is down.

    @return: the queue's directory.
    """
    journal = makeJournal(tmp_path, segmentSize=SEGMENT_SIZE)
    journal.startService()
    for n in range(EVENTS):
        await journal.put("events", [event(n)])
    await journal.stopService()
    return tmp_path / "journal" / "events"


def damage(queueDir: Path, victim: bytes) -> Tuple[str, int]:
    """
    Flip a byte in the middle of the payload of the record holding
    C{victim}.

    @return: the segment's path and the offset of the record.
    """
    for base in listSegments(str(queueDir)):
        path = segmentPath(str(queueDir), base)
        payload = Path(path).read_bytes().find(victim)
        if payload >= 0:
            flip(path, payload + len(victim) // 2)
            return path, payload - RECORD_HEADER_SIZE
    raise AssertionError(f"{victim!r} is in no segment")


def recordingReaders(journal: Journal) -> List[JournalReader]:
    """
    Keep every reader that the forwarder opens on C{journal}, to read its
    damage counters.
    """
    opened: List[JournalReader] = []
    realReader = journal.reader

    def reader(queue: str, checkpointName: str | None = None) -> JournalReader:
        opened.append(realReader(queue, checkpointName))
        return opened[-1]

    journal.reader = reader  # type: ignore[method-assign]
    return opened


def skippedDamage(logged: List[LogEvent]) -> List[LogEvent]:
    """
    The errors that readers log for each damaged range they skip.
    """
    return [
        e
        for e in logged
        if e["log_level"] == LogLevel.error
        and "damaged bytes at offset {offset}, skipped" in e.get("log_format", "")
    ]


@pytest.mark.parametrize("kind", ["recording", "redis"])
@pytest.mark.parametrize("segment", ["sealed", "newest"])
@pytest_twisted.ensureDeferred
async def test_forwardPastDamage(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    logged: List[LogEvent],
    kind: str,
    segment: str,
) -> None:
    """
    Every intact record reaches the remote exactly once and in order, the
    damaged one does not, and the reader logs and counts exactly that
    record's bytes; a restarted forwarder sends nothing again.
    """
    queueDir = await spool(tmp_path)
    bases = listSegments(str(queueDir))
    assert len(bases) >= 3, bases
    # Mid-segment, with intact records on both sides in the same segment.
    inNewest = list(range(bases[-1], EVENTS))
    assert len(inNewest) >= 3, bases
    lost = bases[1] + 2 if segment == "sealed" else inNewest[len(inNewest) // 2]
    assert lost + 1 < (bases[2] if segment == "sealed" else EVENTS)
    path, offset = damage(queueDir, event(lost))
    assert path == segmentPath(str(queueDir), bases[1 if segment == "sealed" else -1])

    remote = Remote(kind, request)
    remote.up(False)
    journal = makeJournal(tmp_path, segmentSize=SEGMENT_SIZE)
    readers = recordingReaders(journal)
    queue = await started(makeForwarding(remote.client(), journal, batchItems=7))
    try:
        # Journaled while the remote is down: the writer recovers the
        # newest segment, damage and all, and appends after it.
        for n in range(EVENTS, EVENTS + AFTER):
            await queue.put("events", [event(n)])
        assert queue.status()["backlog"] == {"events": EVENTS - 1 + AFTER}
        remote.up(True)
        await waitUntil(lambda: drained(queue), what="the journal to be forwarded")
    finally:
        await queue.stopService()
    expected = [event(n) for n in range(EVENTS + AFTER) if n != lost]
    assert remote.stored() == expected
    # The fault was seen: that record's bytes, in one range, logged once.
    assert sum(r.damagedRanges for r in readers) == 1
    assert sum(r.damaged for r in readers) == RECORD_HEADER_SIZE + len(event(lost))
    [error] = skippedDamage(logged)
    assert (error["path"], error["offset"]) == (path, offset)

    restarted = await started(makeForwarding(remote.client(), makeJournal(tmp_path)))
    try:
        await waitUntil(lambda: drained(restarted), what="the restarted forwarder")
    finally:
        await restarted.stopService()
    assert remote.stored() == expected
