"""
Token buckets per project token, driven by a Clock: the long-run rate holds,
batches may go into debt, whole requests are admitted or not, tokens do not
affect each other, and the number of buckets stays bounded.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from mixingest.ratelimit import RateLimiter


def test_burstThenRate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=10)
    assert [limiter.admit([("tok", 1)], clock.seconds()) for _ in range(11)] == [0] * 10 + [1]
    clock.advance(0.1)
    assert limiter.admit([("tok", 1)], clock.seconds()) == 0
    assert limiter.admit([("tok", 1)], clock.seconds()) == 1


def test_batchGoesIntoDebtAndRetryAfterCoversIt() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=10)
    assert limiter.admit([("tok", 50)], clock.seconds()) == 0
    wait = limiter.admit([("tok", 1)], clock.seconds())
    assert wait == 5
    clock.advance(wait - 1)
    assert limiter.admit([("tok", 1)], clock.seconds()) == 1
    clock.advance(1)
    assert limiter.admit([("tok", 1)], clock.seconds()) == 0


def test_otherTokensUnaffected() -> None:
    limiter = RateLimiter(rate=1)
    assert limiter.admit([("noisy", 5)], 0.0) == 0
    assert limiter.admit([("noisy", 1)], 0.0) > 0
    assert limiter.admit([("quiet", 1)], 0.0) == 0


def test_wholeRequestOrNothing() -> None:
    """
    A request with a token over its rate takes nothing from the others'.
    """
    limiter = RateLimiter(rate=2)
    assert limiter.admit([("noisy", 2)], 0.0) == 0
    assert limiter.admit([("quiet", 1), ("noisy", 1)], 0.0) == 1
    assert limiter.admit([("quiet", 2)], 0.0) == 0
    assert limiter.admit([("quiet", 1)], 0.0) == 1


def test_leastRecentlyUsedBucketDropped() -> None:
    limiter = RateLimiter(rate=1, maxTokens=2)
    for token in "abc":
        limiter.admit([(token, 1)], 0.0)
    assert len(limiter) == 2
    assert limiter.admit([("a", 1)], 0.0) == 0  # forgotten, so full again
    assert limiter.admit([("c", 1)], 0.0) == 1


@pytest.mark.parametrize("rate, tokens", [(0, 1), (1, 0)])
def test_boundsMustBePositive(rate: float, tokens: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, tokens)


requests = st.lists(
    st.tuples(st.sampled_from("abc"), st.integers(1, 20), st.floats(0, 2, allow_nan=False)),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(requests, st.floats(0.5, 50), st.integers(1, 3))
def test_neverAboveRate(ops: List[Tuple[str, int, float]], rate: float, maxTokens: int) -> None:
    """
    Against a model bucket per token (when every token fits, so nothing is
    evicted): admitted exactly when the model's level is above zero, with a
    C{Retry-After} that is just enough, so the events admitted for a token
    in any span of T seconds are at most rate * T plus one burst and one
    request's worth.  The number of buckets never exceeds the bound.
    """
    limiter = RateLimiter(rate, maxTokens)
    model: Dict[str, Tuple[float, float]] = {}
    admitted: Dict[str, List[Tuple[float, int]]] = {}
    now = 0.0
    for token, count, step in ops:
        now += step
        wait = limiter.admit([(token, count)], now)
        assert len(limiter) <= maxTokens
        if maxTokens < 3:
            continue  # eviction may forgive a debt: only the bound holds
        level, stamp = model.get(token, (rate, now))
        level = min(rate, level + (now - stamp) * rate)
        assert (wait == 0) == (level > 0)
        if wait:
            assert level + wait * rate > 0 >= level + (wait - 1) * rate
        else:
            model[token] = (level - count, now)
            admitted.setdefault(token, []).append((now, count))
    for spans in admitted.values():
        for i, (start, _) in enumerate(spans):
            total = 0
            for end, count in spans[i:]:
                total += count
                assert total <= rate * (end - start) + rate + 20 + 1e-6


# -- the global limit ------------------------------------------------------------


def test_rotatingTokensHeldByTheGlobalLimit() -> None:
    """
    A fresh token per request gets past any per-token limit; the global
    one holds it to its rate, plus one burst and one request's worth.
    """
    clock = Clock()
    perToken = RateLimiter(rate=100)
    both = RateLimiter(rate=100, globalRate=200)
    admitted = {id(perToken): 0, id(both): 0}
    for n in range(1000):
        clock.advance(0.01)  # ten seconds in all
        for limiter in (perToken, both):
            if limiter.admit([(f"fresh-{n}", 50)], clock.seconds()) == 0:
                admitted[id(limiter)] += 50
    assert admitted[id(perToken)] == 50_000, "the control: rotation defeats a per-token limit"
    assert admitted[id(both)] <= 200 * 10 + 200 + 50


def test_globalRefusalSaysWhich() -> None:
    limiter = RateLimiter(rate=None, globalRate=10)
    assert limiter.refusal([("a", 10)], 0.0) is None
    reason, refusal = limiter.refusal([("b", 1)], 0.0)  # type: ignore[misc]
    assert (reason, refusal.reason, refusal.retryAfter) == (
        "global_rate_limit",
        "over 10 events/s for this server; retry",
        1,
    )
    assert limiter.refusal([("b", 1)], 0.5) is None
    assert len(limiter) == 0, "no per-token buckets without a per-token rate"


def test_freshTokenStartsNoFullerThanTheGlobalBucket() -> None:
    """
    A token never seen (or forgotten) starts with what the global bucket
    holds when that is less than a full per-token bucket, so fresh tokens
    bring no credit beyond the server's bound: here the global bucket holds
    1 when "fresh" sends 10, which puts it 9 in debt rather than at 0.
    """
    limiter = RateLimiter(rate=10, globalRate=100)
    for n in range(9):
        assert limiter.admit([(f"t{n}", 11)], 0.0) == 0
    assert limiter.admit([("fresh", 10)], 0.0) == 0
    # Half a second later the server has credit again, the fresh token not:
    # 9 in debt, refilled by 5.  A full first bucket would have left it 5.
    reason, refusal = limiter.refusal([("fresh", 1)], 0.5)  # type: ignore[misc]
    assert (reason, refusal.retryAfter) == ("rate_limit", 1)
    assert limiter.admit([("other", 1)], 0.5) == 0
    assert limiter.admit([("fresh", 1)], 1.0) == 0


def test_perTokenLimitStillPerToken() -> None:
    limiter = RateLimiter(rate=10, globalRate=1000)
    assert limiter.admit([("noisy", 10)], 0.0) == 0
    reason, _ = limiter.refusal([("noisy", 1)], 0.0)  # type: ignore[misc]
    assert reason == "rate_limit"
    assert limiter.admit([("quiet", 1)], 0.0) == 0


@pytest.mark.parametrize(
    "rate, globalRate", [(None, None), (0, None), (None, 0), (-1, 5.0), (5.0, -1)]
)
def test_globalBoundsMustBePositive(rate: Optional[float], globalRate: Optional[float]) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, 10, globalRate)
