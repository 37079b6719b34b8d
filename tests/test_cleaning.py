"""
Cleaning records by Mixpanel's rules: one bad record never costs the others.
"""

from __future__ import annotations

import json
from typing import Any, Dict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixingest.cleaning import (
    MAX_ITEM_BYTES,
    MAX_TIME,
    MILLISECONDS_FROM,
    CleanItem,
    Context,
    clean,
    normaliseTime,
)
from mixingest.errors import InvalidEvent

NOW = 1795697832.5
CTX = Context(NOW)


def event(**props: Any) -> Dict[str, Any]:
    return {"event": "Played", "properties": {"token": "tok", **props}}


def cleanOne(endpoint: str, record: Any, context: Context = CTX) -> Dict[str, Any]:
    result = clean(endpoint, [record], context)
    assert not result.failures, result.failures
    return json.loads(result.items[0].payload)


def failure(endpoint: str, record: Any, context: Context = CTX) -> InvalidEvent:
    result = clean(endpoint, [record], context)
    assert not result.items
    return result.failures[0][1]


def test_trackItem() -> None:
    result = clean(
        "track", [event(distinct_id="u", time=1700000000, **{"$insert_id": "abc-1"})], CTX
    )
    (item,) = result.items
    assert item.token == "tok"
    assert item.insertId == "abc-1"
    assert json.loads(item.payload) == {
        "event": "Played",
        "properties": {
            "token": "tok",
            "distinct_id": "u",
            "time": 1700000000,
            "$insert_id": "abc-1",
        },
        "received_at": NOW,
    }


@pytest.mark.parametrize(
    "given, expected",
    [
        (1700000000, 1700000000),
        (1700000000.139224, 1700000000.139),
        (1700000000000, 1700000000),
        (1700000000123, 1700000000.123),
        (1700000000123.0, 1700000000.123),
    ],
)
def test_timeNormalised(given: float, expected: float) -> None:
    assert normaliseTime(given, "time") == expected
    assert type(normaliseTime(given, "time")) is type(expected)


@settings(max_examples=2000)
@given(st.integers(min_value=MILLISECONDS_FROM, max_value=MAX_TIME - 1))
def test_millisecondsExact(milliseconds: int) -> None:
    """
    Whole milliseconds are divided without round(): the same number as
    rounding the quotient to milliseconds, an integer when whole.
    """
    expected = round(milliseconds / 1000, 3)
    normalised = normaliseTime(milliseconds, "time")
    assert normalised == expected
    assert type(normalised) is (int if expected.is_integer() else float)


@pytest.mark.parametrize(
    "bad", ["1700000000", True, None, -1, 0, 0.0004, 1e15, 10**14, float("nan"), [1]]
)
def test_timeRejected(bad: Any) -> None:
    with pytest.raises(InvalidEvent):
        normaliseTime(bad, "time")


def test_missingTimeIsReceiveTime() -> None:
    assert cleanOne("track", event())["properties"]["time"] == NOW


def test_ipRecordedUnlessGiven() -> None:
    context = Context(NOW, "203.0.113.9")
    assert cleanOne("track", event(), context)["properties"]["ip"] == "203.0.113.9"
    assert (
        cleanOne("track", event(ip="198.51.100.1"), context)["properties"]["ip"] == "198.51.100.1"
    )
    assert "ip" not in cleanOne("track", event())["properties"]


def test_partialBatch() -> None:
    records = [event(), {"event": ""}, event(), "nope", {"event": "x", "properties": []}]
    result = clean("track", records, CTX)
    assert len(result.items) == 2
    assert [(i, e.field) for i, e, _ in result.failures] == [
        (1, "event"),
        (3, ""),
        (4, "properties"),
    ]


@pytest.mark.parametrize(
    "record, field, message",
    [
        ({"event": {}}, "event", "non-empty string"),
        ({"event": "e"}, "properties", "missing"),
        ({"event": "e", "properties": {}}, "properties.token", "missing"),
        ({"event": "e", "properties": {"token": 5}}, "properties.token", "missing"),
        (event(time="soon"), "properties.time", "number"),
        (event(distinct_id={"a": 1}), "properties.distinct_id", "string"),
        (event(**{"$insert_id": "has space"}), "properties.$insert_id", "A-Z"),
        (event(**{"$insert_id": "x" * 37}), "properties.$insert_id", "A-Z"),
        (event(n=float("inf")), "properties.n", "NaN and Infinity"),
        (event(n=2**63), "properties.n", "64-bit"),
        (event(n={"a": {"b": {"c": {}}}}), "properties.n.a.b.c", "nested deeper"),
        (event(n=[1, [2, [3, [4]]]]), "properties.n.1.1.1", "nested deeper"),
        (event(n=list(range(256))), "properties.n", "longer than 255"),
        (event(n={str(i): i for i in range(256)}), "properties.n", "more than 255"),
        (event(n=["x" * 200] * 50), "properties.n", "larger than 8192"),
        (event(n="\ud800"), "", "lone surrogate"),
        (
            {"event": "e", "properties": {"token": "t", **{str(i): i for i in range(255)}}},
            "properties",
            "more than 255 keys",
        ),
    ],
)
def test_trackRejects(record: Any, field: str, message: str) -> None:
    error = failure("track", record)
    assert error.field == field
    assert message in error.message


def test_nestingAtTheLimitIsFine() -> None:
    nested = {"a": {"b": {"c": 1}}, "l": [["x"]]}
    assert cleanOne("track", event(n=nested))["properties"]["n"] == nested


def test_truncation() -> None:
    long = "x" * 300
    result = clean(
        "track",
        [{"event": long, "properties": {"token": "t", "s": long, long: 1, "l": [long]}}],
        CTX,
    )
    payload = json.loads(result.items[0].payload)
    assert payload["event"] == "x" * 255
    assert payload["properties"]["s"] == "x" * 255
    assert payload["properties"]["l"] == ["x" * 255]
    assert payload["properties"]["x" * 255] == 1
    assert result.truncated == 4


def test_propertyLimitCountsOnlyWhatTheClientSent() -> None:
    """
    255 properties is the limit; the C{time} and C{ip} the server adds do not
    count against it.
    """
    props = {f"p{i}": i for i in range(254)}
    item = cleanOne("track", event(**props), Context(NOW, "192.0.2.1"))
    assert len(item["properties"]) == 257


def test_hugeItemRejected() -> None:
    props = {f"p{i}": ["x" * 255] * 30 for i in range(150)}
    assert (
        failure("track", event(**props)).message
        == f"larger than {MAX_ITEM_BYTES} bytes once encoded"
    )


def test_importRequiresTimeAndAuthorisedToken() -> None:
    context = Context(NOW, importTokens=frozenset({"tok"}))
    assert failure("import", event(distinct_id="u"), context).field == "properties.time"
    assert "1971" in failure("import", event(distinct_id="u", time=1000), context).message
    other = {"event": "e", "properties": {"token": "other", "time": 1700000000}}
    assert "not a project" in failure("import", other, context).message
    assert cleanOne("import", event(distinct_id="u", time=1700000000), context)


def test_importFillsTheOnlyToken() -> None:
    context = Context(NOW, importTokens=frozenset({"tok"}))
    record = {"event": "e", "properties": {"time": 1700000000, "distinct_id": "u"}}
    assert cleanOne("import", record, context)["properties"]["token"] == "tok"
    assert failure("import", {"event": "e"}, context).field == "properties.time"


def test_engage() -> None:
    update = {"$token": "t", "$distinct_id": "u", "$set": {"plan": "pro", "bio": "b" * 1000}}
    item = cleanOne("engage", update, Context(NOW, "192.0.2.1"))
    assert item["$set"]["bio"] == "b" * 1000
    assert item["$ip"] == "192.0.2.1"
    assert item["received_at"] == NOW


@pytest.mark.parametrize(
    "update, message",
    [
        ({"$distinct_id": "u", "$set": {}}, "missing"),
        ({"$token": "t", "$set": {}}, "missing"),
        ({"$token": "t", "$distinct_id": "u"}, "exactly one operation"),
        ({"$token": "t", "$distinct_id": "u", "$set": {}, "$unset": []}, "got $set, $unset"),
        ({"$token": "t", "$distinct_id": "u", "$set": []}, "object"),
        ({"$token": "t", "$distinct_id": "u", "$add": {"n": "1"}}, "numbers"),
        ({"$token": "t", "$distinct_id": "u", "$union": {"n": 1}}, "lists"),
        ({"$token": "t", "$distinct_id": "u", "$unset": "n"}, "list of property names"),
    ],
)
def test_engageRejects(update: Dict[str, Any], message: str) -> None:
    assert message in failure("engage", update).message


def test_engageDelete() -> None:
    assert cleanOne("engage", {"$token": "t", "$distinct_id": "u", "$delete": ""})["$delete"] == ""


def test_groups() -> None:
    update = {"$token": "t", "$group_key": "company", "$group_id": 42, "$set_once": {"a": 1}}
    item = cleanOne("groups", update, Context(NOW, "192.0.2.1"))
    assert "$ip" not in item
    assert failure("groups", {"$token": "t", "$group_key": "c", "$group_id": "x", "$add": {}})


def test_cleanItemIsATuple() -> None:
    assert CleanItem("t", None, b"{}") == ("t", None, b"{}")
