"""
What the official SDKs send that mixingest once handled wrongly, each pinned
by a unit test beside the end-to-end proof in tests/sdk (which runs only in
`tox -e sdk`).  The requests here are the SDKs' own, byte for byte where it
matters.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from typing import Any, Dict, List, Sequence, Tuple

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from mixingest.api import IngestAPI
from mixingest.auth import ImportSecrets
from mixingest.cleaning import Context, clean
from mixingest.funnel import Funnel

NOW = 1795697832.25
TOKEN = "tok"
SECRET = "sekrit"


class Queue:
    def __init__(self) -> None:
        self.items: Dict[str, List[bytes]] = {}

    def put(self, queue: str, items: Sequence[bytes]) -> Deferred[None]:
        self.items.setdefault(queue, []).extend(items)
        return succeed(None)

    def decoded(self, queue: str = "events") -> List[Dict[str, Any]]:
        return [json.loads(i) for i in self.items.get(queue, [])]


class Harness:
    def __init__(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        self.queue = Queue()
        api = IngestAPI(
            Funnel(self.queue, clock),
            clock,
            maxBody=1_000_000,
            secrets=ImportSecrets({TOKEN: SECRET}),
        )
        self.treq = StubTreq(api.resource())

    def call(self, method: str, path: str, **kwargs: Any) -> Tuple[int, Dict[bytes, Any], bytes]:
        result: List[Any] = []
        d = self.treq.request(method, "http://127.0.0.1" + path, allow_redirects=False, **kwargs)
        d.addCallback(lambda r: r.content().addCallback(lambda body: result.append((r, body))))
        self.treq.flush()
        response, body = result[0]
        return response.code, dict(response.headers.getAllRawHeaders()), body


@pytest.fixture
def h() -> Harness:
    return Harness()


def basic(user: str, password: str = "") -> Dict[str, str]:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": "Basic " + encoded}


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def test_mergeWithoutTimeIsImported() -> None:
    """
    Python's C{Mixpanel.merge} sends C{$merge} to /import with no C{time}, as
    Mixpanel's identity-merge reference does; Mixpanel accepts it, so it is
    stored with the receive time instead of being refused.
    """
    record = {"event": "$merge", "properties": {"$distinct_ids": ["a", "b"], "token": TOKEN}}
    cleaned = clean("import", [record], Context(NOW, None, frozenset({TOKEN})))
    assert cleaned.failures == []
    (item,) = [json.loads(i.payload) for i in cleaned.items]
    assert item["properties"]["time"] == NOW
    assert item["properties"]["$distinct_ids"] == ["a", "b"]


def test_otherImportsStillNeedTime() -> None:
    record = {"event": "Signed Up", "properties": {"token": TOKEN}}
    cleaned = clean("import", [record], Context(NOW, None, frozenset({TOKEN})))
    ((_, error, _),) = cleaned.failures
    assert error.field == "properties.time"


def test_pythonMergeOverTheWire(h: Harness) -> None:
    """
    The exact request PyPI mixpanel 5.4.1 sends for C{merge(None, "a", "b",
    api_secret=...)}: form body with C{verbose=1}, Basic C{secret:}.
    """
    event = {"event": "$merge", "properties": {"$distinct_ids": ["a", "b"], "token": TOKEN}}
    body = urllib.parse.urlencode({"data": json.dumps(event), "verbose": 1, "ip": 0})
    code, _, answer = h.call(
        "POST", "/import", data=body.encode(), headers={**FORM, **basic(SECRET)}
    )
    assert (code, json.loads(answer)) == (200, {"status": 1, "error": None})
    (item,) = h.queue.decoded()
    assert item["event"] == "$merge"


def test_refusalHonoursVerboseInTheBody(h: Harness) -> None:
    """
    The Python SDK sends C{verbose=1} in the form body, not the query, and
    reads every answer as JSON: a refused /import (wrong secret) must be
    verbose JSON too, or the SDK dies with a TypeError on C{0["status"]}
    instead of raising C{MixpanelException("Invalid credentials")}.
    """
    event = {"event": "e", "properties": {"token": TOKEN, "time": 1700000000}}
    body = urllib.parse.urlencode({"data": json.dumps(event), "verbose": 1, "ip": 0})
    code, headers, answer = h.call(
        "POST", "/import", data=body.encode(), headers={**FORM, **basic("wrong")}
    )
    assert code == 401
    assert headers[b"Content-Type"] == [b"application/json"]
    assert json.loads(answer) == {"status": 0, "error": "Invalid credentials"}
    assert h.queue.items == {}


def test_refusalWithoutVerboseStaysPlain(h: Harness) -> None:
    """
    The Node SDK (verbose off) needs the classic C{0}.
    """
    event = {"event": "e", "properties": {"token": TOKEN, "time": 1700000000}}
    data = base64.b64encode(json.dumps([event]).encode()).decode()
    code, _, answer = h.call(
        "POST",
        "/import?ip=0&verbose=0",
        data=f"data={data}".encode(),
        headers={**FORM, **basic("x")},
    )
    assert (code, answer) == (401, b"0")


def cesu8(text: str) -> bytes:
    """
    UTF-8 one UTF-16 code unit at a time, as mixpanel-browser's
    C{_.utf8Encode} does before base64 (CESU-8).
    """
    units = text.encode("utf-16-le", "surrogatepass")
    halves = "".join(
        chr(int.from_bytes(units[i : i + 2], "little")) for i in range(0, len(units), 2)
    )
    return halves.encode("utf-8", "surrogatepass")


def browserBase64(value: Any) -> str:
    return base64.b64encode(cesu8(json.dumps(value, ensure_ascii=False))).decode()


EMOJI = "smile \U0001f600 snow \u2603 \U0001f1eb\U0001f1f7"


def test_cesu8IsWhatTheBrowserSDKSends() -> None:
    assert cesu8("\U0001f600") == b"\xed\xa0\xbd\xed\xb8\x80"
    assert cesu8("\u2603 \xe9") == "\u2603 \xe9".encode()


def test_browserEmojiDecoded() -> None:
    """
    mixpanel-browser (base64, the default for a non-mixpanel.com api_host)
    sends each emoji as two encoded surrogates; they are joined back into the
    character instead of the event being refused for a lone surrogate.
    """
    from mixingest.decoding import decodeData

    (record,) = decodeData(browserBase64({"event": EMOJI, "properties": {"t": EMOJI}}).encode())
    assert record == {"event": EMOJI, "properties": {"t": EMOJI}}


def test_browserEmojiOverTheWire(h: Harness) -> None:
    """
    A batch as mixpanel-browser 2.83.0 posts it: /track/?verbose=1&ip=1&_=...,
    body data=<encodeURIComponent(base64)>.
    """
    batch = [
        {"event": "Batched 1", "properties": {"token": TOKEN, "text": EMOJI, "time": NOW}},
        {"event": "Batched 2", "properties": {"token": TOKEN, "n": 2, "time": NOW}},
    ]
    body = "data=" + urllib.parse.quote(browserBase64(batch), safe="")
    code, _, answer = h.call(
        "POST", "/track/?verbose=1&ip=1&_=1795708193002", data=body.encode(), headers=FORM
    )
    assert (code, json.loads(answer)) == (200, {"status": 1, "error": None})
    first, second = h.queue.decoded()
    assert first["properties"]["text"] == EMOJI
    assert second["properties"]["n"] == 2


def test_unpairedSurrogateStillRefused() -> None:
    from mixingest.cleaning import Context, clean
    from mixingest.decoding import decodeData

    lone = base64.b64encode(b'{"event":"e","properties":{"token":"tok","t":"\xed\xa0\xbd"}}')
    records = decodeData(lone)
    ((_, error, _),) = clean("track", records, Context(NOW)).failures
    assert "surrogate" in error.message
