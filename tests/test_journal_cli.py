"""
python -m mixingest.journal, run as a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from mixingest.journal.framing import HEADER_SIZE, RECORD_HEADER_SIZE, listSegments, segmentPath
from mixingest.journal.fsync import FsyncPolicy
from mixingest.journal.reader import JournalReader
from mixingest.journal.writer import SegmentWriter
from tests.damage import flip

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


def consumeArgs(dataDir, *extra: str) -> list:
    return ["consume", str(dataDir), "events", "--group", "g", *extra]


def test_consumeCommits(tmp_path):
    """
    consume prints a group's items and commits them: run again, it prints
    only what came since; --max stops early and commits only what it
    printed.
    """
    makeJournal(tmp_path, "events", 30, segmentSize=500)
    result = run(*consumeArgs(tmp_path, "--max", "12", "--batch", "5"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"".join(item(n) + b"\n" for n in range(12))
    result = run(*consumeArgs(tmp_path))
    assert result.stdout == b"".join(item(n) + b"\n" for n in range(12, 30))
    assert run(*consumeArgs(tmp_path)).stdout == b""


def test_consumeEnvelope(tmp_path):
    makeJournal(tmp_path, "events", 3)
    lines = run(*consumeArgs(tmp_path, "--envelope")).stdout.splitlines()
    assert [json.loads(line) for line in lines] == [
        {"seq": n, "item": json.loads(item(n))} for n in range(3)
    ]


def test_consumeFromEnd(tmp_path):
    makeJournal(tmp_path, "events", 3)
    assert run(*consumeArgs(tmp_path, "--from", "end")).stdout == b""
    assert run(*consumeArgs(tmp_path, "--from", "start")).stdout == b""


def test_consumeOverDamage(tmp_path):
    """
    consume reports damage on stderr and carries on past it.
    """
    makeJournal(tmp_path, "events", 5)
    flip(segmentPath(str(tmp_path / "events"), 0), recordOffset(2) + RECORD_HEADER_SIZE + 3)
    result = run(*consumeArgs(tmp_path))
    assert result.returncode == 0
    assert result.stdout == b"".join(item(n) + b"\n" for n in (0, 1, 3, 4))
    assert b"skipped 1 damaged ranges" in result.stderr


def test_groupsAndReset(tmp_path):
    makeJournal(tmp_path, "events", 10)
    run(*consumeArgs(tmp_path, "--max", "4"))
    result = run("groups", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    g = json.loads(result.stdout)["queues"]["events"]["g"]
    assert (g["nextSeq"], g["lagItems"], g["lagSeconds"]) == (4, 6, g["lagSeconds"])
    assert b"events g: next seq 4, lag 6 items" in run("groups", str(tmp_path)).stdout
    result = run("reset", str(tmp_path), "events", "--group", "g", "--to", "8")
    assert result.returncode == 0, result.stderr
    assert run(*consumeArgs(tmp_path)).stdout == item(8) + b"\n" + item(9) + b"\n"
    run("reset", str(tmp_path), "events", "--group", "g", "--to", "start")
    assert len(run(*consumeArgs(tmp_path)).stdout.splitlines()) == 10


@pytest.mark.parametrize(
    "args",
    [
        ["consume", ".", "events"],
        ["consume", ".", "events", "--group", "forwarder"],
        ["reset", ".", "events", "--group", "g", "--to", "later"],
    ],
)
def test_consumerUsage(tmp_path, args):
    assert run(*args, cwd=str(tmp_path)).returncode != 0


def startConsume(dataDir, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        [sys.executable, "-m", "mixingest.journal", *consumeArgs(dataDir, *extra)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def readUntil(proc: subprocess.Popen, lines: list, done, timeout: float = 60) -> None:
    """
    Read C{proc}'s lines into C{lines} until C{done(lines)}.
    """
    deadline = time.monotonic() + timeout
    while not done(lines):
        assert time.monotonic() < deadline, f"gave up after {len(lines)} lines"
        line = proc.stdout.readline()
        assert line, "consume exited"
        lines.append(json.loads(line))


def allOf(seqs):
    wanted = set(seqs)
    return lambda lines: wanted <= {line["seq"] for line in lines}


def checkKilled(lines: list, batch: int) -> int:
    """
    The sequence numbers run in order; after the kill, the consumer goes
    back at most one batch (what it had written but not committed).

    @return: how many lines were duplicates.
    """
    seqs = [line["seq"] for line in lines]
    backs = [i for i in range(1, len(seqs)) if seqs[i] <= seqs[i - 1]]
    assert len(backs) <= 1
    for i in backs:
        assert seqs[i - 1] - seqs[i] < batch
        assert seqs[i:] == sorted(seqs[i:])
    assert seqs[: backs[0] if backs else None] == sorted(seqs[: backs[0] if backs else None])
    return len(seqs) - len(set(seqs))


def test_oneConsumerPerGroup(tmp_path):
    """
    While consume --follow runs, a second consume of its group and a reset
    of its cursor fail with a clear error; another group reads.  Killed
    with SIGKILL, the follower holds nothing: the group is free at once.
    """
    makeJournal(tmp_path, "events", 5)
    lines: list = []
    proc = startConsume(tmp_path, "--follow", "--batch", "2")
    try:
        readUntil(proc, lines, lambda lines: len(lines) >= 5)
        second = run(*consumeArgs(tmp_path))
        assert second.returncode == 1 and second.stdout == b""
        assert b"consumer group 'g'" in second.stderr and b"in use" in second.stderr
        reset = run("reset", str(tmp_path), "events", "--group", "g", "--to", "start")
        assert reset.returncode == 1 and b"in use" in reset.stderr
        other = run("consume", str(tmp_path), "events", "--group", "other")
        assert len(other.stdout.splitlines()) == 5
    finally:
        proc.kill()
        proc.stdout.close()
        proc.wait(10)
    after = run(*consumeArgs(tmp_path))
    assert after.returncode == 0, after.stderr
    # The follower's last batch ([4]) again, if the kill cut its commit.
    assert after.stdout in (b"", item(4) + b"\n")


def test_consumeFollowKilled(tmp_path):
    """
    consume --follow, killed with SIGKILL while writing and restarted:
    with its output read to the end before the restart, every item comes
    out, in order, repeated at most within the one batch that was written
    but not committed.  A control kill before any commit shows that the
    check sees duplicates.
    """
    makeJournal(tmp_path, "events", 3000, segmentSize=20_000)
    lines: list = []
    proc = startConsume(tmp_path, "--follow", "--envelope", "--batch", "100")
    readUntil(proc, lines, lambda lines: len(lines) >= 1234)
    proc.kill()
    lines.extend(json.loads(line) for line in proc.stdout.read().splitlines())
    proc.stdout.close()
    proc.wait(10)
    proc = startConsume(tmp_path, "--follow", "--envelope", "--batch", "100")
    try:
        readUntil(proc, lines, allOf(range(3000)))
    finally:
        proc.kill()
        proc.stdout.close()
        proc.wait(10)
    assert {line["seq"] for line in lines} == set(range(3000))
    assert checkKilled(lines, 100) <= 100
    with pytest.raises(AssertionError):
        checkKilled([{"seq": 5}, {"seq": 6}, {"seq": 1}], 3)
