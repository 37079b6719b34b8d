"""
Names that every part of the daemon agrees on: what a queue may be called.

Kept apart from the queue backends so that the journal, the options and the
backends can all use it without depending on one another.
"""

from __future__ import annotations

import re

__all__ = ["QUEUE_NAME", "WORKER_DIRECTORY", "validQueueName"]

QUEUE_NAME = re.compile(r"\A[A-Za-z0-9_-]{1,64}\Z")
"""
Queue names that every backend can carry: Kestrel forbids C{/ ~ + .}, the
journal uses the name as a directory, Redis takes anything.
"""


WORKER_DIRECTORY = re.compile(r"\Aworker-(\d+)\Z")
"""
The name of worker K's journal directory under C{DATA_DIR} (C{--workers N}):
never a queue's, so that no queue is mistaken for a worker's journal.
"""


def validQueueName(name: str) -> bool:
    return QUEUE_NAME.match(name) is not None and WORKER_DIRECTORY.match(name) is None
