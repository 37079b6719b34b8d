# -*- test-case-name: tests.test_windows -*-
"""
Per-token counters over sliding windows (the last minute, the last five),
for operators asking "which project is sending what, right now".

Each tracked token has a ring of L{SLOTS} buckets of L{BUCKET} seconds:
recording adds to the current bucket (clearing the ones the clock skipped
since the token was last seen, at most L{SLOTS} of them), so it is O(1) per
event; a window's figure sums the buckets it covers when C{/stats} asks.  A
window therefore covers between its length minus one bucket and its length.

Anyone can send any token, so the number tracked is bounded: past
C{maxTokens}, the least recently seen token is forgotten.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict

from mixingest.defaults import DEFAULT_MAX_TOKENS

__all__ = ["BUCKET", "SLOTS", "WINDOWS", "TokenCounters"]

BUCKET = 10
"""Seconds per bucket: the windows' resolution."""

WINDOWS = {"1m": 6, "5m": 30}
"""Each window's name and length in buckets."""

SLOTS = max(WINDOWS.values())


FIELDS = ("events", "bytes", "rejects")


class _Ring:
    """
    One token's buckets and totals.

    @ivar newest: the absolute index (time // BUCKET) of the newest bucket
        written; the ring holds buckets C{newest - SLOTS + 1 .. newest}.
    """

    __slots__ = ("bytes", "events", "newest", "rejects", "totals")

    def __init__(self, newest: int) -> None:
        self.newest = newest
        self.events = [0] * SLOTS
        self.bytes = [0] * SLOTS
        self.rejects = [0] * SLOTS
        self.totals = [0, 0, 0]

    def advance(self, index: int) -> int:
        """
        Move the ring forward to bucket C{index}, clearing skipped buckets.

        @return: the slot to add to.  A clock that stepped backwards keeps
            adding to the newest bucket rather than rewriting history.
        """
        newest = self.newest
        if index > newest:
            for absolute in range(max(newest + 1, index - SLOTS + 1), index + 1):
                slot = absolute % SLOTS
                self.events[slot] = self.bytes[slot] = self.rejects[slot] = 0
            self.newest = newest = index
        return newest % SLOTS

    def window(self, index: int, length: int) -> Dict[str, int]:
        """
        The sums over the C{length} buckets ending at bucket C{index}.
        """
        sums = [0, 0, 0]
        for absolute in range(
            max(index - length + 1, self.newest - SLOTS + 1), min(index, self.newest) + 1
        ):
            slot = absolute % SLOTS
            sums[0] += self.events[slot]
            sums[1] += self.bytes[slot]
            sums[2] += self.rejects[slot]
        return dict(zip(FIELDS, sums))


class TokenCounters:
    """
    Events, bytes and rejects per token, over L{WINDOWS} and in total since
    the token was last (re)tracked.  Reactor-owned.
    """

    def __init__(self, maxTokens: int = DEFAULT_MAX_TOKENS) -> None:
        if maxTokens <= 0:
            raise ValueError("maxTokens must be positive")
        self.maxTokens = maxTokens
        self._rings: OrderedDict[str, _Ring] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rings)

    def record(
        self, token: str, now: float, events: int = 0, size: int = 0, rejects: int = 0
    ) -> None:
        """
        Count C{events} stored (C{size} bytes) and C{rejects} refused for
        C{token} at time C{now}.
        """
        index = int(now // BUCKET)
        rings = self._rings
        ring = rings.get(token)
        if ring is None:
            ring = rings[token] = _Ring(index)
            if len(rings) > self.maxTokens:
                rings.popitem(last=False)
        else:
            rings.move_to_end(token)
        slot = ring.advance(index)
        ring.events[slot] += events
        ring.bytes[slot] += size
        ring.rejects[slot] += rejects
        totals = ring.totals
        totals[0] += events
        totals[1] += size
        totals[2] += rejects

    def snapshot(self, now: float) -> Dict[str, Dict[str, Dict[str, int]]]:
        """
        Every tracked token's windows and totals at C{now}, most recently
        seen first.
        """
        index = int(now // BUCKET)
        result: Dict[str, Dict[str, Dict[str, int]]] = {}
        for token in reversed(self._rings):
            ring = self._rings[token]
            figures = {name: ring.window(index, length) for name, length in WINDOWS.items()}
            figures["total"] = dict(zip(FIELDS, ring.totals))
            result[token] = figures
        return result
