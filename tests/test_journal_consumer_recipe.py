"""
The README's SQLite consumer recipe, run as written: killed with SIGKILL
while loading and restarted, it loads every item exactly once.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from mixingest.journal import Position, resetGroup
from mixingest.journal.fsync import FsyncPolicy
from mixingest.journal.reader import loadCheckpoint
from mixingest.journal.writer import SegmentWriter

ROOT = Path(__file__).resolve().parent.parent
COUNT = 20_000


def recipe() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### A consumer recipe: events into SQLite") :]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None
    return found.group(1)


def rows(db: Path) -> list:
    try:
        with sqlite3.connect(db) as connection:
            return [seq for (seq,) in connection.execute("SELECT seq FROM events ORDER BY seq")]
    except sqlite3.OperationalError:  # not created yet, or locked mid-transaction
        return []


def waitFor(db: Path, count: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while len(rows(db)) < count:
        assert proc.poll() is None, "the loader exited"
        assert time.monotonic() < deadline, f"{len(rows(db))} of {count} rows"
        time.sleep(0.01)


def test_recipeSurvivesSIGKILL(tmp_path: Path) -> None:
    (tmp_path / "mixingest-data").mkdir()
    writer = SegmentWriter(
        str(tmp_path / "mixingest-data" / "events"), FsyncPolicy.never(), 1 << 16
    )
    for first in range(0, COUNT, 100):
        items = [
            b'{"event":"e","properties":{"distinct_id":"u%d","time":%d,"n":%d}}' % (n, n, n)
            for n in range(first, first + 100)
        ]
        writer.commit(items, sync=False)
    writer.close()
    (tmp_path / "loader.py").write_text(recipe())
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    db = tmp_path / "events.db"
    kills = 0
    for until in (3000, 9000, COUNT):
        proc = subprocess.Popen([sys.executable, "loader.py"], cwd=tmp_path, env=env)
        try:
            waitFor(db, until, proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            kills += 1
    assert rows(db) == list(range(COUNT))
    assert kills == 3
    # The worst window, for every item: loaded, but the cursor never moved.
    resetGroup(str(tmp_path / "mixingest-data"), "events", "sqlite", "start")
    proc = subprocess.Popen([sys.executable, "loader.py"], cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 60
        queueDir = str(tmp_path / "mixingest-data" / "events")
        while (loadCheckpoint(queueDir, "sqlite") or Position(0, 0, 0)).seq < COUNT:
            assert proc.poll() is None, "the loader exited"
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert rows(db) == list(range(COUNT))
