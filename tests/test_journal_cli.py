"""
python -m mixingest.journal, run as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from mixingest.journal.framing import HEADER_SIZE
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
    record = 8 + len(item(10))
    events = stats["events"]
    assert (events["records"], events["segments"]) == (30, 5)
    assert events["checkpoints"]["fwd"]["backlogRecords"] == 20
    assert events["checkpoints"]["fwd"]["backlogBytes"] == 20 * record
    sizes = sorted(
        os.path.getsize(e.path) for e in os.scandir(tmp_path / "events") if e.name.endswith(".seg")
    )
    assert events["bytes"] == sum(sizes)
    assert stats["people"]["records"] == 3 and stats["people"]["checkpoints"] == {}
    assert stats["people"]["bytes"] == HEADER_SIZE + 3 * (8 + len(item(0)))

    text = run("stats", str(tmp_path))
    assert text.returncode == 0
    lines = text.stdout.decode().splitlines()
    assert lines[0] == f"events: 30 records, 5 segments, {sum(sizes)} bytes"
    assert lines[1].startswith("  checkpoint fwd at segment 7 offset")
    assert lines[1].endswith(f"backlog 20 records, {20 * record} bytes")
    assert lines[2].startswith("people: 3 records, 1 segments")


def test_help():
    result = run("--help")
    assert result.returncode == 0
    assert b"cat" in result.stdout and b"stats" in result.stdout
    assert b"one JSON object per line" in run("cat", "--help").stdout
    assert run().returncode == 2
