"""
Properties of the decoder and the cleaner over arbitrary input, with both JSON
codecs (ujson on CPython, the stdlib json that PyPy uses):

 - any bytes in: decoded records, or L{DecodeError} / L{BodyTooLarge}, never
   another exception;
 - any JSON-ish records in: cleaned items or L{InvalidEvent} failures, one or
   the other for every record, never another exception;
 - every cleaned item is strict JSON (no NaN or Infinity, valid UTF-8), a JSON
   object, within the per-item size limit, and within Mixpanel's limits on
   names, strings, property counts and nesting;
 - the SDK encodings (raw JSON, base64 in its dialects, forms, gzip) of the
   same records decode to the same records.
"""

from __future__ import annotations

import base64
import copy
import gzip
import importlib
import importlib.util
import json
import platform
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List
from urllib.parse import quote_from_bytes

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixingest import codec
from mixingest.cleaning import (
    MAX_DEPTH,
    MAX_ITEM_BYTES,
    MAX_NAME,
    MAX_PROPERTIES,
    MAX_STRING,
    Context,
    clean,
)
from mixingest.decoding import decodeData, decodeRequest
from mixingest.errors import BodyTooLarge, DecodeError, InvalidEvent

MAX_BODY = 64 * 1024
CONTEXT = Context(1700000000.25, "127.0.0.1", frozenset(["tok"]))
PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _stdlibCodec() -> Any:
    """
    L{mixingest.codec} as PyPy loads it (the stdlib json), as a separate
    module object.
    """
    spec = importlib.util.find_spec("mixingest.codec")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    real = platform.python_implementation
    platform.python_implementation = lambda: "PyPy"
    try:
        spec.loader.exec_module(module)
    finally:
        platform.python_implementation = real
    assert module.CODEC_NAME == "json"
    return module


STDLIB = _stdlibCodec()


@contextmanager
def stdlibCodec() -> Iterator[None]:
    """
    Decode and encode with the stdlib json, as on PyPy.
    """
    saved = codec.loads, codec.dumps
    codec.loads, codec.dumps = STDLIB.loads, STDLIB.dumps
    try:
        yield
    finally:
        codec.loads, codec.dumps = saved


def bothCodecs(check: Callable[[], None]) -> None:
    check()
    with stdlibCodec():
        check()


def strict(payload: bytes) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} in a stored item")

    return json.loads(payload.decode("utf-8"), parse_constant=refuse)


# Any text, lone surrogates and NUL included.
anyText = st.text(st.characters(blacklist_categories=()), max_size=40)
longText = st.one_of(anyText, st.builds(lambda c, n: c * n, anyText, st.integers(0, 400)))


def jsonishOf(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.sampled_from([2**63 - 1, -(2**63), 2**63, -(2**63) - 1]),
        st.floats(allow_nan=True, allow_infinity=True),
        text,
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=6),
            st.dictionaries(text, inner, max_size=6),
        ),
        max_leaves=30,
    )


def eventsOf(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    jsonish = jsonishOf(text)
    times = st.one_of(
        st.integers(-10, 10**15),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([1700000000, 1700000000.5, 1700000000123, "1700000000", None, True]),
    )
    properties = st.fixed_dictionaries(
        {},
        optional={
            "token": st.one_of(st.just("tok"), jsonish),
            "time": times,
            "distinct_id": st.one_of(st.just("u1"), jsonish),
            "$insert_id": st.one_of(st.just("abc-123"), jsonish),
            "ip": jsonish,
        },
    ).flatmap(
        lambda fixed: st.dictionaries(text, jsonish, max_size=8).map(lambda more: {**more, **fixed})
    )
    return st.one_of(
        st.fixed_dictionaries(
            {"event": st.one_of(st.just("Signed Up"), text, jsonish), "properties": properties},
            optional={"extra": jsonish, "received_at": jsonish},
        ),
        jsonish,
    )


jsonish = jsonishOf(longText)
events = eventsOf(longText)
smallEvents = eventsOf(anyText)

operations = st.sampled_from(
    ["$set", "$set_once", "$add", "$append", "$union", "$remove", "$unset", "$delete"]
)
updates = st.builds(
    lambda token, ident, op, value, more: {
        **more,
        "$token": token,
        "$distinct_id": ident,
        "$group_key": ident,
        "$group_id": ident,
        op: value,
    },
    st.one_of(st.just("tok"), jsonish),
    st.one_of(st.just("u1"), st.integers(-(2**65), 2**65), jsonish),
    operations,
    st.one_of(st.dictionaries(longText, jsonish, max_size=5), jsonish),
    st.dictionaries(st.sampled_from(["$time", "$ip", "$latitude", "x", "$set"]), jsonish),
)


def checkCleaned(endpoint: str, records: List[Any]) -> None:
    cleaned = clean(endpoint, copy.deepcopy(records), CONTEXT)
    assert len(cleaned.items) + len(cleaned.failures) == len(records)
    for _, error, insertId in cleaned.failures:
        assert isinstance(error, InvalidEvent)
        assert insertId is None or isinstance(insertId, str)
    for item in cleaned.items:
        assert len(item.payload) <= MAX_ITEM_BYTES
        stored = strict(item.payload)
        assert isinstance(stored, dict)
        assert stored["received_at"] == CONTEXT.received
        assert isinstance(item.token, str) and 0 < len(item.token) <= MAX_STRING
        if endpoint in ("track", "import"):
            checkEvent(stored)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


def checkEvent(stored: Any) -> None:
    assert isinstance(stored["event"], str) and 0 < len(stored["event"]) <= MAX_NAME
    props = stored["properties"]
    assert len(props) <= MAX_PROPERTIES + 2  # time and ip are added
    assert isinstance(props["time"], (int, float)) and props["time"] > 0
    for key, value in props.items():
        assert len(key) <= MAX_NAME
        if isinstance(value, str):
            assert len(value) <= MAX_STRING
        assert depth(value) <= MAX_DEPTH
    for value in stored.values():
        assert depth(value) <= MAX_DEPTH + 1


@PROPERTY_SETTINGS
@given(st.binary(max_size=2000))
def test_anyDataBytes(data: bytes) -> None:
    def check() -> None:
        try:
            records = decodeData(data)
        except DecodeError as e:
            assert e.reason and e.status == 200
            return
        assert isinstance(records, list)
        for endpoint in ("track", "engage"):
            checkCleaned(endpoint, records)

    bothCodecs(check)


@PROPERTY_SETTINGS
@given(
    st.binary(max_size=300),
    st.one_of(
        st.binary(max_size=2000),
        st.binary(max_size=2000).map(gzip.compress),
        st.binary(max_size=200).map(lambda b: b"data=" + b),
        st.binary(max_size=200).map(lambda b: b"\n".join([b"{}", b, b'{"event":"e"}'])),
    ),
    st.sampled_from([None, b"gzip", b"GZIP ", b"identity", b"", b"br", b"\xff"]),
)
def test_anyRequestBytes(query: bytes, body: bytes, encoding: Any) -> None:
    """
    Any query, body and Content-Encoding: decoded, or refused with a reason.
    """

    def check() -> None:
        try:
            decoded = decodeRequest(query, body, encoding, MAX_BODY)
        except (DecodeError, BodyTooLarge) as e:
            assert e.reason
            return
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in decoded.params.items())
        checkCleaned("track", decoded.items)

    bothCodecs(check)


@PROPERTY_SETTINGS
@given(st.lists(events, max_size=5), st.sampled_from(["track", "import"]))
def test_anyEvents(records: List[Any], endpoint: str) -> None:
    bothCodecs(lambda: checkCleaned(endpoint, records))


@PROPERTY_SETTINGS
@given(st.lists(updates, max_size=5), st.sampled_from(["engage", "groups"]))
def test_anyUpdates(records: List[Any], endpoint: str) -> None:
    bothCodecs(lambda: checkCleaned(endpoint, records))


@PROPERTY_SETTINGS
@given(st.lists(smallEvents, min_size=1, max_size=4))
def test_eventsThroughTheWire(records: List[Any]) -> None:
    """
    Whatever the SDK encoding, the same records come out, and cleaning them
    never raises.
    """
    try:
        raw = json.dumps(records, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates: only as escapes.
        raw = json.dumps(records).encode("ascii")
    expected = normalise(json.loads(raw))
    b64 = base64.b64encode(raw)
    encodings = [
        (b"", b"data=" + quote_from_bytes(raw).encode(), None),
        (b"", b"data=" + quote_from_bytes(b64).encode(), None),
        (b"", b"data=" + b64, None),  # the Node SDK: '+' unescaped
        (b"data=" + base64.urlsafe_b64encode(raw).rstrip(b"="), b"", None),
        (b"verbose=1", raw, None),
        (b"", gzip.compress(b"data=" + quote_from_bytes(raw).encode()), b"gzip"),
    ]

    def check() -> None:
        for query, body, encoding in encodings:
            decoded = decodeRequest(query, body, encoding, 10 * MAX_BODY)
            assert normalise(decoded.items) == expected
            checkCleaned("track", decoded.items)

    bothCodecs(check)


def normalise(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
