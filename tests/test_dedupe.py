"""
The dedupe window: a pair is matched while younger than C{ttl} unless half
the bound of newer pairs came after it, never once C{ttl} old, and never more
than C{maxSize} pairs are held, under any sequence of operations.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from mixingest.dedupe import RecentInsertIds


def test_seenUntilTTL() -> None:
    clock = Clock()
    recent = RecentInsertIds(maxSize=10, ttl=60)
    recent.remember([("tok", "a")], clock.seconds())
    clock.advance(59.9)
    assert recent.seen(("tok", "a"), clock.seconds())
    clock.advance(0.1)
    assert not recent.seen(("tok", "a"), clock.seconds())
    assert recent.hits == 1


def test_tokenIsPartOfTheKey() -> None:
    recent = RecentInsertIds(maxSize=10, ttl=60)
    recent.remember([("tok", "a")], 0.0)
    assert not recent.seen(("other", "a"), 1.0)


def test_expiredAreDropped() -> None:
    """
    Pairs older than the TTL go when a generation turns over for age;
    younger ones stay.
    """
    clock = Clock()
    recent = RecentInsertIds(maxSize=100, ttl=5)
    for n in range(8):
        recent.remember([("tok", str(n))], clock.seconds())
        clock.advance(2)
    assert len(recent) <= 6
    assert [recent.seen(("tok", str(n)), clock.seconds() - 2) for n in range(8)] == [False] * 5 + [
        True
    ] * 3
    clock.advance(20)
    recent.remember([("tok", "late")], clock.seconds())
    assert len(recent) == 1


def test_sizeBound() -> None:
    recent = RecentInsertIds(maxSize=6, ttl=600)
    recent.remember([("tok", str(n)) for n in range(20)], 0.0)
    assert len(recent) <= 6
    assert all(recent.seen(("tok", str(n)), 1.0) for n in range(17, 20))
    assert not recent.seen(("tok", "0"), 1.0)


def test_rememberAgainRenews() -> None:
    recent = RecentInsertIds(maxSize=10, ttl=10)
    recent.remember([("tok", "a")], 0.0)
    recent.remember([("tok", "a")], 8.0)
    assert recent.seen(("tok", "a"), 17.0)


def test_holdsAny() -> None:
    recent = RecentInsertIds(maxSize=4, ttl=60)
    recent.remember([("tok", "a"), ("tok", "b")], 0.0)
    assert recent.holdsAny([("tok", "x"), ("tok", "b")])
    assert not recent.holdsAny([("tok", "x"), ("other", "a")])
    recent.remember([("tok", "c")], 1.0)  # the generation turns over: a and b are previous
    assert recent.holdsAny([("tok", "a")])
    assert not recent.holdsAny([])


@pytest.mark.parametrize("size, ttl", [(1, 1), (2, 0)])
def test_boundsMustBePositive(size: int, ttl: float) -> None:
    with pytest.raises(ValueError):
        RecentInsertIds(size, ttl)


keys = st.tuples(st.sampled_from(["t1", "t2"]), st.integers(0, 12).map(str))
operations = st.lists(
    st.tuples(
        st.sampled_from(["remember", "seen"]),
        st.lists(keys, min_size=1, max_size=4),
        st.floats(0, 5, allow_nan=False),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(2, 8), st.floats(0.5, 20))
def test_agreesWithNaiveModel(
    ops: List[Tuple[str, List[Tuple[str, str]], float]], size: int, ttl: float
) -> None:
    """
    Against a model that keeps every pair's last store time and position in
    the sequence of stores: matched only if stored less than C{ttl} ago
    (never a wrong dedupe, which would lose an event), always matched if
    also fewer than C{size // 2} stores came after it, never matched in a
    batch that L{RecentInsertIds.holdsAny} says is not held, and never more
    than C{size} pairs held.
    """
    recent = RecentInsertIds(size, ttl)
    storedAt: Dict[Tuple[str, str], Tuple[float, int]] = {}
    stores = 0
    now = 0.0
    for op, batch, step in ops:
        now += step
        if op == "remember":
            recent.remember(batch, now)
            for key in batch:
                stores += 1
                storedAt[key] = (now, stores)
        else:
            held = recent.holdsAny(batch)
            for key in batch:
                matched = recent.seen(key, now)
                # The funnel skips seen() for a batch none of whose keys is held.
                assert held or not matched
                when, position = storedAt.get(key, (float("-inf"), 0))
                young = now - when < ttl
                assert not matched or young
                if young and stores - position < size // 2:
                    assert matched
        assert len(recent) <= size
