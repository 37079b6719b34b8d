"""
Per-token sliding-window counters: bucketed windows driven by a Clock,
bounded tokens with least-recently-seen eviction, and agreement with a naive
model that keeps every observation.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from mixingest.windows import BUCKET, SLOTS, WINDOWS, TokenCounters


def figures(counters: TokenCounters, clock: Clock, token: str = "tok") -> Dict[str, Dict[str, int]]:
    return counters.snapshot(clock.seconds())[token]


def test_windowsSlide() -> None:
    clock = Clock()
    counters = TokenCounters()
    counters.record("tok", clock.seconds(), events=3, size=300)
    clock.advance(30)
    counters.record("tok", clock.seconds(), rejects=2)
    got = figures(counters, clock)
    assert got["1m"] == got["5m"] == got["total"] == {"events": 3, "bytes": 300, "rejects": 2}
    clock.advance(40)
    got = figures(counters, clock)
    assert got["1m"] == {"events": 0, "bytes": 0, "rejects": 2}
    assert got["5m"] == {"events": 3, "bytes": 300, "rejects": 2}
    clock.advance(300)
    got = figures(counters, clock)
    assert got["1m"] == got["5m"] == {"events": 0, "bytes": 0, "rejects": 0}
    assert got["total"] == {"events": 3, "bytes": 300, "rejects": 2}


def test_ringIsReusedAfterALongSilence() -> None:
    clock = Clock()
    counters = TokenCounters()
    counters.record("tok", clock.seconds(), events=1)
    clock.advance(BUCKET * SLOTS * 3 + 1)
    counters.record("tok", clock.seconds(), events=5)
    assert figures(counters, clock)["5m"]["events"] == 5


def test_clockSteppingBackAddsToNewestBucket() -> None:
    counters = TokenCounters()
    counters.record("tok", 1000.0, events=1)
    counters.record("tok", 900.0, events=1)
    assert counters.snapshot(1000.0)["tok"]["1m"]["events"] == 2


def test_leastRecentlySeenTokenEvicted() -> None:
    counters = TokenCounters(maxTokens=2)
    counters.record("a", 0.0, events=1)
    counters.record("b", 0.0, events=1)
    counters.record("a", 1.0, events=1)
    counters.record("c", 2.0, events=1)
    assert list(counters.snapshot(2.0)) == ["c", "a"]
    assert len(counters) == 2


def test_maxTokensMustBePositive() -> None:
    with pytest.raises(ValueError):
        TokenCounters(0)


records = st.lists(
    st.tuples(
        st.sampled_from("abcde"),
        st.floats(0, 45, allow_nan=False),
        st.integers(0, 5),
        st.integers(0, 500),
        st.integers(0, 3),
    ),
    max_size=150,
)


@settings(max_examples=200, deadline=None)
@given(records, st.integers(1, 4), st.floats(0, 400, allow_nan=False))
def test_agreesWithNaiveModel(
    ops: List[Tuple[str, float, int, int, int]], maxTokens: int, later: float
) -> None:
    """
    The model keeps every observation with its bucket; a window of N
    buckets at time T sums those in the N buckets ending with T's.  A token
    is tracked iff it is among the C{maxTokens} most recently recorded, and
    its totals count from when it was last (re)tracked.
    """
    counters = TokenCounters(maxTokens)
    seen: List[str] = []
    observations: Dict[str, List[Tuple[int, int, int, int]]] = {}
    now = 0.0
    for token, step, events, size, rejects in ops:
        now += step
        if token not in seen[-maxTokens:]:
            observations[token] = []
        seen = [t for t in seen if t != token] + [token]
        observations[token].append((int(now // BUCKET), events, size, rejects))
        assert len(counters) <= maxTokens
        counters.record(token, now, events, size, rejects)
    now += later
    snapshot = counters.snapshot(now)
    assert list(snapshot) == list(reversed(seen[-maxTokens:]))
    index = int(now // BUCKET)
    for token, got in snapshot.items():
        for name, length in WINDOWS.items():
            inWindow = [o for o in observations[token] if index - length < o[0] <= index]
            assert got[name] == {
                "events": sum(o[1] for o in inWindow),
                "bytes": sum(o[2] for o in inWindow),
                "rejects": sum(o[3] for o in inWindow),
            }
        assert got["total"]["events"] == sum(o[1] for o in observations[token])
