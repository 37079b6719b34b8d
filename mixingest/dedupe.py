# -*- test-case-name: tests.test_dedupe -*-
"""
The recently stored C{(token, $insert_id)} pairs, so that an SDK's retry of
an event whose answer was lost is answered C{1} without being stored twice.

Two generations of plain dicts rather than one ordered structure: pairs go
into the current generation; when it holds half the bound, or is older than
the TTL, it becomes the previous one and the previous one is dropped whole.
That is O(1) per event with no per-pair bookkeeping (an ordered dict costs
three times as much per remembered pair, and this runs for every event), and
it bounds memory at C{maxSize} pairs.  A pair is never matched once C{ttl}
seconds old, and is always matched while younger than C{ttl} unless
C{maxSize / 2} or more pairs were stored after it.
"""

from __future__ import annotations

from typing import Collection, Dict, Tuple

from mixingest.defaults import DEFAULT_DEDUPE_SIZE, DEFAULT_DEDUPE_TTL

__all__ = ["Key", "RecentInsertIds"]


Key = Tuple[str, str]


class RecentInsertIds:
    """
    A bounded, expiring set of C{(token, insert_id)} pairs.  Reactor-owned.

    @ivar hits: lookups that found a live pair, i.e. events not stored again.
    """

    def __init__(self, maxSize: int = DEFAULT_DEDUPE_SIZE, ttl: float = DEFAULT_DEDUPE_TTL) -> None:
        if maxSize < 2 or ttl <= 0:
            raise ValueError("a dedupe window needs a size of at least 2 and a positive TTL")
        self.maxSize = maxSize
        self.ttl = ttl
        self.hits = 0
        self._generation = maxSize // 2
        self._current: Dict[Key, float] = {}
        self._previous: Dict[Key, float] = {}
        self._since = float("-inf")

    def __len__(self) -> int:
        """
        Pairs held, including expired ones not dropped yet.
        """
        return len(self._current) + len(self._previous)

    def holdsAny(self, keys: Collection[Key]) -> bool:
        """
        Whether any of C{keys} is held at all, expired or not: when not (the
        usual answer), none of them needs L{seen}, and a whole batch was
        checked by two set operations in C rather than a call per event.
        """
        return not (
            self._current.keys().isdisjoint(keys) and self._previous.keys().isdisjoint(keys)
        )

    def seen(self, key: Key, now: float) -> bool:
        """
        Whether C{key} was stored less than C{ttl} seconds before C{now};
        counts a hit if so.
        """
        storedAt = self._current.get(key)
        if storedAt is None:
            storedAt = self._previous.get(key)
        if storedAt is not None and now - storedAt < self.ttl:
            self.hits += 1
            return True
        return False

    def remember(self, keys: Collection[Key], now: float) -> None:
        """
        Record that C{keys} (one write's worth) were stored at C{now}.
        """
        if now - self._since >= self.ttl:
            self._rotate(now)
        current = self._current
        if len(current) + len(keys) < self._generation:
            # All of them fit in this generation: one update in C.
            current.update(dict.fromkeys(keys, now))
            return
        for key in keys:
            current[key] = now
            if len(current) >= self._generation:
                self._rotate(now)
                current = self._current

    def _rotate(self, now: float) -> None:
        """
        Start a new generation, keeping the current one as the previous.

        Rotating for age drops only expired pairs: the previous generation
        ended at least C{ttl} ago, and if the current one began C{2 * ttl}
        ago, its last pair (stored before it turned C{ttl} old) is expired
        too.
        """
        self._previous = self._current if now - self._since < 2 * self.ttl else {}
        self._current = {}
        self._since = now
