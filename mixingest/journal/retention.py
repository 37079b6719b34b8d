"""
Retention of a journal queue: what frees its disk in journal-only mode.

Blocking file I/O: L{Journal<mixingest.journal.service.Journal>} runs
L{enforce} on its writer thread, so that deleting a segment never races
the writer rotating one.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, List, Optional, Tuple

import attrs
from twisted.logger import Logger

from mixingest.journal.consumer import FORWARDER_GROUP, groupStatus
from mixingest.journal.framing import listSegments, segmentPath
from mixingest.journal.fsync import syncDirectory
from mixingest.journal.reader import (
    SegmentCounter,
    checkpointTime,
    deleteCheckpoint,
    deleteConsumedSegments,
    listCheckpoints,
)

__all__ = ["DROP", "REFUSE", "QueueRetention", "RetentionPolicy", "enforce", "measureGroups"]

REFUSE = "refuse"
DROP = "drop"

log = Logger()


@attrs.frozen
class RetentionPolicy:
    """
    Limits on what a queue keeps for groups that do not read it.

    @ivar maxBytes: a queue's segments may add up to this many bytes.
    @ivar maxAge: a sealed segment (not the newest) whose last write is this
        many seconds old is over the limit.
    @ivar policy: past a limit, L{REFUSE} new events for the queue (503:
        nothing acknowledged is ever dropped) or L{DROP} its oldest
        segments, never the newest.
    @ivar groupExpiry: delete the cursor of a group that has not committed
        (nor sent a heartbeat) for this many seconds; C{None}: never.  The
        forwarder's checkpoint never expires.
    """

    maxBytes: Optional[int] = None
    maxAge: Optional[float] = None
    policy: str = REFUSE
    groupExpiry: Optional[float] = None

    def __attrs_post_init__(self) -> None:
        if self.policy not in (REFUSE, DROP):
            raise ValueError(f"retention policy is {REFUSE} or {DROP}, not {self.policy!r}")


@attrs.define
class QueueRetention:
    """
    What one L{enforce} pass did to a queue and found in it.

    @ivar consumed: segments deleted because every group had passed them.
    @ivar dropped: segments deleted unread by some group (L{DROP}).
    @ivar droppedBytes: their size.
    @ivar over: why the queue is over a limit, or C{""}: under L{REFUSE},
        the queue refuses events while this is set.
    @ivar expired: groups whose cursor was deleted.
    """

    consumed: List[int] = attrs.Factory(list)
    dropped: List[int] = attrs.Factory(list)
    droppedBytes: int = 0
    over: str = ""
    expired: List[str] = attrs.Factory(list)


def _expire(queueDir: str, expiry: float, now: float) -> List[str]:
    expired = []
    for name in listCheckpoints(queueDir):
        written = checkpointTime(queueDir, name)
        if name == FORWARDER_GROUP or written is None or now - written < expiry:
            continue
        if deleteCheckpoint(queueDir, name):
            expired.append(name)
            log.warn(
                "journal {queueDir}: group {group} has not committed for {seconds:.0f}s "
                "(--group-expiry): its cursor is deleted",
                queueDir=queueDir,
                group=name,
                seconds=now - written,
            )
    return expired


def _sizes(queueDir: str) -> List[Tuple[int, int, float]]:
    """
    @return: C{(base, bytes, last write)} of each segment, oldest first.
    """
    found = []
    for base in listSegments(queueDir):
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(segmentPath(queueDir, base))
            found.append((base, st.st_size, st.st_mtime))
    return found


def _overLimit(segments: List[Tuple[int, int, float]], policy: RetentionPolicy, now: float) -> str:
    total = sum(size for _, size, _ in segments)
    if policy.maxBytes is not None and total > policy.maxBytes:
        return f"{total} bytes, over --retention-bytes {policy.maxBytes}"
    if policy.maxAge is not None and len(segments) > 1:
        age = now - segments[0][2]
        if age > policy.maxAge:
            return f"a segment {age:.0f}s old, over --retention-age {policy.maxAge:g}"
    return ""


def enforce(queueDir: str, policy: RetentionPolicy, now: float) -> QueueRetention:
    """
    Expire idle groups, delete the segments every cursor has passed, then
    hold the queue to C{policy}'s limits.  Reads only directory listings,
    file sizes and cursors: it runs on the writer thread, which appends
    wait for.

    Limits count every segment left: those kept for a group that has not
    read them, or all of them when the queue has no group at all.
    """
    result = QueueRetention()
    if policy.groupExpiry is not None:
        result.expired = _expire(queueDir, policy.groupExpiry, now)
    result.consumed = deleteConsumedSegments(queueDir)
    segments = _sizes(queueDir)
    result.over = _overLimit(segments, policy, now)
    if result.over and policy.policy == DROP:
        while result.over and len(segments) > 1:
            base, size, _ = segments.pop(0)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(segmentPath(queueDir, base))
                result.dropped.append(base)
                result.droppedBytes += size
            result.over = _overLimit(segments, policy, now)
        if result.dropped:
            syncDirectory(queueDir)
            log.error(
                "journal {queueDir}: dropped {count} segments ({size} bytes) that not every "
                "group had read (--retention-policy drop)",
                queueDir=queueDir,
                count=len(result.dropped),
                size=result.droppedBytes,
            )
    return result


def measureGroups(counter: SegmentCounter, now: float) -> Dict[str, Dict[str, Any]]:
    """
    Each group's L{groupStatus} in the queue that C{counter} counts.  The
    first call reads every segment after the slowest cursor, so it runs on
    a thread of its own, not the writer's.
    """
    groups = {}
    for name in listCheckpoints(counter.queueDir):
        try:
            groups[name] = groupStatus(counter, name, now)
        except ValueError as e:
            log.error("journal {queueDir}: {error}", queueDir=counter.queueDir, error=e)
    return groups
