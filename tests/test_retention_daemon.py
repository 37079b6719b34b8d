"""
Retention end to end: the real daemon, journal-only, with a registered
consumer group that does not read and a small C{--retention-bytes}.  Under
C{refuse} the HTTP answers, C{/readyz}, C{/stats} and C{/metrics} show the
refusal, a restart of the daemon keeps it, and a commit through the CLI
frees the segments and lifts it; under C{drop} the oldest segments go,
counted and logged at error, while events keep being accepted.

The daemon's retention pass runs every 10 seconds: each test waits for a
pass or two, so each takes tens of seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from mixingest.journal import Consumer
from mixingest.journal.framing import listSegments, segmentPath
from tests.daemon import ROOT, Daemon, encoded

SEGMENT = 4096
LIMIT = 40_000
BATCH = 10
PASS_TIMEOUT = 40.0
"""
Seconds to wait for something a retention pass does: passes are 10 s
apart, and the machine may be loaded.
"""


def track(daemon: Daemon, first: int) -> Tuple[int, Dict[str, str]]:
    """
    Send events C{first} to C{first + BATCH - 1} in one request.

    @return: the answer's status and headers.
    """
    events = [
        {"event": "e", "properties": {"token": "tok", "n": n}} for n in range(first, first + BATCH)
    ]
    status, headers, body = daemon.request(
        "/track",
        f"data={encoded(events)}".encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert (status == 200) == (body == b"1"), (status, body)
    return status, headers


def waitFor(what: str, done: Callable[[], Any], timeout: float = PASS_TIMEOUT) -> Any:
    """
    Poll C{done} until it returns something true, and return that.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = done()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.1)


def retention(daemon: Daemon) -> Dict[str, Any]:
    status: Dict[str, Any] = daemon.stats()["backend"]["retention"]
    return status


def metric(daemon: Daemon, sample: str) -> float:
    """
    The value of one sample (name and labels, as exposed) in C{/metrics}.
    """
    status, _, body = daemon.admin("/metrics")
    assert status == 200
    found = re.search(rb"^" + re.escape(sample.encode()) + rb" (\S+)$", body, re.MULTILINE)
    assert found is not None, sample
    return float(found.group(1))


def register(daemon: Daemon, group: str) -> None:
    """
    Register C{group} before any event: opened, never polled.
    """
    Consumer(str(daemon.dataDir), "events", group).close()


def consumeCLI(dataDir: Path, group: str, count: int) -> List[int]:
    """
    Read and commit C{count} items as C{group} through
    C{python -m mixingest.journal consume}; return their event numbers.
    """
    command = ["consume", str(dataDir), "events", "--group", group, "--max", str(count)]
    out = subprocess.run(
        [sys.executable, "-m", "mixingest.journal", *command],
        check=True,
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    ).stdout
    return [json.loads(line)["properties"]["n"] for line in out.splitlines()]


def segmentSizes(queueDir: str) -> Dict[int, int]:
    sizes = {}
    for base in listSegments(queueDir):
        try:
            sizes[base] = os.stat(segmentPath(queueDir, base)).st_size
        except FileNotFoundError:  # deleted by a pass since the listing
            continue
    return sizes


def test_refuseThenRecover(tmp_path: Path) -> None:
    """
    Under the default policy, a queue kept past C{--retention-bytes} for
    an idle group answers new events 503 with C{Retry-After}, and says why
    in C{/stats} and C{/metrics}; the refused events are not stored, the
    accepted ones all are.  A restart keeps the refusal.  Once the group
    commits past the old segments (through the CLI), the next pass deletes
    them and the queue accepts events again.
    """
    daemon = Daemon(tmp_path, f"--segment-size={SEGMENT}", f"--retention-bytes={LIMIT}").start()
    queueDir = str(daemon.dataDir / "events")
    try:
        register(daemon, "idle")
        acknowledged: List[int] = []
        deadline = time.monotonic() + PASS_TIMEOUT
        while True:
            assert time.monotonic() < deadline, f"{len(acknowledged)} events, never refused"
            status, headers = track(daemon, len(acknowledged))
            if status != 200:
                break
            acknowledged.extend(range(len(acknowledged), len(acknowledged) + BATCH))
            time.sleep(0.1)
        refused = len(acknowledged)
        assert (status, headers.get("retry-after")) == (503, "5")
        # The bound was really passed, by what the idle group has not read.
        held = sum(segmentSizes(queueDir).values())
        assert held > LIMIT
        reason = retention(daemon)["refusing"]["events"]
        assert reason.endswith(f"over --retention-bytes {LIMIT}"), reason
        assert daemon.admin("/readyz")[0] == 503
        assert metric(daemon, "mixingest_journal_retention_refusing") == 1
        lag = 'mixingest_journal_group_lag_items{group="idle",queue="events"}'
        waitFor("idle's lag measured", lambda: metric(daemon, lag) == len(acknowledged))

        daemon.terminate()
        daemon.start()
        # The pass at start finds the queue over its bound again.
        waitFor("refusing after the restart", lambda: retention(daemon)["refusing"])
        assert track(daemon, refused)[0] == 503
        assert [item["properties"]["n"] for item in daemon.items()] == acknowledged

        before = listSegments(queueDir)
        assert len(before) > LIMIT // SEGMENT
        assert consumeCLI(daemon.dataDir, "idle", len(acknowledged)) == acknowledged
        waitFor("accepting again", lambda: not retention(daemon)["refusing"])
        after = listSegments(queueDir)
        # Freed: every segment but the one holding the cursor (and the
        # newest, if the cursor is at the end of the one before).
        assert after in (before[-1:], before[-2:]), (before, after)
        assert daemon.admin("/readyz")[0] == 200
        assert metric(daemon, "mixingest_journal_retention_refusing") == 0
        assert track(daemon, refused)[0] == 200
    finally:
        daemon.terminate()
    print(
        f"\nrefuse: {refused} events accepted, then 503 at {held} bytes (limit {LIMIT}); "
        f"after the CLI commit, {len(before) - len(after)} of {len(before)} segments freed"
    )


def test_dropOldest(tmp_path: Path) -> None:
    """
    Under C{--retention-policy drop}, the oldest segments an idle group has
    not read are deleted: the events in them are lost (exactly the oldest,
    a whole number of segments), each drop is counted in C{/stats} and
    C{/metrics} and logged at error, and every event is still accepted.
    """
    daemon = Daemon(
        tmp_path,
        f"--segment-size={SEGMENT}",
        f"--retention-bytes={LIMIT}",
        "--retention-policy=drop",
    ).start()
    queueDir = str(daemon.dataDir / "events")
    try:
        register(daemon, "idle")
        acknowledged: List[int] = []
        sizes: Dict[int, int] = {}

        def send() -> None:
            assert track(daemon, len(acknowledged))[0] == 200
            acknowledged.extend(range(len(acknowledged), len(acknowledged) + BATCH))
            # After each append: a segment's last size is recorded before
            # any pass can drop it (the newest segment never is).
            sizes.update(segmentSizes(queueDir))

        deadline = time.monotonic() + PASS_TIMEOUT
        while not retention(daemon)["droppedSegments"]:
            assert time.monotonic() < deadline, f"{len(acknowledged)} events, nothing dropped"
            send()
            time.sleep(0.1)
        for _ in range(5):
            send()
        assert daemon.admin("/readyz")[0] == 200

        def settled() -> Tuple[Dict[str, Any], List[int]]:
            """
            The counters and the segments left, read with no pass between.
            """
            first = retention(daemon)
            left = listSegments(queueDir)
            time.sleep(0.5)
            return (first, left) if retention(daemon) == first else ({}, [])

        counted, left = waitFor("a settled retention state", settled)
        dropped = sorted(set(sizes) - set(left))
        assert dropped and dropped == sorted(sizes)[: len(dropped)]
        droppedBytes = sum(sizes[base] for base in dropped)
        assert counted["refusing"] == {}
        assert (counted["droppedSegments"], counted["droppedBytes"]) == (len(dropped), droppedBytes)
        assert metric(daemon, "mixingest_journal_retention_dropped_segments_total") == len(dropped)
        assert metric(daemon, "mixingest_journal_retention_dropped_bytes_total") == droppedBytes
        # Lost: exactly the oldest events, up to the first segment left.
        stored = [item["properties"]["n"] for item in daemon.items()]
        lost = acknowledged.index(stored[0])
        assert lost > 0 and stored == acknowledged[lost:]
        # The idle group carries on at the oldest segment left.
        assert consumeCLI(daemon.dataDir, "idle", len(stored)) == stored
        logged = [
            re.search(r"#error\] .* dropped (\d+) segments \((\d+) bytes\)", line)
            for line in daemon.log().splitlines()
            if "(--retention-policy drop)" in line
        ]
        assert logged and all(logged), daemon.log()[-3000:]
        assert sum(int(found.group(1)) for found in logged if found) == len(dropped)
        assert sum(int(found.group(2)) for found in logged if found) == droppedBytes
    finally:
        daemon.terminate()
    print(
        f"\ndrop: {len(acknowledged)} events accepted, none refused; {len(dropped)} segments "
        f"({droppedBytes} bytes) dropped, the oldest {lost} events lost; "
        f"{len(logged)} error lines"
    )
