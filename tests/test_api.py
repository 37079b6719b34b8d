"""
The public API, end to end in memory: a real twisted.web Site driven by
StubTreq, with a queue double that records what was stored.
"""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from mixingest import codec
from mixingest.api import UNKNOWN_TOKEN, IngestAPI
from mixingest.auth import ImportSecrets
from mixingest.clientip import ClientAddress
from mixingest.decoding import maxValuesFor
from mixingest.errors import QueueUnavailable, RateLimited
from mixingest.funnel import Funnel
from mixingest.tokens import TokenList

NOW = 1795697832.25
EVENT = {
    "event": "Signed Up",
    "properties": {"token": "tok", "distinct_id": "u1", "time": 1700000000123},
}
B64 = base64.b64encode(json.dumps(EVENT).encode()).decode()
IMPORTED = {"event": "Signed Up", "properties": dict(EVENT["properties"], **{"$insert_id": "i-1"})}
"""
L{EVENT} as /import's JSON body must have it: with an C{$insert_id}.
"""


class MemoryQueue:
    """
    Stores synchronously, or holds or fails writes when told to.
    """

    def __init__(self) -> None:
        self.items: Dict[str, List[bytes]] = {}
        self.failWith: Optional[Exception] = None
        self.held: List[Deferred[None]] = []
        self.hold = False

    def put(self, queue: str, items: Sequence[bytes]) -> Deferred[None]:
        if self.failWith is not None:
            return fail(self.failWith)
        self.items.setdefault(queue, []).extend(items)
        if self.hold:
            d: Deferred[None] = Deferred()
            self.held.append(d)
            return d
        return succeed(None)

    def decoded(self, queue: str = "events") -> List[Dict[str, Any]]:
        return [json.loads(i) for i in self.items.get(queue, [])]


class Harness:
    def __init__(self, **kwargs: Any) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queue = MemoryQueue()
        self.funnel = Funnel(self.queue, self.clock, routes=kwargs.pop("routes", None))
        kwargs.setdefault("maxBody", 100_000)
        self.api = IngestAPI(self.funnel, self.clock, **kwargs)
        self.treq = StubTreq(self.api.resource())

    def call(
        self, method: str, path: str, **kwargs: Any
    ) -> Tuple[int, Dict[bytes, List[bytes]], bytes]:
        result: List[Any] = []
        d = self.treq.request(
            method, "http://mixingest.test" + path, allow_redirects=False, **kwargs
        )
        d.addCallback(lambda r: r.content().addCallback(lambda body: result.append((r, body))))
        self.treq.flush()
        response, body = result[0]
        return response.code, dict(response.headers.getAllRawHeaders()), body


@pytest.fixture
def h() -> Harness:
    return Harness(secrets=ImportSecrets({"tok": "sekrit"}))


def test_getBase64(h: Harness) -> None:
    code, headers, body = h.call("GET", f"/track?data={B64}")
    assert (code, body) == (200, b"1")
    assert headers[b"Content-Type"] == [b"text/plain; charset=utf-8"]
    assert headers[b"Cache-Control"] == [b"no-cache, no-store"]
    (item,) = h.queue.decoded()
    assert item["properties"]["time"] == 1700000000.123
    assert item["received_at"] == NOW


@pytest.mark.parametrize("path", ["/track", "/track/", "/engage/", "/groups", "/import/"])
def test_routesWithAndWithoutSlash(h: Harness, path: str) -> None:
    code, _, _ = h.call("GET", path + "?verbose=1")
    assert code in (200, 401)


def test_verbose(h: Harness) -> None:
    _code, headers, body = h.call("POST", "/track?verbose=1", data={"data": B64})
    assert json.loads(body) == {"status": 1, "error": None}
    assert headers[b"Content-Type"] == [b"application/json"]


def test_partialBatchStoresTheGood(h: Harness) -> None:
    batch = [EVENT, {"event": 5}, EVENT]
    code, _, body = h.call("POST", "/track?verbose=1", data={"data": json.dumps(batch)})
    answer = json.loads(body)
    assert code == 200
    assert answer["status"] == 1
    assert answer["error"].startswith("1 of 3 records failed: #1 event")
    assert answer["failed_records"] == [
        {"index": 1, "field": "event", "message": "missing or empty (must be a non-empty string)"}
    ]
    assert len(h.queue.decoded()) == 2


def test_allInvalid(h: Harness) -> None:
    code, _, body = h.call("GET", "/track?data=" + base64.b64encode(b'{"event":""}').decode())
    assert (code, body) == (200, b"0")
    code, _, body = h.call("GET", "/track?verbose=1&data=W10=")
    assert json.loads(body) == {"status": 0, "error": "data has no records"}
    assert h.queue.items == {}


def test_decodeErrorVerbose(h: Harness) -> None:
    code, _, body = h.call("GET", "/track?verbose=1&data=%21%21")
    assert code == 200
    assert json.loads(body)["error"] == "data is neither JSON nor valid base64 (invalid characters)"


def test_jsonp(h: Harness) -> None:
    code, headers, body = h.call("GET", f"/track/?callback=mixpanel._jsc%5B3%5D&data={B64}")
    assert (code, body) == (200, b"mixpanel._jsc[3](1);")
    assert headers[b"Content-Type"] == [b"text/javascript; charset=utf-8"]


def test_jsonpRefusedNotEchoedNotStored(h: Harness) -> None:
    code, _, body = h.call("GET", f"/track?verbose=1&callback=alert(document.cookie)&data={B64}")
    assert code == 400
    assert b"alert" not in body
    assert h.queue.items == {}


def test_pixel(h: Harness) -> None:
    _code, headers, body = h.call("GET", f"/track?img=1&data={B64}")
    assert headers[b"Content-Type"] == [b"image/gif"]
    assert body.startswith(b"GIF89a")


def test_redirect() -> None:
    h = Harness(redirectHosts=["Example.com"])
    code, headers, _ = h.call("GET", f"/track?redirect=https%3A%2F%2Fexample.com%2Fok&data={B64}")
    assert code == 302
    assert headers[b"Location"] == [b"https://example.com/ok"]
    code, _, _ = h.call("GET", f"/track?redirect=javascript%3Aalert(1)&data={B64}")
    assert code == 400
    assert len(h.queue.decoded()) == 1


REDIRECT_REFUSED = "redirect is only allowed to the hosts given with --redirect-allow"


@pytest.mark.parametrize("data", [f"&data={B64}", ""], ids=["with-data", "without-data"])
def test_redirectOffByDefault(h: Harness, data: str) -> None:
    """
    Without --redirect-allow no redirect is followed, with data or without
    (an open redirect either way): 400 with the reason, nothing stored.
    """
    code, headers, body = h.call(
        "GET", f"/track?verbose=1&redirect=https%3A%2F%2Fanywhere%2F{data}"
    )
    assert (code, json.loads(body)) == (400, {"status": 0, "error": REDIRECT_REFUSED})
    assert b"Location" not in headers
    assert h.queue.items == {}


@pytest.mark.parametrize(
    "target",
    [
        "https://anywhere.example/",
        "https://example.com.evil.example/",
        "https://example.com@evil.example/",
        "http://evil.example/?https://example.com/",
    ],
)
def test_redirectOnlyToAllowedHosts(target: str) -> None:
    h = Harness(redirectHosts=["example.com"])
    code, headers, body = h.call("GET", f"/track?redirect={quote(target, safe='')}&data={B64}")
    assert (code, body) == (400, b"0")
    assert b"Location" not in headers
    assert h.queue.items == {}


def test_cors(h: Harness) -> None:
    _, headers, _ = h.call(
        "POST", "/track", data={"data": B64}, headers={"Origin": "https://shop.example"}
    )
    assert headers[b"Access-Control-Allow-Origin"] == [b"https://shop.example"]
    assert headers[b"Access-Control-Allow-Credentials"] == [b"true"]
    assert headers[b"Vary"] == [b"Origin"]


def test_preflight(h: Harness) -> None:
    code, headers, body = h.call(
        "OPTIONS",
        "/track/",
        headers={
            "Origin": "https://a.example",
            "Access-Control-Request-Headers": "X-Custom, Content-Type",
        },
    )
    assert (code, body) == (200, b"")
    assert headers[b"Access-Control-Allow-Headers"] == [b"X-Custom, Content-Type"]
    assert headers[b"Access-Control-Allow-Methods"] == [b"GET, POST, OPTIONS"]
    assert headers[b"Access-Control-Allow-Origin"] == [b"https://a.example"]


def test_methodNotAllowed(h: Harness) -> None:
    code, headers, _ = h.call("PUT", "/track")
    assert code == 405
    assert headers[b"Allow"] == [b"GET, POST, OPTIONS"]
    assert headers[b"Access-Control-Allow-Origin"] == [b"*"]


@pytest.mark.parametrize("path", ["/", "/trackx", "/track/x", "/../etc/passwd", "/static/x"])
def test_notFound(h: Harness, path: str) -> None:
    assert h.call("GET", path)[0] == 404


def test_ipFromPeer(h: Harness) -> None:
    h.call("GET", f"/track?ip=1&data={B64}", headers={"X-Forwarded-For": "203.0.113.1"})
    h.call("GET", f"/track?ip=0&data={B64}")
    first, second = h.queue.decoded()
    assert first["properties"]["ip"] == "127.0.0.1"
    assert "ip" not in second["properties"]


def test_ipFromTrustedProxy() -> None:
    h = Harness(clientAddress=ClientAddress(["127.0.0.0/8"]))
    h.call("GET", f"/track?ip=1&data={B64}", headers={"X-Forwarded-For": "203.0.113.1"})
    assert h.queue.decoded()[0]["properties"]["ip"] == "203.0.113.1"


def test_engageRecordsIPByDefault(h: Harness) -> None:
    update = {"$token": "tok", "$distinct_id": "u1", "$set": {"plan": "pro"}}
    assert h.call("POST", "/engage", data={"data": json.dumps(update)})[2] == b"1"
    assert h.queue.decoded("people")[0]["$ip"] == "127.0.0.1"


def test_groupsQueue(h: Harness) -> None:
    update = {"$token": "tok", "$group_key": "company", "$group_id": "acme", "$set": {"n": 1}}
    assert h.call("POST", "/groups", data={"data": json.dumps(update)})[2] == b"1"
    assert h.queue.decoded("groups")[0]["$group_id"] == "acme"


def test_gzipBody(h: Harness) -> None:
    body = gzip.compress(b"data=" + B64.encode())
    _code, _, answer = h.call(
        "POST",
        "/track",
        data=body,
        headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
    )
    assert answer == b"1"


def test_bodyTooLarge() -> None:
    h = Harness(maxBody=1000)
    code, _, body = h.call("POST", "/track?verbose=1", data={"data": "x" * 2000})
    assert code == 413
    assert json.loads(body)["error"] == "body exceeds 1000 bytes"


def test_batchTooLarge() -> None:
    h = Harness(maxBatch=2)
    code, _, body = h.call("POST", "/track?verbose=1", data={"data": json.dumps([EVENT] * 3)})
    assert code == 413
    assert "limit is 2" in json.loads(body)["error"]
    assert h.queue.items == {}


def test_queueDown(h: Harness) -> None:
    h.queue.failWith = QueueUnavailable("connection refused")
    code, headers, body = h.call("GET", f"/track?verbose=1&data={B64}")
    assert code == 503
    assert headers[b"Retry-After"] == [b"5"]
    assert json.loads(body) == {"status": 0, "error": "queue unavailable: connection refused"}


def test_rateLimited(h: Harness) -> None:
    def refuse(endpoint: str, items: object) -> None:
        raise RateLimited("over 10 events/s for this token; retry", 2)

    h.funnel.store = refuse  # type: ignore[method-assign]
    result: List[Any] = []
    h.treq.get(f"http://mixingest.test/track?verbose=1&data={B64}").addCallback(result.append)
    h.treq.flush()
    (response,) = result
    assert (response.code, response.phrase) == (429, b"Too Many Requests")
    assert response.headers.getRawHeaders(b"retry-after") == [b"2"]


def test_answerOnlyAfterStored(h: Harness) -> None:
    h.queue.hold = True
    result: List[Any] = []
    h.treq.get(f"http://mixingest.test/track?data={B64}").addCallback(result.append)
    h.treq.flush()
    assert result == []
    h.queue.held[0].callback(None)
    h.treq.flush()
    assert result[0].code == 200


def test_routes() -> None:
    h = Harness(routes={"noisy": "noisy_events"})
    noisy = {"event": "e", "properties": {"token": "noisy"}}
    h.call("POST", "/track", data={"data": json.dumps([EVENT, noisy])})
    assert len(h.queue.decoded("events")) == 1
    assert len(h.queue.decoded("noisy_events")) == 1


def test_importJSON(h: Harness) -> None:
    events = [dict(EVENT, properties=dict(EVENT["properties"], **{"$insert_id": "id-1"}))]
    code, _, body = h.call("POST", "/import?strict=1", json=events, auth=("sekrit", ""))
    assert code == 200
    assert json.loads(body) == {"code": 200, "num_records_imported": 1, "status": "OK"}


def test_importPartialFailure(h: Harness) -> None:
    bad = {"event": "e", "properties": {"token": "tok", "distinct_id": "u", "$insert_id": "bad-1"}}
    code, _, body = h.call("POST", "/import", json=[IMPORTED, bad], auth=("acct", "sekrit"))
    assert code == 400
    assert json.loads(body) == {
        "code": 400,
        "error": "some data points in the request failed validation",
        "failed_records": [
            {
                "index": 1,
                "$insert_id": "bad-1",
                "field": "properties.time",
                "message": "required on /import",
            }
        ],
        "num_records_imported": 1,
        "status": "Bad Request",
    }


def test_importUnauthorized(h: Harness) -> None:
    code, _, body = h.call("POST", "/import", json=[EVENT], auth=("nope", ""))
    assert code == 401
    assert json.loads(body) == {
        "code": 401,
        "error": "Invalid credentials",
        "status": "Unauthorized",
    }
    assert h.queue.items == {}


def test_importDisabled() -> None:
    code, _, body = Harness().call("POST", "/import", json=[EVENT], auth=("x", ""))
    assert code == 401
    assert "--import-secrets" in json.loads(body)["error"]


def test_importLegacyForm(h: Harness) -> None:
    """
    The Python SDK posts /import as a form with api_key and wants status 1.
    """
    code, _, body = h.call(
        "POST", "/import", data={"data": json.dumps([EVENT]), "api_key": "sekrit", "verbose": "1"}
    )
    assert (code, json.loads(body)) == (200, {"status": 1, "error": None})


def test_importNDJSON(h: Harness) -> None:
    body = json.dumps(IMPORTED).encode() + b"\nnot json\n"
    code, _, answer = h.call(
        "POST",
        "/import",
        data=body,
        headers={"Content-Type": "application/x-ndjson"},
        auth=("sekrit", ""),
    )
    result = json.loads(answer)
    assert (code, result["num_records_imported"]) == (400, 1)
    assert result["failed_records"][0]["index"] == 1
    assert "not valid JSON" in result["failed_records"][0]["message"]


# -- --tokens -----------------------------------------------------------------

OTHER = {"event": "e", "properties": {"token": "other", "$insert_id": "x-1"}}


def test_unknownTokenRefusedAlone() -> None:
    """
    With --tokens, a record for another token fails alone, with its reason
    and index, is counted, and is never stored; the others are.
    """
    h = Harness(tokens=TokenList(["tok"]))
    batch = [EVENT, OTHER, {"event": 5}, EVENT]
    code, _, body = h.call("POST", "/track?verbose=1", data={"data": json.dumps(batch)})
    answer = json.loads(body)
    assert (code, answer["status"]) == (200, 1)
    assert answer["failed_records"] == [
        {"index": 1, "field": "properties.token", "message": UNKNOWN_TOKEN},
        {"index": 2, "field": "event", "message": "missing or empty (must be a non-empty string)"},
    ]
    assert [i["properties"]["token"] for i in h.queue.decoded()] == ["tok", "tok"]
    assert h.funnel.rejected == {"unknown_token": 1}


def test_unknownTokenAnyToken() -> None:
    """
    The control: without --tokens, the same record is stored.
    """
    h = Harness()
    h.call("POST", "/track", data={"data": json.dumps([EVENT, OTHER])})
    assert [i["properties"]["token"] for i in h.queue.decoded()] == ["tok", "other"]


def test_unknownTokenOnly() -> None:
    h = Harness(tokens=TokenList(["tok"]))
    code, _, body = h.call("POST", "/track?verbose=1", data={"data": json.dumps(OTHER)})
    answer = json.loads(body)
    assert (code, answer["status"], answer["error"]) == (
        200,
        0,
        f"properties.token: {UNKNOWN_TOKEN}",
    )
    assert h.queue.items == {}


@pytest.mark.parametrize("endpoint, queue", [("engage", "people"), ("groups", "groups")])
def test_unknownTokenUpdates(endpoint: str, queue: str) -> None:
    h = Harness(tokens=TokenList(["tok"]))
    update: Dict[str, Any] = {"$set": {"plan": "pro"}}
    if endpoint == "engage":
        update["$distinct_id"] = "u1"
    else:
        update.update({"$group_key": "k", "$group_id": "g"})
    updates = [dict(update, **{"$token": "other"}), dict(update, **{"$token": "tok"})]
    code, _, body = h.call("POST", f"/{endpoint}?verbose=1", data={"data": json.dumps(updates)})
    answer = json.loads(body)
    assert (code, answer["status"]) == (200, 1)
    assert answer["failed_records"] == [{"index": 0, "field": "$token", "message": UNKNOWN_TOKEN}]
    assert [u["$token"] for u in h.queue.decoded(queue)] == ["tok"]


def test_unknownTokenImport() -> None:
    """
    On /import the secret's tokens and --tokens both apply; the failure
    names the record's $insert_id.
    """
    h = Harness(
        secrets=ImportSecrets({"tok": "sekrit", "other": "sekrit"}), tokens=TokenList(["tok"])
    )
    other = {
        "event": "e",
        "properties": {
            "token": "other",
            "distinct_id": "u",
            "time": 1700000000,
            "$insert_id": "o-1",
        },
    }
    code, _, body = h.call("POST", "/import", json=[other, IMPORTED], auth=("sekrit", ""))
    answer = json.loads(body)
    assert (code, answer["num_records_imported"]) == (400, 1)
    assert answer["failed_records"] == [
        {"index": 0, "$insert_id": "o-1", "field": "properties.token", "message": UNKNOWN_TOKEN}
    ]


# -- bounded decoding ---------------------------------------------------------


def test_tooManyValuesRefusedBeforeParsing(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A batch of millions of tiny records is refused from a count of its
    commas and brackets, never parsed; under the bound, a batch over
    --max-batch is parsed and refused by its length.
    """
    parsed: List[int] = []
    loads = codec.loads
    monkeypatch.setattr(codec, "loads", lambda data: parsed.append(len(data)) or loads(data))
    h = Harness(maxBody=10_000_000, maxBatch=10)
    tiny = b"[" + b"{}," * (maxValuesFor(10) // 2) + b"{}]"
    code, _, body = h.call("POST", "/track?verbose=1", data=tiny)
    assert (code, json.loads(body)["error"]) == (
        413,
        f"data holds more than {maxValuesFor(10)} JSON values; send fewer records per request",
    )
    assert parsed == []
    code, _, body = h.call("POST", "/track?verbose=1", data=json.dumps([EVENT] * 11))
    assert (code, json.loads(body)["error"]) == (413, "11 records in one request; the limit is 10")
    assert len(parsed) == 1


def test_ndjsonOverMaxBatch(h: Harness) -> None:
    """
    An ndjson body is refused at the first line past --max-batch.
    """
    h = Harness(secrets=ImportSecrets({"tok": "sekrit"}), maxBatch=3)
    lines = b"\n".join([json.dumps(EVENT).encode()] * 4) + b"\n"
    code, _, answer = h.call(
        "POST",
        "/import",
        data=lines,
        headers={"Content-Type": "application/x-ndjson"},
        auth=("sekrit", ""),
    )
    assert (code, json.loads(answer)["error"]) == (
        413,
        "more than 3 records in one request; the limit is 3",
    )


def test_gzipMembersAfterTheFirst(h: Harness) -> None:
    """
    A second gzip member would be ignored by a plain inflate: its events
    would be answered 1 and lost.  It is an error instead.
    """
    body = gzip.compress(b"data=" + B64.encode()) + gzip.compress(b"&more=1")
    code, _, answer = h.call(
        "POST", "/track?verbose=1", data=body, headers={"Content-Encoding": "gzip"}
    )
    assert (code, json.loads(answer)["error"]) == (
        200,
        "gzip body has data after its end; send one gzip member",
    )
    assert h.queue.items == {}
