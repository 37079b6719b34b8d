"""
The official Node SDK (npm C{mixpanel}), unmodified, against the real
daemon: plain calls over http with C{host}/C{protocol}, C{/import} with the
API secret over https (the SDK refuses a secret over http), each call's
items checked on the queue.  tests/sdk/node_sdk.js makes the calls.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Tuple

import pytest

from tests.sdk.harness import (
    IMPORT_TOKEN,
    SECRET,
    NodeRunner,
    SDKDaemon,
    installedVersion,
    pinnedVersions,
)

UNUSUAL = "a+b/c=d&e?f%20 é ☃ \U0001f600 ~~~>>>???"
TOKEN = "tok-node"
WEEK_AGO_MS = (int(time.time()) - 7 * 86400) * 1000


@pytest.fixture(scope="module")
def run(node: NodeRunner, mixingest: SDKDaemon) -> Dict[str, Any]:
    """
    Every call, once, in one node process; the callbacks' errors by call.
    """
    started = time.time()
    result: Dict[str, Any] = node.run(
        "node_sdk.js",
        {
            "http": mixingest.httpHost,
            "https": mixingest.httpsHost,
            "token": TOKEN,
            "importToken": IMPORT_TOKEN,
            "secret": SECRET,
            "weekAgoMs": WEEK_AGO_MS,
            "unusual": UNUSUAL,
        },
    )
    result["started"] = started
    return result


def test_version(run: Dict[str, Any], nodeModules: Any) -> None:
    pinned = pinnedVersions()["mixpanel"]
    assert run["version"] == pinned == installedVersion(nodeModules, "mixpanel")


def test_everyCallSucceeded(run: Dict[str, Any]) -> None:
    errors = dict(run["errors"])
    assert "HTTPS" in errors.pop("import over http")
    assert errors.pop("import wrong secret") == "Mixpanel Server Error: 0"
    assert {label: e for label, e in errors.items() if e is not None} == {}
    assert len(errors) == 29


def byEvent(items: List[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    found: Dict[str, List[Dict[str, Any]]] = {}
    for item in items:
        found.setdefault(item["event"], []).append(item)
    return found


def test_track(run: Dict[str, Any], mixingest: SDKDaemon) -> None:
    events = byEvent(mixingest.waitFor("events", TOKEN, 125))
    (signedUp,) = events["Signed Up"]
    props = signedUp["properties"]
    assert props["text"] == UNUSUAL
    assert props["nested"] == {"a": [1, 2.5]}
    assert (props["distinct_id"], props["mp_lib"]) == ("u-1", "node")
    assert props["$lib_version"] == run["version"]
    assert abs(props["time"] - signedUp["received_at"]) < 1, "no time sent: the receive time"
    assert "ip" not in props, "the Node SDK sends ip=0"
    (timed,) = events["Timed"]
    assert abs(timed["properties"]["time"] - (run["started"] - 3600)) < 60, "ms to seconds"
    (alias,) = events["$create_alias"]
    assert alias["properties"]["alias"] == "alias-1"
    (test,) = events["Test Mode"]
    assert test["properties"]["distinct_id"] == "u-1"
    (geo,) = events["Geolocated"]
    assert geo["properties"]["ip"] == "127.0.0.1"
    assert "mp_country_code" not in geo["properties"], "loopback has no location"


def test_trackBatch(run: Dict[str, Any], mixingest: SDKDaemon) -> None:
    """
    Three POSTs (50, 50, 20) of unescaped base64 whose C{+} the form decoding
    turns into spaces; every event intact, times in ms made seconds.
    """
    batched = byEvent(mixingest.waitFor("events", TOKEN, 125))["Batched"]
    assert sorted(e["properties"]["n"] for e in batched) == list(range(120))
    for event in batched:
        props = event["properties"]
        assert props["text"] == UNUSUAL
        assert props["token"] == TOKEN
        assert abs(props["time"] - (run["started"] - props["n"])) < 60


PEOPLE_OPS = ["$set", "$set_once", "$add", "$append", "$union", "$remove", "$unset", "$delete"]


def test_people(run: Dict[str, Any], mixingest: SDKDaemon) -> None:
    people = mixingest.waitFor("people", TOKEN, 12)
    assert len(people) == 12
    ops: Dict[str, List[Dict[str, Any]]] = {}
    for update in people:
        assert update["$token"] == TOKEN
        (op,) = [k for k in update if k in PEOPLE_OPS]
        ops.setdefault(op, []).append(update)
    sets = {u["$distinct_id"] + ":" + ",".join(sorted(u["$set"])): u for u in ops["$set"]}
    assert sets["u-1:$name,text"]["$set"] == {"$name": "Ada", "text": UNUSUAL}
    assert sets["u-1:plan"]["$set"] == {"plan": "pro"}
    assert sets["u-4:$transactions"]["$set"] == {"$transactions": []}
    modified = sets["u-3:city"]
    assert modified["$ip"] == "192.0.2.7"
    assert modified["$ignore_time"] is True
    assert (modified["$latitude"], modified["$longitude"]) == (48.85, 2.35)
    assert abs(modified["$time"] - (run["started"] - 60)) < 60, "a Date is sent as ms"
    assert ops["$set_once"][0]["$set_once"] == {"first_seen": "2024-01-01"}
    assert ops["$add"][0]["$add"] == {"logins": 1, "score": -2.5}
    appends = {",".join(u["$append"]): u["$append"] for u in ops["$append"]}
    assert appends["pages"] == {"pages": "home"}
    assert appends["$transactions"]["$transactions"]["$amount"] == 19.5
    assert ops["$union"][0]["$union"] == {"browsers": ["firefox", "chrome"]}
    assert ops["$remove"][0]["$remove"] == {"browsers": "chrome"}
    assert ops["$unset"][0]["$unset"] == ["obsolete"]
    assert ops["$delete"][0]["$distinct_id"] == "u-2"


GROUP_OPS = ["$set", "$set_once", "$union", "$remove", "$unset", "$delete"]


def test_groups(run: Dict[str, Any], mixingest: SDKDaemon) -> None:
    groups: Dict[str, Dict[str, Any]] = {}
    for update in mixingest.waitFor("groups", TOKEN, 6):
        (op,) = [k for k in update if k in GROUP_OPS]
        groups[op] = update
    assert set(groups) == set(GROUP_OPS)
    assert groups["$set"]["$set"] == {"name": "Acme", "text": UNUSUAL}
    assert (groups["$set"]["$group_key"], groups["$set"]["$group_id"]) == ("company", "acme")
    assert groups["$set_once"]["$set_once"] == {"founded": 1999}
    assert groups["$union"]["$union"] == {"tags": ["a", "b"]}
    assert groups["$remove"]["$remove"] == {"tags": "b"}
    assert groups["$unset"]["$unset"] == ["obsolete"]
    assert groups["$delete"]["$group_id"] == "gone"


def test_importOverHTTPS(run: Dict[str, Any], mixingest: SDKDaemon) -> None:
    """
    C{import} (GET, base64 in the query) and C{import_batch} (POST, unescaped
    base64) with the secret as HTTP Basic, and with a service account.
    """
    events = byEvent(mixingest.waitFor("events", IMPORT_TOKEN, 124))
    assert "Never" not in events and "Refused" not in events
    (imported,) = events["Imported"]
    assert imported["properties"]["time"] == WEEK_AGO_MS // 1000
    assert imported["properties"]["text"] == UNUSUAL
    (seconds,) = events["Imported Seconds"]
    assert seconds["properties"]["time"] == WEEK_AGO_MS // 1000
    batch = events["Imported Batch"]
    assert sorted(e["properties"]["n"] for e in batch) == list(range(120))
    for event in batch:
        assert event["properties"]["time"] == WEEK_AGO_MS // 1000 - event["properties"]["n"]
        assert event["properties"]["text"] == UNUSUAL
    assert len(events["Secure Track"]) == 1
    assert len(events["Service Account"]) == 1


PUBLIC = "81.2.69.142"
PROFILE_IP = "89.160.20.112"
"""
The addresses of the Python SDK's test_geolocation, located in the GeoLite2
City database of C{maxminddb-geolite2}.
"""


def locate(node: NodeRunner, daemon: SDKDaemon, token: str) -> Tuple[Dict[str, Any], ...]:
    """
    An event whose C{ip} property is a public address and a profile C{$set}
    with a public C{$ip}, as server-side code sends them; both as stored.
    """
    result = node.run(
        "node_sdk.js",
        {
            "locate": {
                "http": daemon.httpHost,
                "token": token,
                "ip": PUBLIC,
                "profileIP": PROFILE_IP,
            }
        },
    )
    assert result["errors"] == {"track": None, "people.set": None}
    (event,) = daemon.waitFor("events", token, 1)
    (update,) = daemon.waitFor("people", token, 1)
    props = event["properties"]
    assert (props["$city"], props["$region"], props["mp_country_code"]) == (
        "Willesden",
        "England",
        "GB",
    )
    assert (update["$set"]["$city"], update["$set"]["$country_code"]) == ("Stockholm", "SE")
    assert "mp_country_code" not in update["$set"]
    return event, update


def test_geolocationKeepIP(node: NodeRunner, mixingest: SDKDaemon, token: str) -> None:
    """
    With C{--geoip} the Node SDK's events and profile updates arrive
    located; C{--keep-ip} (the L{mixingest} daemon's) stores the addresses.
    """
    if not any(a.startswith("--geoip=") for a in mixingest.daemon.args):
        pytest.skip("maxminddb-geolite2 (a test extra) is not installed")
    event, update = locate(node, mixingest, token)
    assert event["properties"]["ip"] == PUBLIC
    assert update["$ip"] == PROFILE_IP


def test_geolocationDropsTheAddress(node: NodeRunner, dropsIP: SDKDaemon, token: str) -> None:
    """
    By default (no C{--keep-ip}) the located items hold no address.
    """
    event, update = locate(node, dropsIP, token)
    assert "ip" not in event["properties"]
    assert "$ip" not in update
