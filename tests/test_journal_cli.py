"""
python -m mixingest.journal, run as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mixingest.journal.framing import HEADER_SIZE, RECORD_HEADER_SIZE, listSegments, segmentPath
from mixingest.journal.fsync import FsyncPolicy
from mixingest.journal.reader import JournalReader
from mixingest.journal.writer import SegmentWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "mixingest.journal", *args],
        capture_output=True,
        env=env,
        timeout=60,
        **kw,
    )


def item(n: int) -> bytes:
    return b'{"event":"e","properties":{"n":%d,"s":"\xc3\xa9"}}' % n


def makeJournal(dataDir, queue, count, segmentSize=1 << 20) -> None:
    writer = SegmentWriter(os.path.join(str(dataDir), queue), FsyncPolicy.never(), segmentSize)
    for n in range(count):
        writer.commit([item(n)], sync=False)
    writer.close()


def test_cat(tmp_path):
    """
    cat prints every item as it was stored, one per line, oldest first,
    across segments.
    """
    makeJournal(tmp_path, "events", 50, segmentSize=500)
    result = run("cat", str(tmp_path), "events")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"".join(item(n) + b"\n" for n in range(50))
    assert [json.loads(line)["properties"]["n"] for line in result.stdout.splitlines()] == list(
        range(50)
    )
    assert result.stderr == b""


def test_catClosedPipe(tmp_path):
    """
    A reader that stops early (| head) is not an error worth a traceback.
    """
    makeJournal(tmp_path, "events", 5000)
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixingest.journal", "cat", str(tmp_path), "events"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout.readline() == item(0) + b"\n"
    proc.stdout.close()
    assert proc.wait(60) == 0
    assert proc.stderr.read() == b""
    proc.stderr.close()


def test_catMissingQueue(tmp_path):
    result = run("cat", str(tmp_path), "nope")
    assert result.returncode == 1
    assert b"no queue 'nope'" in result.stderr


def test_stats(tmp_path):
    makeJournal(tmp_path, "events", 30, segmentSize=400)
    makeJournal(tmp_path, "people", 3)
    reader = JournalReader(os.path.join(str(tmp_path), "events"), "fwd")
    reader.commit(reader.read(maxItems=10)[-1][0])
    result = run("stats", "--json", str(tmp_path))
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["queues"]
    record = RECORD_HEADER_SIZE + len(item(10))
    events = stats["events"]
    segments = len(listSegments(os.path.join(str(tmp_path), "events")))
    assert (events["records"], events["segments"]) == (30, segments)
    assert segments > 3
    assert events["checkpoints"]["fwd"]["backlogRecords"] == 20
    assert events["checkpoints"]["fwd"]["backlogBytes"] == 20 * record
    sizes = sorted(
        os.path.getsize(e.path) for e in os.scandir(tmp_path / "events") if e.name.endswith(".seg")
    )
    assert events["bytes"] == sum(sizes)
    assert stats["people"]["records"] == 3 and stats["people"]["checkpoints"] == {}
    assert stats["people"]["bytes"] == HEADER_SIZE + 3 * (RECORD_HEADER_SIZE + len(item(0)))

    text = run("stats", str(tmp_path))
    assert text.returncode == 0
    lines = text.stdout.decode().splitlines()
    assert lines[0] == f"events: 30 records, {segments} segments, {sum(sizes)} bytes"
    assert lines[1].startswith(f"  checkpoint fwd at segment {reader.committed.segment} offset")
    assert lines[1].endswith(f"backlog 20 records, {20 * record} bytes")
    assert lines[2].startswith("people: 3 records, 1 segments")


def test_help():
    result = run("--help")
    assert result.returncode == 0
    assert b"cat" in result.stdout and b"stats" in result.stdout and b"verify" in result.stdout
    assert b"one JSON object per line" in run("cat", "--help").stdout
    assert run().returncode == 2


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x20]))


def recordOffset(n: int) -> int:
    """
    Where item n starts in a segment that began with item 0.
    """
    return HEADER_SIZE + sum(RECORD_HEADER_SIZE + len(item(k)) for k in range(n))


def test_catOverDamage(tmp_path):
    """
    cat reports a damaged record on stderr and prints everything else.
    """
    makeJournal(tmp_path, "events", 10)
    segment = segmentPath(os.path.join(str(tmp_path), "events"), 0)
    flip(segment, recordOffset(4) + 30)
    result = run("cat", str(tmp_path), "events")
    assert result.returncode == 0
    assert result.stdout == b"".join(item(n) + b"\n" for n in range(10) if n != 4)
    length = RECORD_HEADER_SIZE + len(item(4))
    assert f"{length} damaged bytes at offset {recordOffset(4)}".encode() in result.stderr
    assert segment.encode() in result.stderr


def test_verifyIntact(tmp_path):
    makeJournal(tmp_path, "events", 20, segmentSize=500)
    makeJournal(tmp_path, "people", 3)
    result = run("verify", str(tmp_path))
    assert result.returncode == 0, result.stdout
    segments = len(listSegments(os.path.join(str(tmp_path), "events"))) + 1
    assert result.stdout.decode().splitlines() == [
        f"OK: 2 queues, {segments} segments, 23 records: 0 damaged ranges (0 bytes), "
        "0 torn tails, 0 unknown formats"
    ]


def test_verifyDamage(tmp_path):
    """
    verify prints each damaged range and exits 1; a torn tail of the newest
    segment alone is reported but exits 0.
    """
    makeJournal(tmp_path, "events", 10)
    makeJournal(tmp_path, "people", 3)
    events = segmentPath(os.path.join(str(tmp_path), "events"), 0)
    with open(events, "ab") as f:
        f.write(b"\xffMX")
    result = run("verify", str(tmp_path))
    assert result.returncode == 0
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith(
        f"events/00000000000000000000.seg: torn tail: 3 bytes at offset {recordOffset(10)}"
    )
    assert lines[1].startswith("OK: ") and "1 torn tails" in lines[1]

    flip(events, recordOffset(2) + 5)
    flip(events, recordOffset(6) + 40)
    result = run("verify", str(tmp_path))
    assert result.returncode == 1
    lines = result.stdout.decode().splitlines()
    assert lines[:2] == [
        f"events/00000000000000000000.seg: damaged: {recordOffset(3) - recordOffset(2)} "
        f"bytes at offset {recordOffset(2)}",
        f"events/00000000000000000000.seg: damaged: {recordOffset(7) - recordOffset(6)} "
        f"bytes at offset {recordOffset(6)}",
    ]
    assert lines[-1].startswith("DAMAGED: 2 queues, 2 segments, 11 records: 2 damaged ranges")
    # One queue only: the other is not looked at.
    only = run("verify", str(tmp_path), "people")
    assert only.returncode == 0 and only.stdout.decode().startswith("OK: 1 queues")


def test_verifyUnknownFormat(tmp_path):
    makeJournal(tmp_path, "events", 3)
    queueDir = os.path.join(str(tmp_path), "events")
    with open(segmentPath(queueDir, 3), "wb") as f:
        f.write(b"MXJRNL\x00\x04" + b"later")
    result = run("verify", str(tmp_path))
    assert result.returncode == 1
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("events/00000000000000000003.seg: unknown format: ")
    assert "format version 4" in lines[0]
    assert lines[1].endswith("1 unknown formats")


@pytest.mark.parametrize(
    "args", [["verify"], ["verify", "/nonexistent/journal"], ["verify", ".", "no/such"]]
)
def test_verifyUsage(tmp_path, args):
    assert run(*args, cwd=str(tmp_path)).returncode == 2
