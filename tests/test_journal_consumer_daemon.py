"""
Consumer groups beside a live daemon: two groups at different speeds while
events arrive, one killed with SIGKILL and restarted, and the daemon itself
killed and restarted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

from mixingest.journal import Consumer
from tests.daemon import ROOT, Daemon, Flood, tally

BATCH = 50


def startCLI(dataDir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = ["consume", str(dataDir), "events", "--group", "cli", "--follow", "--envelope"]
    return subprocess.Popen(
        [sys.executable, "-m", "mixingest.journal", *command, "--batch", str(BATCH)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )


class SlowGroup:
    """
    A second group through the Python API, in a thread: small batches, each
    committed after a pause, so that it lags the CLI.
    """

    def __init__(self, dataDir: Path) -> None:
        self.dataDir = dataDir
        self.seen: List[tuple] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with Consumer(str(self.dataDir), "events", "slow") as consumer:
            while not self._stop.is_set():
                records = consumer.poll(10)
                self.seen.extend((r.seq, json.loads(r.payload)["properties"]["n"]) for r in records)
                consumer.commit()
                time.sleep(0.005 if records else 0.05)

    def start(self) -> SlowGroup:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def read(proc: subprocess.Popen, lines: List[Dict], done, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"gave up after {len(lines)} lines"
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, "consume exited"
        lines.append(json.loads(line))


def kill(proc: subprocess.Popen, lines: List[Dict]) -> None:
    """
    SIGKILL the CLI, then take what it had written into the pipe: the
    reader of a pipe owns what was flushed to it.
    """
    proc.kill()
    rest = proc.stdout.read()  # type: ignore[union-attr]
    lines.extend(json.loads(line) for line in rest.splitlines())
    proc.stdout.close()  # type: ignore[union-attr]
    proc.wait(10)


def checkOrder(seqs: List[int], window: int) -> int:
    """
    Sequence numbers ascend except for one step back of less than
    C{window} per restart of the consumer.

    @return: the duplicates.
    """
    for i in range(1, len(seqs)):
        if seqs[i] <= seqs[i - 1]:
            assert seqs[i - 1] - seqs[i] < window, (i, seqs[i - 1], seqs[i])
    return len(seqs) - len(set(seqs))


def test_groupsBesideALiveDaemon(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, "--segment-size=65536", "--fsync=interval:50").start()
    slow = SlowGroup(daemon.dataDir)
    cli = startCLI(daemon.dataDir)
    lines: List[Dict] = []
    flood = Flood(daemon, clients=2, perClient=3000, batch=10)
    try:
        slow.start()
        flood.start()
        flood.waitFor(1500)
        read(cli, lines, lambda: len(lines) >= 700)
        kill(cli, lines)
        killedAt = len(lines)
        cli = startCLI(daemon.dataDir)
        flood.waitFor(3000)
        flood.stop()
        daemon.kill()
        daemon.start()
        second = Flood(daemon, clients=2, perClient=1000, batch=10, start=500_000).start()
        second.waitFor(2000)
        second.stop()
        acknowledged = flood.acknowledged + second.acknowledged

        def numbers() -> set:
            return {line["item"]["properties"]["n"] for line in lines}

        read(cli, lines, lambda: set(acknowledged) <= numbers())
        deadline = time.monotonic() + 90
        while not set(acknowledged) <= {n for _, n in slow.seen}:
            assert time.monotonic() < deadline, "the slow group fell behind for good"
            time.sleep(0.1)
        # The retention pass at the restart found both groups.
        assert set(daemon.stats()["backend"]["groups"]["events"]) == {"cli", "slow"}
        _, _, metrics = daemon.admin("/metrics")
        assert b'mixingest_journal_group_lag_items{group="slow",queue="events"}' in metrics
    finally:
        slow.stop()
        kill(cli, lines)
        flood.stop()
        daemon.terminate()
    cliNumbers = [line["item"]["properties"]["n"] for line in lines]
    slowNumbers = [n for _, n in slow.seen]
    for stored in (cliNumbers, slowNumbers):
        figures = tally(acknowledged, stored)
        assert figures["lost"] == 0 and figures["reordered"] == 0, figures
    cliDuplicates = checkOrder([line["seq"] for line in lines], 2 * BATCH)
    assert cliDuplicates <= BATCH
    assert checkOrder([seq for seq, _ in slow.seen], 1) == 0
    print(
        f"\nkill-and-restart: {len(acknowledged)} acknowledged; CLI group killed after "
        f"{killedAt} lines: {len(lines)} lines, {cliDuplicates} duplicates; slow group "
        f"{len(slow.seen)} items, 0 duplicates; daemon SIGKILLed and restarted"
    )
