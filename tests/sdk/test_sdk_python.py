"""
The official Python SDK (PyPI C{mixpanel}), unmodified, against the real
daemon: every call it reports as a success is on the queue as it was sent.
"""

from __future__ import annotations

import re
import time
from typing import Any, Dict, List

import pytest

from tests.sdk.harness import IMPORT_TOKEN, SECRET, Certificate, SDKDaemon

VERSION = "5.4.1"
"""The release verified here; the sdk tox env installs exactly this."""

UNUSUAL = "a+b/c=d&e?f%20 é ☃ \U0001f600 ~~~>>>???"
"""Text that breaks careless form, base64 and UTF-8 handling."""


@pytest.fixture(scope="module")
def sdk() -> Any:
    try:
        import mixpanel
    except ImportError:
        pytest.fail(
            f"PyPI mixpanel is not installed: `tox -e sdk` installs it"
            f" (pip install mixpanel=={VERSION})",
            pytrace=False,
        )
    assert mixpanel.__version__ == VERSION, f"verified {VERSION}, installed {mixpanel.__version__}"
    return mixpanel


def byEvent(items: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {i["event"]: i for i in items}


def byOperation(items: List[Dict[str, Any]], operations: List[str]) -> Dict[str, Dict[str, Any]]:
    found: Dict[str, Dict[str, Any]] = {}
    for item in items:
        (op,) = [k for k in item if k in operations]
        found[op] = item
    return found


def checkSDKEvent(item: Dict[str, Any], token: str, distinctId: str, sent: float) -> None:
    props = item["properties"]
    assert props["token"] == token
    assert props["distinct_id"] == distinctId
    assert props["mp_lib"] == "python"
    assert re.fullmatch(r"[0-9a-f]{32}", props["$insert_id"])
    assert abs(props["time"] - sent) < 60
    assert "ip" not in props, "the Python SDK sends ip=0"
    assert abs(item["received_at"] - time.time()) < 60


PEOPLE_OPS = ["$set", "$set_once", "$add", "$append", "$union", "$remove", "$unset", "$delete"]
GROUP_OPS = ["$set", "$set_once", "$union", "$remove", "$unset", "$delete"]


def everyCall(mp: Any, token: str) -> float:
    """
    Every tracking, people and group call of the SDK, once; returns when.
    """
    sent = time.time()
    mp.track("u-1", "Signed Up", {"plan": "pro", "text": UNUSUAL, "nested": {"a": [1, 2.5]}})
    mp.track("u-1", "Plain")
    mp.people_set("u-1", {"$name": "Ada", "text": UNUSUAL})
    mp.people_set_once("u-1", {"first_seen": "2024-01-01"})
    mp.people_increment("u-1", {"logins": 1, "score": -2.5})
    mp.people_append("u-1", {"pages": "home"})
    mp.people_union("u-1", {"browsers": ["firefox", "chrome"]})
    mp.people_remove("u-1", {"browsers": "chrome"})
    mp.people_unset("u-1", ["obsolete"])
    mp.people_track_charge("u-1", 29.99, {"sku": "x-1"})
    mp.people_delete("u-2")
    mp.group_set("company", "acme", {"name": "Acme", "text": UNUSUAL})
    mp.group_set_once("company", "acme", {"founded": 1999})
    mp.group_union("company", "acme", {"tags": ["a", "b"]})
    mp.group_remove("company", "acme", {"tags": "b"})
    mp.group_unset("company", "acme", ["obsolete"])
    mp.group_delete("company", "gone")
    return sent


def checkEveryCall(mixingest: SDKDaemon, token: str, sent: float) -> None:
    events = byEvent(mixingest.waitFor("events", token, 2))
    assert set(events) == {"Signed Up", "Plain"}
    signedUp = events["Signed Up"]
    checkSDKEvent(signedUp, token, "u-1", sent)
    assert signedUp["properties"]["text"] == UNUSUAL
    assert signedUp["properties"]["nested"] == {"a": [1, 2.5]}
    assert signedUp["properties"]["plan"] == "pro"

    people = mixingest.waitFor("people", token, 9)
    assert len(people) == 9
    for update in people:
        assert update["$token"] == token
        assert abs(update["$time"] - sent) < 60
        assert "$ip" not in update
    charge = [u for u in people if "$append" in u and "$transactions" in u["$append"]]
    assert len(charge) == 1 and charge[0]["$append"]["$transactions"]["$amount"] == 29.99
    ops = byOperation([u for u in people if u not in charge], PEOPLE_OPS)
    assert ops["$set"]["$set"] == {"$name": "Ada", "text": UNUSUAL}
    assert ops["$set"]["$distinct_id"] == "u-1"
    assert ops["$set_once"]["$set_once"] == {"first_seen": "2024-01-01"}
    assert ops["$add"]["$add"] == {"logins": 1, "score": -2.5}
    assert ops["$append"]["$append"] == {"pages": "home"}
    assert ops["$union"]["$union"] == {"browsers": ["firefox", "chrome"]}
    assert ops["$remove"]["$remove"] == {"browsers": "chrome"}
    assert ops["$unset"]["$unset"] == ["obsolete"]
    assert ops["$delete"]["$distinct_id"] == "u-2"

    groups = byOperation(mixingest.waitFor("groups", token, 6), GROUP_OPS)
    assert set(groups) == set(GROUP_OPS)
    assert groups["$set"]["$set"] == {"name": "Acme", "text": UNUSUAL}
    assert (groups["$set"]["$group_key"], groups["$set"]["$group_id"]) == ("company", "acme")
    assert groups["$set_once"]["$set_once"] == {"founded": 1999}
    assert groups["$union"]["$union"] == {"tags": ["a", "b"]}
    assert groups["$remove"]["$remove"] == {"tags": "b"}
    assert groups["$unset"]["$unset"] == ["obsolete"]
    assert groups["$delete"]["$group_id"] == "gone"


def test_everyCallOverHTTP(sdk: Any, mixingest: SDKDaemon, token: str) -> None:
    """
    C{events_url}, C{people_url} and C{groups_url} point the SDK at a plain
    http listener; each call is one form POST answered with verbose JSON.
    """
    consumer = sdk.Consumer(
        events_url=mixingest.http + "/track",
        people_url=mixingest.http + "/engage",
        groups_url=mixingest.http + "/groups",
        import_url=mixingest.http + "/import",
        retry_limit=0,
        request_timeout=10,
    )
    checkEveryCall(mixingest, token, everyCall(sdk.Mixpanel(token, consumer=consumer), token))


def test_geolocation(sdk: Any, mixingest: SDKDaemon, token: str) -> None:
    """
    Server-side code gives its user's address as the C{ip} property (the
    SDK sends C{ip=0}): with C{--geoip} the event arrives located, as from
    Mixpanel, and a profile C{$set} with C{$ip} too.
    """
    if not any(a.startswith("--geoip=") for a in mixingest.daemon.args):
        pytest.skip("maxminddb-geolite2 (a test extra) is not installed")
    consumer = sdk.Consumer(
        events_url=mixingest.http + "/track",
        people_url=mixingest.http + "/engage",
        retry_limit=0,
        request_timeout=10,
    )
    mp = sdk.Mixpanel(token, consumer=consumer)
    mp.track("u-1", "Located", {"ip": "81.2.69.142"})
    mp.people_set("u-1", {"plan": "pro"}, meta={"$ip": "89.160.20.112"})
    (event,) = mixingest.waitFor("events", token, 1)
    props = event["properties"]
    assert (props["$city"], props["$region"], props["mp_country_code"]) == (
        "Willesden",
        "England",
        "GB",
    )
    (update,) = mixingest.waitFor("people", token, 1)
    assert update["$set"]["$country_code"] == "SE"
    assert "mp_country_code" not in update["$set"]


def test_everyCallOverHTTPS(
    sdk: Any, mixingest: SDKDaemon, certificate: Certificate, token: str
) -> None:
    """
    C{api_host} points the SDK at an ssl: listener; the certificate is
    verified against the test CA.
    """
    consumer = sdk.Consumer(
        api_host=mixingest.httpsHost, verify_cert=str(certificate.ca), request_timeout=10
    )
    checkEveryCall(mixingest, token, everyCall(sdk.Mixpanel(token, consumer=consumer), token))


def test_unverifiedHTTPS(sdk: Any, mixingest: SDKDaemon, token: str) -> None:
    """
    C{verify_cert=False}, for a self-signed certificate without a CA file.
    """
    consumer = sdk.Consumer(api_host=mixingest.httpsHost, verify_cert=False, request_timeout=10)
    with pytest.warns(Warning):
        sdk.Mixpanel(token, consumer=consumer).track("u-9", "Unverified")
    (item,) = mixingest.waitFor("events", token, 1)
    assert item["event"] == "Unverified"


WEEK_AGO = int(time.time()) - 7 * 86400


def importEvents(mp: Any) -> None:
    mp.import_data(None, "u-1", "Legacy Secret", WEEK_AGO, {"text": UNUSUAL}, api_secret=SECRET)
    mp.import_data(None, "u-1", "Float Time", WEEK_AGO + 0.25, api_secret=SECRET)


def checkImported(mixingest: SDKDaemon, extra: List[str]) -> None:
    items = byEvent(mixingest.waitFor("events", IMPORT_TOKEN, 2 + len(extra)))
    legacy = items["Legacy Secret"]
    assert legacy["properties"]["time"] == WEEK_AGO
    assert legacy["properties"]["text"] == UNUSUAL
    assert legacy["properties"]["distinct_id"] == "u-1"
    assert re.fullmatch(r"[0-9a-f]{32}", legacy["properties"]["$insert_id"])
    assert items["Float Time"]["properties"]["time"] == WEEK_AGO + 0.25
    for name in extra:
        assert name in items


def test_importData(sdk: Any, mixingest: SDKDaemon, certificate: Certificate) -> None:
    """
    C{import_data} with the API secret (HTTP Basic C{secret:}), over http
    with C{import_url} and over https with C{api_host}; a service account
    (C{user:secret} and C{project_id}); and C{merge}, which the SDK sends to
    C{/import} without a time.
    """
    plain = sdk.Consumer(import_url=mixingest.http + "/import", retry_limit=0, request_timeout=10)
    importEvents(sdk.Mixpanel(IMPORT_TOKEN, consumer=plain))
    secure = sdk.Consumer(
        api_host=mixingest.httpsHost, verify_cert=str(certificate.ca), request_timeout=10
    )
    mp = sdk.Mixpanel(IMPORT_TOKEN, consumer=secure)
    mp.import_data(None, "u-1", "Over HTTPS", WEEK_AGO, api_secret=SECRET)
    mp.merge(None, "u-1", "u-1-other", api_secret=SECRET)
    credentials = sdk.ServiceAccountCredentials("svc-user", SECRET, "12345")
    account = sdk.Consumer(
        api_host=mixingest.httpsHost,
        verify_cert=str(certificate.ca),
        request_timeout=10,
        credentials=credentials,
    )
    sdk.Mixpanel(IMPORT_TOKEN, consumer=account).import_data(
        None, "u-1", "Service Account", WEEK_AGO
    )
    checkImported(mixingest, ["Over HTTPS", "$merge", "Service Account"])
    merge = byEvent(mixingest.items("events", IMPORT_TOKEN))["$merge"]
    assert merge["properties"]["$distinct_ids"] == ["u-1", "u-1-other"]


def test_importRefusesWrongSecret(sdk: Any, mixingest: SDKDaemon) -> None:
    consumer = sdk.Consumer(import_url=mixingest.http + "/import", retry_limit=0)
    mp = sdk.Mixpanel(IMPORT_TOKEN, consumer=consumer)
    with pytest.raises(sdk.MixpanelException, match="Invalid credentials"):
        mp.import_data(None, "u-1", "Refused", WEEK_AGO, api_secret="wrong")


def test_bufferedConsumer(sdk: Any, mixingest: SDKDaemon, token: str) -> None:
    """
    C{BufferedConsumer} sends a batch (a JSON array) each time 50 calls are
    buffered, and the rest on C{flush}.
    """
    consumer = sdk.BufferedConsumer(
        max_size=50,
        events_url=mixingest.http + "/track",
        people_url=mixingest.http + "/engage",
        groups_url=mixingest.http + "/groups",
        retry_limit=0,
        request_timeout=10,
    )
    mp = sdk.Mixpanel(token, consumer=consumer)
    sent = time.time()
    for n in range(49):
        mp.track(f"u-{n % 7}", "Batched", {"n": n, "text": UNUSUAL})
    assert mixingest.items("events", token) == []
    mp.track("u-0", "Batched", {"n": 49, "text": UNUSUAL})
    assert len(mixingest.waitFor("events", token, 50)) == 50
    for n in range(50, 120):
        mp.track(f"u-{n % 7}", "Batched", {"n": n, "text": UNUSUAL})
        mp.people_set(f"u-{n}", {"n": n})
    mp.group_set("company", "acme", {"n": 1})
    assert len(mixingest.items("events", token)) == 100
    assert len(mixingest.items("people", token)) == 50
    consumer.flush()
    events = mixingest.waitFor("events", token, 120)
    assert sorted(e["properties"]["n"] for e in events) == list(range(120))
    assert len({e["properties"]["$insert_id"] for e in events}) == 120
    for event in events:
        checkSDKEvent(event, token, f"u-{event['properties']['n'] % 7}", sent)
        assert event["properties"]["text"] == UNUSUAL
    people = mixingest.waitFor("people", token, 70)
    assert sorted(p["$set"]["n"] for p in people) == list(range(50, 120))
    (group,) = mixingest.waitFor("groups", token, 1)
    assert group["$set"] == {"n": 1}
