"""
The README's SQLite consumer recipe, run as written beside a real daemon
being fed events: the loader is killed and restarted once, the daemon is
SIGKILLed and restarted once, and every event the daemon stored lands in
SQLite exactly once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

from mixingest.journal import Consumer
from tests.daemon import ROOT, Daemon, Flood, journaledNumbers, tally
from tests.test_journal_consumer_recipe import recipe

TIMEOUT = 90.0


def loaded(db: Path) -> List[Tuple[int, int]]:
    """
    The rows loaded so far: C{(seq, event number)}, in C{seq} order.
    """
    try:
        with sqlite3.connect(db) as connection:
            return [
                (seq, json.loads(properties)["n"])
                for seq, properties in connection.execute(
                    "SELECT seq, properties FROM events ORDER BY seq"
                )
            ]
    except sqlite3.OperationalError:  # not created yet, or locked mid-transaction
        return []


def startLoader(directory: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "loader.py"], cwd=directory, env=env)


def waitFor(what: str, done: Callable[[], bool], loader: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not done():
        assert loader.poll() is None, "the loader exited"
        assert time.monotonic() < deadline, f"{what}: not within {TIMEOUT}s"
        time.sleep(0.2)


def test_recipeBesideTheDaemon(tmp_path: Path) -> None:
    """
    The loader reads the journal the daemon is appending to, in the
    layout README gives (C{mixingest-data} and C{events.db} in its
    directory).  Killing it mid-flood and killing the daemon mid-flood
    must neither lose nor repeat an event.
    """
    (tmp_path / "loader.py").write_text(recipe())
    db = tmp_path / "events.db"
    daemon = Daemon(tmp_path, "--segment-size=65536", dataDir=tmp_path / "mixingest-data")
    daemon.start()
    # A group that never reads keeps every segment, for the comparison at
    # the end: retention would delete those the loader has passed.
    Consumer(str(daemon.dataDir), "events", "audit").close()
    loader = startLoader(tmp_path)
    flood = Flood(daemon, clients=2, perClient=20_000, batch=10).start()
    second = None
    try:
        waitFor("rows during the flood", lambda: len(loaded(db)) >= 500, loader)
        loader.kill()
        loader.wait(10)
        killedAt = len(loaded(db))
        loader = startLoader(tmp_path)
        waitFor("the restarted loader", lambda: len(loaded(db)) >= killedAt + 500, loader)
        firstPid = daemon.process.pid  # type: ignore[union-attr]
        daemon.kill()
        flood.stop()
        beforeRestart = len(loaded(db))
        daemon.start()
        assert daemon.process.pid != firstPid  # type: ignore[union-attr]
        second = Flood(daemon, clients=2, perClient=1000, batch=10, start=500_000).start()
        second.waitFor(2000)
        second.stop()
        acknowledged = flood.acknowledged + second.acknowledged
        waitFor(
            "every acknowledged event loaded",
            lambda: set(acknowledged) <= {n for _, n in loaded(db)},
            loader,
        )
        journal = journaledNumbers(daemon.dataDir)
        waitFor("every stored event loaded", lambda: len(loaded(db)) >= len(journal), loader)
        assert loader.poll() is None, "the loader exited"
    finally:
        loader.kill()
        loader.wait(10)
        flood.stop()
        if second is not None:
            second.stop()
        daemon.terminate()
    rows = loaded(db)
    numbers = [n for _, n in rows]
    # Every item of the journal, once, in its order: none lost, none twice.
    assert numbers == journal
    figures = tally(acknowledged, numbers)
    assert (figures["lost"], figures["duplicated"], figures["reordered"]) == (0, 0, 0), figures
    # Both faults happened mid-load: some rows were loaded before each
    # kill, and events stored after the daemon's restart were loaded too.
    assert 0 < killedAt < beforeRestart < len(rows)
    assert set(second.acknowledged) <= set(numbers)
    print(
        f"\nrecipe beside the daemon: {len(acknowledged)} acknowledged, {len(journal)} stored, "
        f"{len(rows)} rows; loader SIGKILLed at {killedAt} rows, daemon SIGKILLed at "
        f"{beforeRestart} rows and restarted; {figures}"
    )
