# -*- test-case-name: tests.test_ratelimit -*-
"""
A token bucket per project token, so one noisy project is answered 429 while
the others carry on.

Each bucket holds up to one second's worth of events (C{rate}) and refills at
C{rate} per second.  A request is admitted while its token's bucket is above
zero and then takes all its events, possibly into debt: a batch larger than
the bucket is never refused outright, and the debt keeps the long-run rate at
C{rate} because later requests wait until it is repaid.

Only tokens that sent recently need a bucket (a bucket idle for a second is
full, the same as having none), so the number kept is bounded: past
C{maxTokens} the least recently used is dropped, which can only forgive the
debt of a token idle for less than a second if the bound is too small.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable, List, Tuple

from mixingest.windows import DEFAULT_MAX_TOKENS

__all__ = ["RateLimiter"]


class RateLimiter:
    """
    Reactor-owned token buckets, one per project token.
    """

    def __init__(self, rate: float, maxTokens: int = DEFAULT_MAX_TOKENS) -> None:
        """
        @param rate: events per second per token.
        @param maxTokens: buckets kept at most.
        """
        if rate <= 0 or maxTokens <= 0:
            raise ValueError("a rate limiter needs a positive rate and token bound")
        self.rate = rate
        self.maxTokens = maxTokens
        self._buckets: OrderedDict[str, List[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, token: str, now: float) -> float:
        bucket = self._buckets.get(token)
        if bucket is None:
            return self.rate
        level, stamp = bucket
        return min(self.rate, level + max(0.0, now - stamp) * self.rate)

    def admit(self, counts: Iterable[Tuple[str, int]], now: float) -> int:
        """
        Admit a request carrying C{count} events for each C{token} in
        C{counts} if every one of those tokens is within its rate, taking
        the events from their buckets; otherwise take nothing.

        @return: 0 if admitted, else the whole seconds after which every one
            of the tokens will be admitted again (for C{Retry-After}).
        """
        levels = [(token, count, self._level(token, now)) for token, count in counts]
        worst = min(level for _, _, level in levels)
        if worst <= 0:
            return math.floor(-worst / self.rate) + 1
        buckets = self._buckets
        for token, count, level in levels:
            if token in buckets:
                buckets.move_to_end(token)
            buckets[token] = [level - count, now]
            if len(buckets) > self.maxTokens:
                buckets.popitem(last=False)
        return 0
