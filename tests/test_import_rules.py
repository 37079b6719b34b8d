"""
C{/import} as Mixpanel's Ingestion API reference specifies it: every rule,
each record failing alone (beside a valid one) with Mixpanel's field name;
C{strict=0}; and the project token as credentials.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

import pytest

from mixingest.auth import ImportSecrets
from mixingest.cleaning import IMPORT_EARLIEST, PLACEHOLDER_IDS
from tests.test_api import NOW, Harness

TOKEN = "tok"
SECRET = "sekrit"
PLACEHOLDERS = sorted(PLACEHOLDER_IDS)


def event(insertId: str = "good-1", **changes: Any) -> Dict[str, Any]:
    """
    A valid imported event, with C{changes} to its properties (a value of
    L{None} removes the property).
    """
    props: Dict[str, Any] = {
        "token": TOKEN,
        "time": 1700000000,
        "distinct_id": "u-1",
        "$insert_id": insertId,
    }
    for key, value in changes.items():
        key = key.replace("INSERT_ID", "$insert_id")
        if value is None:
            props.pop(key, None)
        else:
            props[key] = value
    return {"event": "Imported", "properties": props}


RULES: List[Any] = [
    ("event missing", {"properties": event()["properties"]}, "event"),
    ("time missing", event(time=None), "properties.time"),
    ("time before 1971", event(time=IMPORT_EARLIEST - 1), "properties.time"),
    ("time over an hour ahead", event(time=int(NOW) + 3601), "properties.time"),
    ("time in ms over an hour ahead", event(time=int(NOW * 1000) + 3_601_000), "properties.time"),
    ("distinct_id missing", event(distinct_id=None), "properties.distinct_id"),
    ("$insert_id missing", event(INSERT_ID=None), "properties.$insert_id"),
    ("$insert_id malformed", event(INSERT_ID="has space"), "properties.$insert_id"),
    *[(f"distinct_id {p!r}", event(distinct_id=p), "properties.distinct_id") for p in PLACEHOLDERS],
    ("distinct_id 'NULL'", event(distinct_id="NULL"), "properties.distinct_id"),
    ("distinct_id 0 (a number)", event(distinct_id=0), "properties.distinct_id"),
    ("distinct_id -1 (a number)", event(distinct_id=-1), "properties.distinct_id"),
    *[(f"$insert_id {p!r}", event(INSERT_ID=p), "properties.$insert_id") for p in PLACEHOLDERS],
    ("$insert_id 'Undefined'", event(INSERT_ID="Undefined"), "properties.$insert_id"),
]


@pytest.fixture
def h() -> Harness:
    return Harness(secrets=ImportSecrets({TOKEN: SECRET}))


def importJSON(h: Harness, records: List[Any], query: str = "", auth: Any = (SECRET, "")) -> Any:
    code, _, body = h.call("POST", "/import" + query, json=records, auth=auth)
    return code, json.loads(body)


@pytest.mark.parametrize("name, bad, field", RULES, ids=[r[0] for r in RULES])
def test_ruleRefusesTheRecordAlone(h: Harness, name: str, bad: Any, field: str) -> None:
    code, answer = importJSON(h, [event("good-1"), bad])
    assert (code, answer["num_records_imported"]) == (400, 1), answer
    (failed,) = answer["failed_records"]
    assert (failed["index"], failed["field"]) == (1, field), failed
    assert len(h.queue.decoded()) == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"distinct_id": ""},
        {"distinct_id": "anonymous-user"},
        {"distinct_id": 12345},
        {"time": int(NOW) + 3600},
        {"time": IMPORT_EARLIEST},
        {"INSERT_ID": "00000000-0000-0000-0000-000000000001"},
    ],
)
def test_allowed(h: Harness, changes: Dict[str, Any]) -> None:
    """
    Controls at the edges: the empty C{distinct_id}, ids that merely
    contain a placeholder word, times at the limits.
    """
    assert importJSON(h, [event(**changes)]) == (
        200,
        {"code": 200, "num_records_imported": 1, "status": "OK"},
    )


def test_mergeNeedsNoIds(h: Harness) -> None:
    merge = {"event": "$merge", "properties": {"$distinct_ids": ["a", "b"], "token": TOKEN}}
    assert importJSON(h, [merge])[0] == 200


def test_formPostsNeedNoInsertId(h: Harness) -> None:
    """
    The legacy form protocol (the Node SDK's C{import}) predates
    C{$insert_id}: Mixpanel takes it without one, and so does mixingest;
    every other rule applies.
    """
    records = [event(INSERT_ID=None), event(INSERT_ID=None, distinct_id="null")]
    code, _, body = h.call(
        "POST",
        "/import?verbose=1",
        data={"data": json.dumps(records)},
        auth=(SECRET, ""),
    )
    answer = json.loads(body)
    assert (code, answer["status"]) == (200, 1)
    assert [f["field"] for f in answer["failed_records"]] == ["properties.distinct_id"]


def test_trackKeepsNoImportRules(h: Harness) -> None:
    records = [{"event": "e", "properties": {"token": TOKEN, "distinct_id": "null"}}]
    code, _, body = h.call("POST", "/track", data={"data": json.dumps(records)})
    assert (code, body) == (200, b"1")


def test_strictZeroDropsAndCounts(h: Harness) -> None:
    records = [event("a-1"), event(time=None), event(distinct_id="nil"), event(distinct_id="n/a")]
    code, answer = importJSON(h, records, "?strict=0")
    assert (code, answer) == (200, {"code": 200, "num_records_imported": 1, "status": "OK"})
    assert len(h.queue.decoded()) == 1
    assert h.funnel.rejected == {"import_time": 1, "import_distinct_id": 2}


def test_strictZeroNothingValid(h: Harness) -> None:
    code, answer = importJSON(h, [event(time=None)], "?strict=0")
    assert (code, answer["num_records_imported"]) == (200, 0)
    assert h.queue.items == {}


def test_strictOneIsTheDefault(h: Harness) -> None:
    """
    Control for the two above: without C{strict=0}, the same failure is
    answered 400 with the record's error, and not counted as dropped.
    """
    for query in ("", "?strict=1"):
        code, answer = importJSON(h, [event(time=None)], query)
        assert (code, answer["failed_records"][0]["field"]) == (400, "properties.time")
    assert h.funnel.rejected == {}


@pytest.mark.parametrize(
    "tokenAuth, auth, expected",
    [
        (True, (TOKEN, ""), 200),
        (False, (TOKEN, ""), 401),
        (True, ("other-token", ""), 401),
        (True, (TOKEN, "wrong"), 401),
        (True, (SECRET, ""), 200),
    ],
)
def test_projectTokenAsCredentials(
    tokenAuth: bool, auth: Any, expected: int, tmp_path: Any
) -> None:
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({TOKEN: SECRET, "other": "x"}))
    h = Harness(secrets=ImportSecrets.fromFile(str(path), tokenAuth=tokenAuth))
    code, answer = importJSON(h, [event()], auth=auth)
    assert code == expected, answer


def test_projectTokenCoversItsProjectOnly(tmp_path: Any) -> None:
    h = Harness(secrets=ImportSecrets({TOKEN: SECRET, "other": "x"}, tokenAuth=True))
    code, answer = importJSON(h, [event(token="other")], auth=(TOKEN, ""))
    assert (code, answer["failed_records"][0]["field"]) == (400, "properties.token")


def test_tokenAuthSurvivesReload(tmp_path: Any) -> None:
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({TOKEN: SECRET}))
    secrets = ImportSecrets.fromFile(str(path), tokenAuth=True)
    path.write_text(json.dumps({"new": SECRET}))
    secrets.reload()
    h = Harness(secrets=secrets)
    assert importJSON(h, [event(token="new")], auth=("new", ""))[0] == 200
    assert importJSON(h, [event()], auth=(TOKEN, ""))[0] == 401
