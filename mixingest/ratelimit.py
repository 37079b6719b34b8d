# -*- test-case-name: tests.test_ratelimit -*-
"""
Token buckets: one per project token, so one noisy project is answered 429
while the others carry on, and optionally one for the whole server, so that
sending under many tokens (rotating fresh ones) cannot get past a total.

Each bucket holds up to one second's worth of events and refills at its
rate per second.  A request is admitted while the server's bucket and its
tokens' buckets are above zero and then takes all its events from each,
possibly into debt: a batch larger than a bucket is never refused outright,
and the debt keeps the long-run rate because later requests wait until it
is repaid.

Only tokens that sent recently need a bucket (a bucket idle for a second is
full, the same as having none), so the number kept is bounded: past
C{maxTokens} the least recently used is dropped, which can only forgive the
debt of a token idle for less than a second if the bound is too small.  A
token without a bucket (new, or dropped) starts with no more than the
server's bucket holds, so that neither fresh tokens nor evictions add
credit beyond the server's bound.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable, List, Optional, Tuple

from mixingest.defaults import DEFAULT_MAX_TOKENS
from mixingest.errors import RateLimited

__all__ = ["RateLimiter"]


class RateLimiter:
    """
    Reactor-owned token buckets, one per project token and one for all.
    """

    def __init__(
        self,
        rate: Optional[float],
        maxTokens: int = DEFAULT_MAX_TOKENS,
        globalRate: Optional[float] = None,
    ) -> None:
        """
        @param rate: events per second per token, or L{None} for no
            per-token limit.
        @param maxTokens: buckets kept at most.
        @param globalRate: events per second for all tokens together, or
            L{None} for no such limit.
        """
        if rate is None and globalRate is None:
            raise ValueError("a rate limiter needs a per-token or a global rate")
        if (rate is not None and rate <= 0) or (globalRate is not None and globalRate <= 0):
            raise ValueError("a rate limiter needs positive rates")
        if maxTokens <= 0:
            raise ValueError("a rate limiter needs a positive token bound")
        self.rate = rate
        self.globalRate = globalRate
        self.maxTokens = maxTokens
        self._buckets: OrderedDict[str, List[float]] = OrderedDict()
        self._global = [globalRate or 0.0, -math.inf]

    def __len__(self) -> int:
        return len(self._buckets)

    def _globalLevel(self, now: float) -> float:
        rate = self.globalRate
        if rate is None:
            return math.inf
        level, stamp = self._global
        return min(rate, level + max(0.0, now - stamp) * rate)

    def _level(self, rate: float, token: str, now: float, ceiling: float) -> float:
        bucket = self._buckets.get(token)
        if bucket is None:
            return min(rate, ceiling)
        level, stamp = bucket
        return min(rate, level + max(0.0, now - stamp) * rate)

    def refusal(
        self, counts: Iterable[Tuple[str, int]], now: float
    ) -> Optional[Tuple[str, RateLimited]]:
        """
        Admit a request carrying C{count} events for each C{token} in
        C{counts} if the server and every one of those tokens are within
        their rates, taking the events from their buckets; otherwise take
        nothing.

        @return: L{None} if admitted, else why not: C{"global_rate_limit"}
            or C{"rate_limit"}, and the refusal to raise, whose
            C{retryAfter} is the whole seconds after which the request will
            be admitted again.
        """
        counts = list(counts)
        shared = self._globalLevel(now)
        if shared <= 0:
            globalRate = self.globalRate or 1.0
            return "global_rate_limit", RateLimited(
                f"over {globalRate:g} events/s for this server; retry",
                math.floor(-shared / globalRate) + 1,
            )
        rate = self.rate
        if rate is not None:
            levels = [
                (token, count, self._level(rate, token, now, shared)) for token, count in counts
            ]
            worst = min(level for _, _, level in levels)
            if worst <= 0:
                return "rate_limit", RateLimited(
                    f"over {rate:g} events/s for this token; retry",
                    math.floor(-worst / rate) + 1,
                )
            buckets = self._buckets
            for token, count, level in levels:
                if token in buckets:
                    buckets.move_to_end(token)
                buckets[token] = [level - count, now]
                if len(buckets) > self.maxTokens:
                    buckets.popitem(last=False)
        if self.globalRate is not None:
            self._global = [shared - sum(count for _, count in counts), now]
        return None

    def admit(self, counts: Iterable[Tuple[str, int]], now: float) -> int:
        """
        L{refusal}, as a number.

        @return: 0 if admitted, else the whole seconds after which every one
            of the tokens will be admitted again (for C{Retry-After}).
        """
        refused = self.refusal(counts, now)
        if refused is None:
            return 0
        retryAfter = refused[1].retryAfter
        assert retryAfter is not None
        return retryAfter
