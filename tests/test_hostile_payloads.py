"""
Hostile payloads against the decoder, the cleaner and the answers, in process:
each one is either cleaned, or refused with a reason, never an unexpected
exception, and whatever is stored is strict JSON within the documented limits.

The same payloads go over real sockets in L{tests.test_hostile_requests}.
"""

from __future__ import annotations

import gzip
import json
from typing import Any, List
from urllib.parse import quote_from_bytes

import pytest
from twisted.web.test.requesthelper import DummyRequest

from mixingest import codec
from mixingest.answers import AnswerStyle, answerStyle, importAnswer
from mixingest.cleaning import MAX_ITEM_BYTES, Cleaned, Context, clean
from mixingest.decoding import decodeData, decodeRequest, decompress, parseParams
from mixingest.errors import BadAnswerParameter, BodyTooLarge, DecodeError, InvalidEvent

MAX_BODY = 1024 * 1024
CONTEXT = Context(1700000000.5)


def strictJSON(payload: bytes) -> Any:
    """
    Parse as a consumer in any language would: NaN and Infinity are errors.
    """

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(payload.decode("utf-8"), parse_constant=refuse)


def cleanOne(endpoint: str, record: Any) -> Cleaned:
    cleaned = clean(endpoint, [record], CONTEXT)
    for item in cleaned.items:
        assert isinstance(strictJSON(item.payload), dict)
        assert len(item.payload) <= MAX_ITEM_BYTES
    return cleaned


def event(**props: Any) -> dict:  # type: ignore[type-arg]
    return {"event": "e", "properties": {"token": "t", **props}}


def update(**fields: Any) -> dict:  # type: ignore[type-arg]
    return {"$token": "t", "$distinct_id": "d", "$set": {"a": 1}, **fields}


def group(**fields: Any) -> dict:  # type: ignore[type-arg]
    return {"$token": "t", "$group_key": "k", "$group_id": "g", "$set": {"a": 1}, **fields}


# -- the form and query parser ------------------------------------------------


@pytest.mark.parametrize("where", ["query", "form"], ids=["query", "form"])
def test_nonASCIIFormData(where: str) -> None:
    """
    The Python SDK posts C{data=<urlencoded raw JSON>}: a non-ASCII character
    arrives as UTF-8 percent-escapes and must decode, not be refused as too
    many parameters (urllib's parse_qsl chokes on non-ASCII bytes input).
    """
    raw = json.dumps(event(name="café ☕ 🎉"), ensure_ascii=False).encode("utf-8")
    form = b"data=" + quote_from_bytes(raw).encode("ascii") + b"&verbose=1&lang=%C3%A9"
    if where == "query":
        decoded = decodeRequest(form, b"", None, MAX_BODY)
    else:
        decoded = decodeRequest(b"", form, None, MAX_BODY)
    assert decoded.items[0]["properties"]["name"] == "café ☕ 🎉"
    assert decoded.params == {"verbose": "1", "lang": "é"}


def test_rawNonASCIIFormBody() -> None:
    """
    Unescaped UTF-8 in a form body (sendBeacon bodies are not always
    escaped) decodes too; invalid UTF-8 in a parameter is replaced.
    """
    raw = json.dumps(event(name="naïve"), ensure_ascii=False).encode("utf-8")
    decoded = decodeRequest(b"", b"data=" + raw + b"&x=\xff", None, MAX_BODY)
    assert decoded.items[0]["properties"]["name"] == "naïve"
    assert decoded.params["x"] == "\ufffd"


def test_invalidUTF8InData() -> None:
    with pytest.raises(DecodeError, match="not valid JSON"):
        decodeRequest(b"", b'data={"event":"\xff\xfe"}', None, MAX_BODY)


# -- JSON that is not what it should be ---------------------------------------


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"not base64 at all!", "neither JSON nor valid base64"),
        (b"abcde", "bad length"),
        (b"MTIz", "must be a JSON object or array"),
        (b'{"event":', "not valid JSON"),
        (b"[1,2", "not valid JSON"),
        (b'"a string"', "neither JSON nor valid base64"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b"[" + b"9" * 100_000 + b"]", "not valid JSON"),
        (b"{}{}", "not valid JSON"),
        (b"\x00\x00", "neither JSON nor valid base64"),
        (b'{"event":"a\x00b"}', "not valid JSON"),
        (b"", "missing or empty"),
        (b"   ", "missing or empty"),
    ],
    ids=[
        "invalid-base64",
        "base64-bad-length",
        "base64-not-json",
        "truncated-object",
        "truncated-array",
        "json-string",
        "deep-array",
        "deep-object",
        "deep-unclosed",
        "huge-integer",
        "two-documents",
        "nul-bytes",
        "raw-nul-in-string",
        "empty",
        "blank",
    ],
)
def test_undecodable(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decodeData(data)


def test_deepNestingStdlibCodec(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    PyPy decodes with the stdlib json: 100,000 levels are a clean error there
    too, not a RecursionError.
    """
    decoder = json.JSONDecoder()

    def loads(data: Any) -> Any:
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        try:
            return decoder.decode(data)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None

    if codec.CODEC_NAME != "json":
        monkeypatch.setattr(codec, "loads", loads)
    for data in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        with pytest.raises(DecodeError, match="not valid JSON"):
            decodeData(data)


def test_dataTwice() -> None:
    with pytest.raises(DecodeError, match="more than once"):
        decodeRequest(b"data=%7B%7D", b"data=%7B%7D", None, MAX_BODY)
    with pytest.raises(DecodeError, match="more than once"):
        decodeRequest(b"data=%7B%7D&data=%7B%7D", b"", None, MAX_BODY)
    with pytest.raises(DecodeError, match="both in the query and as a JSON body"):
        decodeRequest(b"data=%7B%7D", b"{}", None, MAX_BODY)


# -- bodies -------------------------------------------------------------------


def test_gzipBombBySize() -> None:
    bomb = gzip.compress(b"[" + b" " * (4 * MAX_BODY) + b"]")
    with pytest.raises(BodyTooLarge, match="once decompressed"):
        decompress(bomb, MAX_BODY)


def test_gzipBombByRatio() -> None:
    """
    Under the size limit but inflating more than 1000 times: refused.
    """
    bomb = gzip.compress(b" " * (8 * 1024 * 1024), 9)
    with pytest.raises(BodyTooLarge, match="times its size"):
        decompress(bomb, 16 * 1024 * 1024)


def test_notReallyGzip() -> None:
    with pytest.raises(DecodeError, match="not valid gzip"):
        decodeRequest(b"", b'{"event":"e"}', b"gzip", MAX_BODY)
    with pytest.raises(DecodeError, match="truncated"):
        decodeRequest(b"", gzip.compress(b'{"event":"e"}')[:-12], b"gzip", MAX_BODY)
    with pytest.raises(DecodeError, match="unsupported Content-Encoding"):
        decodeRequest(b"", b'{"event":"e"}', b"br", MAX_BODY)


# -- wrong types and values in every field -----------------------------------


@pytest.mark.parametrize(
    "endpoint, record, field",
    [
        ("track", [], ""),
        ("track", "event", ""),
        ("track", None, ""),
        ("track", {"event": {"a": 1}, "properties": {"token": "t"}}, "event"),
        ("track", {"event": "", "properties": {"token": "t"}}, "event"),
        ("track", {"event": "e", "properties": ["token", "t"]}, "properties"),
        ("track", {"event": "e", "properties": {"token": 5}}, "properties.token"),
        ("track", event(time="yesterday"), "properties.time"),
        ("track", event(time=True), "properties.time"),
        ("track", event(time=float("nan")), "properties.time"),
        ("track", event(time=float("inf")), "properties.time"),
        ("track", event(time=-1), "properties.time"),
        ("track", event(distinct_id={"a": 1}), "properties.distinct_id"),
        ("track", event(distinct_id=""), "properties.distinct_id"),
        ("track", event(**{"$insert_id": "no spaces allowed"}), "properties.$insert_id"),
        ("track", event(**{"$insert_id": 12}), "properties.$insert_id"),
        ("track", event(x=float("nan")), "properties.x"),
        ("track", event(x=float("-inf")), "properties.x"),
        ("track", event(x=2**63), "properties.x"),
        ("track", event(x=-(2**63) - 1), "properties.x"),
        ("track", event(x=[[[[1]]]]), "properties.x.0.0.0"),
        ("track", event(x=list(range(300))), "properties.x"),
        ("track", event(x=["\ud800"]), "properties.x"),
        ("track", event(x={"k": ["\udfff"]}), "properties.x"),
        ("track", event(**{f"p{i}": i for i in range(3000)}), "properties"),
        ("track", {**event(), "extra": float("nan")}, "extra"),
        ("track", {**event(), "extra": 2**70}, "extra"),
        ("track", {**event(), "extra": [[[[[1]]]]]}, "extra.0.0.0"),
        ("engage", update(**{"$distinct_id": 2**80}), "$distinct_id"),
        ("engage", update(**{"$latitude": float("inf")}), "$latitude"),
        ("engage", update(**{"$time": "now"}), "$time"),
        ("engage", {"$token": "t", "$distinct_id": "d", "$delete": float("nan")}, "$delete"),
        ("engage", {"$token": "t", "$distinct_id": "d", "$set": ["a"]}, "$set"),
        ("engage", {"$token": "t", "$distinct_id": "d", "$add": {"a": "1"}}, "$add"),
        ("engage", {"$token": "t", "$distinct_id": "d", "$unset": "a"}, "$unset"),
        ("engage", {"$token": "t", "$distinct_id": "d"}, ""),
        ("engage", {"$token": ["t"], "$distinct_id": "d", "$set": {}}, "$token"),
        ("groups", group(**{"$group_id": 1.5}), "$group_id"),
        ("groups", group(z=[[[[[[1]]]]]]), "z.0.0.0"),
        ("groups", group(z=float("nan")), "z"),
    ],
)
def test_invalidRecord(endpoint: str, record: Any, field: str) -> None:
    cleaned = cleanOne(endpoint, record)
    assert not cleaned.items
    [(index, error, _)] = cleaned.failures
    assert index == 0
    assert isinstance(error, InvalidEvent)
    assert error.field == field, str(error)
    assert error.message


@pytest.mark.parametrize(
    "record",
    [
        event(s="x" * 100_000),
        event(**{"k" * 1000: 1}),
        {"event": "n" * 10_000, "properties": {"token": "t"}},
        event(x=1e308, y=-(2**63), z=2**63 - 1, nul="a\x00b", emoji="🎉"),
        event(x=[[["deep enough"]]]),
        {**event(), "extra": {"fine": [1, 2]}},
        event(**{f"p{i}": i for i in range(250)}),
    ],
    ids=["huge-string", "long-name", "long-event", "extremes", "depth-3", "extra", "250-props"],
)
def test_acceptedExtremes(record: Any) -> None:
    """
    What Mixpanel truncates is truncated and stored, never refused.
    """
    cleaned = cleanOne("track", record)
    assert cleaned.items, cleaned.failures
    stored = strictJSON(cleaned.items[0].payload)
    assert len(stored["event"]) <= 255
    assert all(len(k) <= 255 for k in stored["properties"])


def test_goodBesideBad() -> None:
    records: List[Any] = [event(i=i) for i in range(5)]
    records[1:1] = [event(x=float("nan")), "junk", event(x=["\ud800"])]
    cleaned = clean("track", records, CONTEXT)
    assert [strictJSON(i.payload)["properties"]["i"] for i in cleaned.items] == list(range(5))
    assert [i for i, _, _ in cleaned.failures] == [1, 2, 3]


# -- answers never fail on what they reflect ----------------------------------


def test_verboseAnswerWithLoneSurrogate() -> None:
    """
    A failure reason naming a property whose name is a lone surrogate is
    still answered as JSON.
    """
    cleaned = cleanOne("track", event(**{"\ud800": float("nan")}))
    [(_, error, _)] = cleaned.failures
    request = DummyRequest([b"track"])
    body = AnswerStyle(verbose=True).answer(request, 200, False, str(error))
    assert json.loads(body)["status"] == 0


def test_importAnswerWithLoneSurrogate() -> None:
    record = {
        "event": "e",
        "properties": {"token": "t", "time": 1700000000, "$insert_id": "\ud800", "\udc00": 1},
    }
    cleaned = clean("import", [record], Context(1700000000.5, None, frozenset(["t"])))
    request = DummyRequest([b"import"])
    body = importAnswer(request, 400, "failed", 0, cleaned.failures)
    assert json.loads(body)["failed_records"][0]["index"] == 0


# -- callback and redirect ----------------------------------------------------


@pytest.mark.parametrize(
    "redirect",
    [
        "javascript:alert(1)",
        " javascript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "//evil.example/",
        "http:evil",
        "http://a.example/\x00x",
        "http://a.example/\x0bx",
        "http://a.example/\x7f",
        "http://a.example/\r\nSet-Cookie: x=1",
        "http://a.example/ x",
        "http://a.example\\@evil/",
        "http://a.example/é",
    ],
)
def test_unsafeRedirect(redirect: str) -> None:
    with pytest.raises(BadAnswerParameter, match="redirect must be"):
        answerStyle({"redirect": redirect})


@pytest.mark.parametrize(
    "callback",
    [
        "alert(1)//",
        "a;alert(1)",
        "a\n",
        "</script><script>alert(1)</script>",
        "a.b[c]",
        "1abc",
        "a" * 200,
        "a.",
        "ä",
    ],
)
def test_unsafeCallback(callback: str) -> None:
    with pytest.raises(BadAnswerParameter, match="callback must be"):
        answerStyle({"callback": callback})


@pytest.mark.parametrize("callback", ["cb_1", "mpmetrics.jsonp_callback", "mixpanel._jsc[3]", "$"])
def test_safeCallback(callback: str) -> None:
    request = DummyRequest([b"track"])
    body = answerStyle({"callback": callback}).success(request)
    assert body == callback.encode() + b"(1);"


def test_parseParamsPastTheLimit() -> None:
    """
    A request refused for too many parameters is still answered in the style
    its first parameters ask for.
    """
    query = b"verbose=1&" + b"&".join(b"p%d=" % i for i in range(500))
    with pytest.raises(DecodeError, match="more than 100 parameters"):
        decodeRequest(query, b"", None, MAX_BODY)
    assert parseParams(query)["verbose"] == "1"


@pytest.mark.parametrize("token", [["t"], {"t": 1}, 5, None])
def test_importTokenOfWrongType(token: Any) -> None:
    """
    An unhashable token on /import is an invalid record, not a TypeError.
    """
    record = {"event": "e", "properties": {"token": token, "time": 1700000000}}
    cleaned = clean("import", [record], Context(1700000000.5, None, frozenset(["t", "u"])))
    [(_, error, _)] = cleaned.failures
    assert error.field == "properties.token"
