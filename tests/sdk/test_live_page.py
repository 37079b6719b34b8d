"""
The C{/live} page of the admin listener in real headless Chromium (Debian's,
driven by playwright-core): while it watches, npm C{mixpanel-browser} (from
page.html, in another tab) and plain HTTP requests send good and bad
events; the page must show each with its token, endpoint, status and
reason, filter and pause, and show no secret and no client address the
daemon did not store.  tests/sdk/live.js drives the browser and saves a
screenshot (C{MIXINGEST_SDK_ARTIFACTS}, else the test's temporary
directory; docs/live.png is a copy).
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List
from urllib.parse import quote

import pytest

from tests.sdk.harness import IMPORT_TOKEN, SECRET, NodeRunner, SDKDaemon, requireTool
from tests.sdk.test_sdk_browser import pageServer  # noqa: F401  (a fixture)

SDK_TOKEN = "tok-live-sdk"
CURL_TOKEN = "tok-live-curl"
WRONG_SECRET = "wrong-live-secret"
ARTIFACTS = "MIXINGEST_SDK_ARTIFACTS"


def b64(records: Any) -> str:
    return quote(base64.b64encode(json.dumps(records).encode()).decode())


def good(name: str, insertId: str) -> Dict[str, Any]:
    return {
        "event": name,
        "properties": {
            "token": CURL_TOKEN,
            "distinct_id": "curl-user",
            "$insert_id": insertId,
            "time": int(time.time() * 1000),
        },
    }


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get(ARTIFACTS)
    directory = Path(configured) if configured else tmp_path_factory.mktemp("artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def seen(
    node: NodeRunner,
    mixingest: SDKDaemon,
    pageServer: str,  # noqa: F811
    artifacts: Path,
) -> Dict[str, Any]:
    chromium = requireTool("chromium", "chromium")
    api = mixingest.http
    bad = {"event": "Bad time", "properties": {"token": CURL_TOKEN, "time": "yesterday"}}
    imported = good("Imported", "imp-1")
    imported["properties"]["token"] = IMPORT_TOKEN
    basic = "Basic " + base64.b64encode(f"{SECRET}:".encode()).decode()
    requests: List[Dict[str, Any]] = [
        {"method": "GET", "url": f"{api}/track?data={b64(good('Curl good', 'c-1'))}"},
        {"method": "GET", "url": f"{api}/track?verbose=1&data={b64([bad])}"},
        {"method": "GET", "url": f"{api}/track?data={b64(good('Curl good', 'c-1'))}"},
        {
            "method": "POST",
            "url": f"{api}/import?strict=1",
            "headers": {"Authorization": basic, "Content-Type": "application/json"},
            "body": json.dumps([imported]),
        },
        {
            "method": "POST",
            "url": f"{api}/import?strict=1&api_key={WRONG_SECRET}",
            "headers": {"Content-Type": "application/json"},
            "body": json.dumps([imported]),
        },
    ]
    screenshot = artifacts / "live.png"
    result: Dict[str, Any] = node.run(
        "live.js",
        {
            "live": f"http://127.0.0.1:{mixingest.daemon.adminPort}/live",
            "chromium": chromium,
            "screenshot": str(screenshot),
            "sdk": [
                {
                    "url": f"{pageServer}/page.html?scenario=send_immediately"
                    f"&api={quote(api)}&token={SDK_TOKEN}"
                }
            ],
            "requests": requests,
            "late": {"method": "GET", "url": f"{api}/track?data={b64(good('Late', 'c-late'))}"},
            "expect": {"accepted": 4, "refused": 2},
            "filterToken": CURL_TOKEN,
        },
        timeout=120,
    )
    result["screenshot"] = screenshot
    return result


def texts(rows: List[Dict[str, Any]]) -> List[str]:
    return [" | ".join(row["cells"]) for row in rows]


def test_pageLoadsNothingFromElsewhere(seen: Dict[str, Any]) -> None:
    assert seen["foreign"] == []
    problems = [c for c in seen["console"] if c.startswith(("error", "pageerror"))]
    assert problems == []
    assert seen["sdkErrors"] == []


def test_acceptedRecordsAppear(seen: Dict[str, Any]) -> None:
    accepted = seen["all"]["accepted"]
    byToken = {(r["token"], r["endpoint"], r["kind"]) for r in accepted}
    assert (SDK_TOKEN, "track", "accepted") in byToken, texts(accepted)
    assert (CURL_TOKEN, "track", "accepted") in byToken
    assert (CURL_TOKEN, "track", "deduplicated") in byToken
    assert (IMPORT_TOKEN, "import", "accepted") in byToken
    sdk = next(r for r in accepted if r["token"] == SDK_TOKEN)
    item = json.loads(sdk["cells"][3])
    assert item["event"] == "Immediate" and item["properties"]["mp_lib"] == "web"
    assert "\n  " in seen["expanded"], "a click pretty-prints the item"
    assert seen["expandedAfterFrame"], "an expanded record stays open as updates arrive"


def test_refusedRecordsShowFieldMessageStatusReason(seen: Dict[str, Any]) -> None:
    refused = seen["all"]["refused"]
    invalid = [r for r in refused if r["token"] == CURL_TOKEN]
    assert len(invalid) == 1, texts(refused)
    _, token, endpoint, status, reason, message = invalid[0]["cells"]
    assert (token, endpoint, status, reason) == (CURL_TOKEN, "track", "200", "invalid")
    assert message.startswith("properties.time: must be a number")
    unauthorised = [r for r in refused if r["endpoint"] == "import"]
    assert [r["cells"][3:5] for r in unauthorised] == [["401", "unauthorised"]]


def test_filters(seen: Dict[str, Any]) -> None:
    byToken = seen["byToken"]
    assert byToken["accepted"] and byToken["refused"]
    assert {r["token"] for r in byToken["accepted"] + byToken["refused"]} == {CURL_TOKEN}
    refusedOnly = seen["byTokenRefused"]
    assert refusedOnly["accepted"] == [] and len(refusedOnly["refused"]) == 1
    byEndpoint = seen["byEndpoint"]
    assert {r["endpoint"] for r in byEndpoint["accepted"] + byEndpoint["refused"]} == {"import"}


def test_pauseHoldsThenCatchesUp(seen: Dict[str, Any]) -> None:
    assert seen["pausedUnchanged"]
    late = [r for r in seen["resumed"]["accepted"] if '"Late"' in " ".join(r["cells"])]
    assert len(late) == 1


def test_noSecretsNorUnstoredAddresses(seen: Dict[str, Any], mixingest: SDKDaemon) -> None:
    """
    No credential anywhere in the page; no client address on a refused
    record; an accepted record shows exactly the item stored, so its
    address only when the daemon's IP policy stored one.
    """
    html = seen["html"]
    for secret in (SECRET, WRONG_SECRET, "Basic "):
        assert secret not in html
    for row in seen["all"]["refused"]:
        assert "127.0.0.1" not in " ".join(row["cells"])
    shown = [r for r in seen["all"]["accepted"] if r["kind"] == "accepted"]
    assert len(shown) >= 3
    for row in shown:
        item = json.loads(row["cells"][3])
        queue = "events"
        stored = [
            i
            for i in mixingest.items(queue, row["token"])
            if i["properties"].get("$insert_id") == item["properties"].get("$insert_id")
        ]
        assert stored == [item]
    sdk = next(r for r in shown if r["token"] == SDK_TOKEN)
    assert json.loads(sdk["cells"][3])["properties"]["ip"] == "127.0.0.1", (
        "the browser SDK sends ip=1: the daemon stores the address, so the page shows it"
    )


def test_totalsAndScreenshot(seen: Dict[str, Any]) -> None:
    totals = {(row[0], row[1]): row[2:] for row in seen["totals"]}
    assert totals[(CURL_TOKEN, "track")][:3] == ["1", "1", "1"]
    screenshot: Path = seen["screenshot"]
    assert screenshot.stat().st_size > 10_000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
