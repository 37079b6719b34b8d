"""
Token buckets per project token, driven by a Clock: the long-run rate holds,
batches may go into debt, whole requests are admitted or not, tokens do not
affect each other, and the number of buckets stays bounded.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

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
