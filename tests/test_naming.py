"""
Tests for L{mixingest.naming}: the queue names every part agrees on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mixingest.journal.reader import listQueues
from mixingest.naming import validQueueName


@pytest.mark.parametrize(
    "name", ["events", "people", "a", "A-b_9", "x" * 64, "worker_1", "worker-x"]
)
def test_valid(name: str) -> None:
    assert validQueueName(name)


@pytest.mark.parametrize("name", ["", "x" * 65, "a/b", "a.b", "a b", "é", "worker-0", "worker-12"])
def test_invalid(name: str) -> None:
    """
    Besides what some backend cannot carry, a C{--workers} journal
    directory's name is never a queue's.
    """
    assert not validQueueName(name)


def test_workerDirectoriesAreNotQueues(tmp_path: Path) -> None:
    """
    A single-process journal does not take the C{worker-K} journals beside
    its queues for queues of its own.
    """
    for name in ("events", "people", "worker-0", "worker-1"):
        (tmp_path / name).mkdir()
    (tmp_path / "journal-id").write_text("x")
    assert listQueues(str(tmp_path)) == ["events", "people"]
