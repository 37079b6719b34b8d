"""
npm C{mixpanel-browser}, unmodified, in real headless Chromium (Debian's,
driven by playwright-core): a page served from one loopback port loads the
SDK's dist build with Mixpanel's own snippet and sends to mixingest on
another port, so every request is cross-origin with credentials.  Each
transport the SDK has (batched XHR, send_immediately, sendBeacon, img, JSONP)
is proven by its items on the queue and by what went over the wire.
tests/sdk/browser.js drives the browser; tests/sdk/page.html is the site.
"""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.sdk.harness import (
    HERE,
    NodeRunner,
    SDKDaemon,
    installedVersion,
    pinnedVersions,
    requireTool,
)

UNUSUAL = "a+b/c=d&e?f%20 é ☃ \U0001f600 ~~~>>>???"
SCENARIOS = [
    "beacon_hide",
    "xhr_batch",
    "send_immediately",
    "people",
    "beacon_transport",
    "img",
    "jsonp",
]
"""
Each runs in a fresh browser context of one Chromium, in this order; the
contexts close at the end, so the beacon sent as the first page unloads has
all the time it needs.
"""


def tokenFor(scenario: str) -> str:
    return "tok-web-" + scenario.replace("_", "-")


BLANK = b"<!doctype html><title>blank</title>"


class _PageHandler(http.server.BaseHTTPRequestHandler):
    files: Dict[str, Path] = {}

    def do_GET(self) -> None:
        name = urlsplit(self.path).path
        path = self.files.get(name)
        if name == "/favicon.ico":
            self.send_response(204)
            self.end_headers()
            return
        if path is None and name != "/blank.html":
            self.send_error(404)
            return
        body = BLANK if path is None else path.read_bytes()
        kind = "text/javascript" if name.endswith(".js") else "text/html"
        self.send_response(200)
        self.send_header("Content-Type", kind + "; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def pageServer(nodeModules: Path) -> Iterator[str]:
    """
    The site: page.html, Mixpanel's snippet and the SDK's dist build from
    node_modules, on a loopback port of its own.
    """
    dist = nodeModules / "node_modules" / "mixpanel-browser" / "dist"
    handler = type(
        "PageHandler",
        (_PageHandler,),
        {
            "files": {
                "/page.html": HERE / "page.html",
                "/mixpanel.min.js": dist / "mixpanel.min.js",
                "/mixpanel-jslib-snippet.min.js": dist / "mixpanel-jslib-snippet.min.js",
            }
        },
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def runBrowser(
    node: NodeRunner, daemon: SDKDaemon, pageServer: str, scenarios: List[Dict[str, Any]]
) -> Dict[str, Any]:
    """
    The scenarios, each in a fresh browser context, in one Chromium.
    """
    chromium = requireTool("chromium", "chromium")
    result: Dict[str, Any] = node.run(
        "browser.js",
        {
            "page": pageServer + "/page.html",
            "origin": pageServer,
            "api": daemon.http,
            "chromium": chromium,
            "scenarios": scenarios,
        },
        timeout=240,
    )
    result["started"] = time.time()
    result["origin"] = pageServer
    return result


@pytest.fixture(scope="module")
def browser(node: NodeRunner, mixingest: SDKDaemon, pageServer: str) -> Dict[str, Any]:
    """
    Every scenario.
    """
    scenarios = [
        {"name": name, "token": tokenFor(name), "hide": name == "beacon_hide"} for name in SCENARIOS
    ]
    return runBrowser(node, mixingest, pageServer, scenarios)


PUBLIC = "81.2.69.142"
"""
The address of the Python SDK's test_geolocation, in Willesden, England, GB
in the GeoLite2 City database of C{maxminddb-geolite2}.
"""
LOCATED_TOKEN = "tok-web-located"


@pytest.fixture(scope="module")
def located(node: NodeRunner, dropsIP: SDKDaemon, pageServer: str) -> Dict[str, Any]:
    """
    The people scenario (an event and profile updates) again, every request
    with C{X-Forwarded-For: PUBLIC}, to a daemon that believes it from
    loopback and keeps no address: a browser behind a public address.
    """
    scenarios = [{"name": "people", "token": LOCATED_TOKEN, "headers": {"X-Forwarded-For": PUBLIC}}]
    return runBrowser(node, dropsIP, pageServer, scenarios)


def scenario(browser: Dict[str, Any], name: str) -> Dict[str, Any]:
    ran: Dict[str, Any] = browser["scenarios"][name]
    assert "error" not in ran, ran["error"]
    results = ran["results"]
    assert results["done"] and results["errors"] == [], results
    foreign = [r["url"] for r in ran["requests"] if r.get("foreign")]
    assert foreign == [], "nothing may leave loopback"
    problems = [c for c in ran["console"] if c.startswith(("error", "pageerror"))]
    assert problems == [], problems
    return ran


def apiRequests(ran: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [r for r in ran["requests"] if not r.get("foreign")]


def query(request: Dict[str, Any]) -> Dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(request["url"]).query).items()}


def checkCORS(browser: Dict[str, Any], request: Dict[str, Any]) -> None:
    """
    A credentialed cross-origin answer the page could read.
    """
    headers = request["responseHeaders"]
    assert headers["access-control-allow-origin"] == browser["origin"]
    assert headers["access-control-allow-credentials"] == "true"


def unique(items: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """
    Events by name, once each: a batch the SDK resent is the same event.
    """
    found: Dict[str, Dict[str, Any]] = {}
    for item in items:
        seen = found.setdefault(item["event"], item)
        assert seen["properties"]["$insert_id"] == item["properties"]["$insert_id"]
    return found


def checkWebEvent(browser: Dict[str, Any], event: Dict[str, Any], token: str) -> None:
    props = event["properties"]
    assert props["token"] == token
    assert props["mp_lib"] == "web"
    assert props["$lib_version"] == pinnedVersions()["mixpanel-browser"]
    assert props["$browser"] == "Chrome"
    assert props["$current_url"].startswith(browser["origin"] + "/page.html?scenario=")
    assert 1 <= len(props["$insert_id"]) <= 36
    # The SDK sends milliseconds; seconds with millisecond precision come
    # back, an integer when the event fell on a whole second (1 in 1000).
    assert type(props["time"]) in (int, float)
    assert abs(props["time"] - browser["started"]) < 120
    assert props["ip"] == "127.0.0.1", "the browser SDK sends ip=1"
    assert props["distinct_id"]


def test_versions(browser: Dict[str, Any], nodeModules: Path) -> None:
    for package in ("mixpanel-browser", "playwright-core"):
        assert installedVersion(nodeModules, package) == pinnedVersions()[package]
    assert browser["browserVersion"]


def test_xhrBatches(browser: Dict[str, Any], mixingest: SDKDaemon) -> None:
    """
    Batched, verbose XHR POSTs of base64 JSON arrays, with a custom header
    (so a CORS preflight) and credentials.
    """
    ran = scenario(browser, "xhr_batch")
    token = tokenFor("xhr_batch")
    requests = apiRequests(ran)
    assert requests
    for request in requests:
        assert (request["method"], request["resourceType"], request["status"]) == (
            "POST",
            "xhr",
            200,
        )
        assert urlsplit(request["url"]).path == "/track/"
        assert query(request)["verbose"] == "1" and query(request)["ip"] == "1"
        assert request["requestHeaders"]["x-mixingest-test"] == "1", "the preflight allowed it"
        assert request["requestHeaders"]["content-type"] == "application/x-www-form-urlencoded"
        assert request["postData"].startswith("data=")
        checkCORS(browser, request)
        assert request["responseHeaders"]["content-type"] == "application/json"
    events = unique(mixingest.waitFor("events", token, 3))
    assert set(events) == {"Batched 1", "Batched 2", "Batched 3"}
    distinctId = ran["results"]["distinct_id"]
    assert distinctId.startswith("$device:")
    for event in events.values():
        checkWebEvent(browser, event, token)
        assert event["properties"]["distinct_id"] == distinctId
        assert event["properties"]["$device_id"] == distinctId[len("$device:") :]
        assert event["properties"]["super"] == "prop"
    first = events["Batched 1"]["properties"]
    assert first["text"] == UNUSUAL, "emoji arrive whole, not as surrogates"
    assert first["nested"] == {"a": [1, 2.5]}


def test_sendImmediately(browser: Dict[str, Any], mixingest: SDKDaemon) -> None:
    """
    C{send_immediately} skips the batch queue: one plain (not verbose) POST
    whose C{1} the callback read through CORS.
    """
    ran = scenario(browser, "send_immediately")
    assert ran["results"]["callbacks"] == {"immediate": 1}
    (request,) = apiRequests(ran)
    assert (request["method"], request["resourceType"], request["status"]) == ("POST", "xhr", 200)
    assert "verbose" not in query(request)
    checkCORS(browser, request)
    (event,) = unique(mixingest.waitFor("events", tokenFor("send_immediately"), 1)).values()
    assert event["event"] == "Immediate"
    assert event["properties"]["text"] == UNUSUAL
    checkWebEvent(browser, event, tokenFor("send_immediately"))


def test_peopleAfterIdentify(browser: Dict[str, Any], mixingest: SDKDaemon) -> None:
    """
    A people update made before C{identify} is held, then sent with the
    rest to /engage/ under the identified id; a group update to /groups/.
    """
    ran = scenario(browser, "people")
    token = tokenFor("people")
    user = "user-" + token
    paths = {urlsplit(r["url"]).path for r in apiRequests(ran)}
    assert paths == {"/track/", "/engage/", "/groups/"}
    for request in apiRequests(ran):
        checkCORS(browser, request)
    (identify,) = mixingest.waitFor("events", token, 1)
    assert identify["event"] == "$identify"
    assert identify["properties"]["distinct_id"] == user
    assert identify["properties"]["$anon_distinct_id"].startswith("$device:")

    people = mixingest.waitFor("people", token, 7)
    ops: Dict[str, List[Dict[str, Any]]] = {}
    for update in people:
        assert update["$token"] == token
        assert update["$distinct_id"] == user
        assert update["$user_id"] == user
        assert update["$device_id"] == ran["results"]["device_id"]
        assert update["$ip"] == "127.0.0.1"
        for op in ("$set", "$set_once", "$add", "$append", "$union", "$remove", "$unset"):
            if op in update:
                ops.setdefault(op, []).append(update[op])
    held = [s for s in ops["$set"] if s.get("plan") == "pro"]
    assert len(held) == 1 and held[0]["text"] == UNUSUAL
    assert {"first_seen": "2024-01-01"} in [
        {k: v for k, v in s.items() if k == "first_seen"} for s in ops["$set_once"]
    ]
    assert ops["$add"] == [{"logins": 2}]
    assert ops["$append"] == [{"pages": "home"}]
    assert ops["$union"] == [{"browsers": ["chromium"]}]
    assert ops["$remove"] == [{"browsers": "firefox"}]
    assert ops["$unset"] == [["obsolete"]]

    (group,) = mixingest.waitFor("groups", token, 1)
    assert (group["$group_key"], group["$group_id"]) == ("company", "acme")
    assert group["$set"] == {"name": "Acme", "text": UNUSUAL}


def test_sendBeaconTransport(browser: Dict[str, Any], mixingest: SDKDaemon) -> None:
    """
    C{api_transport: 'sendBeacon'}: a text/plain POST whose body is a form.
    """
    ran = scenario(browser, "beacon_transport")
    assert ran["results"]["callbacks"] == {"beaconed": 1}
    (request,) = apiRequests(ran)
    assert (request["method"], request["resourceType"], request["status"]) == ("POST", "ping", 200)
    assert request["requestHeaders"]["content-type"] == "text/plain;charset=UTF-8"
    assert request["postData"].startswith("data=")
    (event,) = unique(mixingest.waitFor("events", tokenFor("beacon_transport"), 1)).values()
    assert event["event"] == "Beaconed"
    assert event["properties"]["text"] == UNUSUAL


def test_sendBeaconOnPageHide(browser: Dict[str, Any], mixingest: SDKDaemon) -> None:
    """
    Events still in the batch queue when the page is hidden leave by
    sendBeacon as it unloads, and arrive.
    """
    ran = scenario(browser, "beacon_hide")
    assert [r for r in apiRequests(ran) if r["resourceType"] == "xhr"] == []
    assert ran["results"]["beaconsOnHide"] == [mixingest.http + "/track/"]
    events = unique(mixingest.waitFor("events", tokenFor("beacon_hide"), 2))
    assert set(events) == {"Hidden 1", "Hidden 2"}
    assert events["Hidden 1"]["properties"]["text"] == UNUSUAL
    checkWebEvent(browser, events["Hidden 2"], tokenFor("beacon_hide"))


def test_imgPixel(browser: Dict[str, Any], mixingest: SDKDaemon) -> None:
    """
    C{img: true} (with C{api_method: 'GET'}, the only way the pixel carries
    data): an <img> GET answered with a GIF.
    """
    ran = scenario(browser, "img")
    requests = apiRequests(ran)
    assert len(requests) == 2
    for request in requests:
        assert (request["method"], request["resourceType"], request["status"]) == (
            "GET",
            "image",
            200,
        )
        assert query(request)["img"] == "1" and "data" in query(request)
        assert request["responseHeaders"]["content-type"] == "image/gif"
    events = unique(mixingest.waitFor("events", tokenFor("img"), 2))
    assert set(events) == {"Pixel 1", "Pixel 2"}
    assert events["Pixel 1"]["properties"]["text"] == UNUSUAL


def test_jsonpFallback(browser: Dict[str, Any], mixingest: SDKDaemon) -> None:
    """
    Without CORS XHR the SDK sends <script> GETs with C{callback=}: the
    script calls back with the verbose JSON or the plain C{1}.
    """
    ran = scenario(browser, "jsonp")
    assert ran["results"]["callbacks"] == {
        "verbose": {"status": 1, "error": None},
        "people": {"status": 1, "error": None},
        "plain": 1,
    }
    requests = apiRequests(ran)
    assert len(requests) >= 6
    for request in requests:
        assert (request["method"], request["resourceType"], request["status"]) == (
            "GET",
            "script",
            200,
        )
        callback = query(request)["callback"]
        assert callback.startswith(("mixpanel._jsc[", "mixpanel.plain._jsc["))
        assert request["responseHeaders"]["content-type"] == "text/javascript; charset=utf-8"
    token = tokenFor("jsonp")
    events = unique(mixingest.waitFor("events", token, 5))
    assert set(events) == {
        "JSONP Callback",
        "JSONP Verbose No Callback",
        "$identify",
        "JSONP Plain Callback",
        "JSONP Plain",
    }
    assert events["JSONP Callback"]["properties"]["text"] == UNUSUAL
    people = mixingest.waitFor("people", token, 1)
    assert any(p.get("$set", {}).get("plan") == "jsonp" for p in people)


def test_geolocatedByForwardedFor(located: Dict[str, Any], dropsIP: SDKDaemon) -> None:
    """
    With C{--geoip} the event and the C{$set} updates arrive located by the
    client address the trusted proxy forwarded, and no item holds the
    address (no C{--keep-ip}); C{$set_once}, C{$add}... and C{/groups} are
    not located, as with Mixpanel.
    """
    ran = scenario(located, "people")
    requests = apiRequests(ran)
    assert {urlsplit(r["url"]).path for r in requests} == {"/track/", "/engage/", "/groups/"}
    for request in requests:
        assert request["requestHeaders"]["x-forwarded-for"] == PUBLIC
        assert query(request)["ip"] == "1"
        checkCORS(located, request)
    (identify,) = dropsIP.waitFor("events", LOCATED_TOKEN, 1)
    props = identify["properties"]
    assert identify["event"] == "$identify"
    assert (props["$city"], props["$region"], props["mp_country_code"]) == (
        "Willesden",
        "England",
        "GB",
    )
    assert "ip" not in props

    people = dropsIP.waitFor("people", LOCATED_TOKEN, 7)
    sets = [u["$set"] for u in people if "$set" in u]
    assert any(s.get("plan") == "pro" for s in sets)
    for update in people:
        assert "$ip" not in update
        if "$set" in update:
            where = update["$set"]
            assert (where["$city"], where["$region"], where["$country_code"]) == (
                "Willesden",
                "England",
                "GB",
            )
    setOnce = [u["$set_once"] for u in people if "$set_once" in u]
    assert setOnce and all("$city" not in s and "$country_code" not in s for s in setOnce)
    (group,) = dropsIP.waitFor("groups", LOCATED_TOKEN, 1)
    assert group["$set"] == {"name": "Acme", "text": UNUSUAL}
