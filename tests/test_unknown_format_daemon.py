"""
The real daemon (C{twistd mixingest}) on a journal holding a segment of an
unknown format version, as a newer release would leave it: it must refuse
to start, before it serves anything, with an error naming the file and the version,
rather than skip the segment and every event in it.  The control is the
same file with its version byte put back: the daemon starts, serves, and
keeps the events that the segment holds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

import pytest

from mixingest.journal import FsyncPolicy
from mixingest.journal.framing import HEADER_SIZE, segmentPath
from mixingest.journal.writer import SegmentWriter
from tests.daemon import Daemon, encoded, freePort, journaledNumbers

UNKNOWN_VERSION = 9
SPOOLED = 3
"""Events in the segment that an earlier run left."""


def spool(dataDir: Path) -> Path:
    """
    Leave a format 2 segment of L{SPOOLED} events in queue C{events} of
    C{dataDir}, as an earlier run of the daemon would.

    @return: the segment's path.
    """
    queueDir = dataDir / "events"
    dataDir.mkdir()
    writer = SegmentWriter(str(queueDir), FsyncPolicy.never(), 1 << 20)
    events = [{"event": "e", "properties": {"token": "tok", "n": n}} for n in range(SPOOLED)]
    writer.commit([json.dumps(e).encode() for e in events], sync=False)
    writer.close()
    return Path(segmentPath(str(queueDir), 0))


def setVersion(segment: Path, version: int) -> None:
    """
    Write C{version} into the format version byte of C{segment}'s header.
    """
    with open(segment, "r+b") as f:
        f.seek(HEADER_SIZE - 1)
        f.write(bytes([version]))


def daemon(tmp_path: Path, name: str, args: Tuple[str, ...]) -> Daemon:
    run = tmp_path / name
    run.mkdir()
    return Daemon(run, *args, dataDir=tmp_path / "data")


@pytest.mark.parametrize("mode", ["journal", "forwarding", "workers"])
def test_unknownFormatStopsTheDaemon(tmp_path: Path, mode: str) -> None:
    """
    In journal-only mode, in store-and-forward mode (whose remote is never
    reached) and under C{--workers} (the segment in a worker's journal),
    the daemon exits with status 1 before it listens, saying in one line
    (no traceback) which segment and which version; the segment is left as
    it was.  With the version byte put back it starts, answers C{1}, and
    the spooled events are still there.
    """
    dataDir = tmp_path / "data"
    journal = dataDir
    args: Tuple[str, ...] = ()
    if mode == "forwarding":
        args = (f"--queue=redis://127.0.0.1:{freePort()}/0",)
    elif mode == "workers":
        args = ("--workers=2",)
        dataDir.mkdir()
        journal = dataDir / "worker-1"
    segment = spool(journal)

    setVersion(segment, UNKNOWN_VERSION)
    before = segment.read_bytes()
    refused = daemon(tmp_path, "refused", args)
    try:
        with pytest.raises(RuntimeError, match=r"daemon exited with 1 before listening"):
            refused.start()
    finally:
        if refused.process is not None and refused.process.poll() is None:
            refused.kill()
    output = refused.log()
    assert f"mixingest: not starting: {segment}" in output, output
    assert f"journal format version {UNKNOWN_VERSION}" in output, output
    assert "Traceback" not in output, output
    assert segment.read_bytes() == before, "the refused start changed the segment"

    setVersion(segment, 2)
    control = daemon(tmp_path, "control", args).start()
    try:
        event = {"event": "e", "properties": {"token": "tok", "n": SPOOLED}}
        status, _, body = control.request(f"/track?data={encoded(event)}")
        assert (status, body) == (200, b"1")
    finally:
        control.terminate()
    assert journaledNumbers(journal)[:SPOOLED] == list(range(SPOOLED))
    stored = journaledNumbers(journal)
    if mode == "workers":
        stored += journaledNumbers(dataDir / "worker-0")
    assert sorted(stored) == list(range(SPOOLED + 1))
