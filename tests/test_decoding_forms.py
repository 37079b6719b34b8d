"""
The form parser's fast path (ASCII forms split as text) against the stdlib
path it stands in for (C{parse_qsl} over latin-1), and proof that the SDKs'
requests take it.
"""

from __future__ import annotations

import base64
import json
from random import Random
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import unquote_to_bytes, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixingest import decoding
from mixingest.decoding import MAX_PARAMETERS, decodeRequest, parseParams
from mixingest.errors import DecodeError

EVENT = {
    "event": "Signed Up",
    "properties": {"token": "t", "$current_url": "https://example.com/a?b=c", "n": "~~>>??"},
}
RAW = json.dumps(EVENT).encode()
B64 = base64.b64encode(RAW)
assert b"+" in B64 and b"/" in B64 and B64.endswith(b"=")


def _escaped(data: bytes) -> bytes:
    """
    Base64 escaped as the browser SDK sends it.
    """
    return data.replace(b"+", b"%2B").replace(b"/", b"%2F").replace(b"=", b"%3D")


PIECES = [
    b"%",
    b"%2",
    b"%zz",
    b"%C3%A9",
    b"%c3%a9",
    b"%FF",
    b"%ff",
    b"%2B",
    b"%2b",
    b"%2F",
    b"%3D",
    b"%3d",
    b"%26",
    b"%3B",
    b"%%",
    b"%%2B",
    b"%2%2B",
    b"%00",
    b"+",
    b"=",
    b"==",
    b"&",
    b"&&",
    b";",
    b"data",
    b"d%61ta",
    b"dat%61",
    b"data+",
    b"ip",
    b"verbose",
    b"_",
    b"1",
    b"x",
    b"Az09._~-/:?",
    b" ",
    b"\t",
    b"\n",
    b"\x00",
    b"\x7f",
    b"\xc3\xa9",
    b"\xff",
    b"\x80",
    b"\xed\xa0\x80",
    B64,
    _escaped(B64),
    b"%2B" * 40,
    b"A" * 3000,
    b"%2F" * 200 + b"%zz",
    b"&" * 60,
]
FORMS = st.lists(st.sampled_from(PIECES) | st.binary(max_size=6), max_size=24).map(b"".join)
PRIOR = st.dictionaries(st.sampled_from(["ip", "verbose", "_", "x", "é"]), st.text(max_size=3))

Outcome = Tuple[Optional[str], Dict[str, str], List[bytes]]


def _outcome(parse: Any, raw: bytes, prior: Dict[str, str]) -> Outcome:
    """
    What C{parse} leaves in a copy of C{prior} and in the data list, or the
    error it raises (with what it had added by then).
    """
    into = dict(prior)
    data: List[bytes] = []
    try:
        parse(raw, into, data)
    except DecodeError as e:
        return (str(e), into, data)
    return (None, into, data)


def _sameOutcome(raw: bytes, prior: Dict[str, str]) -> None:
    fast = _outcome(decoding._parseForm, raw, prior)
    stdlib = _outcome(decoding._parseFormStdlib, raw, prior)
    assert fast == stdlib
    # Same order of parameters too, not only the same mapping.
    assert list(fast[1].items()) == list(stdlib[1].items())
    assert all(type(v) is str for v in fast[1].values())
    assert all(type(k) is str for k in fast[1])
    assert all(type(v) is bytes for v in fast[2])


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=FORMS, prior=PRIOR)
def test_sameAsStdlib(raw: bytes, prior: Dict[str, str]) -> None:
    """
    Over forms built from every special case (escapes valid, truncated,
    invalid or spelling non-ASCII and separators, C{+}, blank and repeated
    fields, C{;}, non-ASCII and control bytes, long and escape-dense values,
    past the field limit), the fast path's parameters, data, order, types
    and errors are the stdlib path's.
    """
    _sameOutcome(raw, prior)


@settings(max_examples=250, deadline=None)
@given(seeded=st.randoms(use_true_random=False))
def test_sameAsStdlibInBulk(seeded: Random) -> None:
    """
    The same over many more forms than hypothesis can draw piece by piece in
    a few seconds: 20 forms of up to 40 pieces from each seed (a plain
    L{Random}, which hypothesis does not record call by call).
    """
    random = Random(seeded.getrandbits(64))
    for _ in range(20):
        pieces = random.choices(PIECES, k=random.randrange(41))
        if random.random() < 0.2:
            pieces.append(random.randbytes(random.randrange(8)))
            random.shuffle(pieces)
        _sameOutcome(b"".join(pieces), {"ip": "0"} if random.random() < 0.5 else {})


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"&",
        b"=",
        b"data",
        b"data=",
        b"=1&=2",
        b"ip=1&ip=2&IP=3",
        b"data=a&data=b",
        b"d%61ta=" + B64,
        b"data%3D=1",
        b"a+b=c+d&%2B=%2B",
        b"x=%C3%A9&y=%FF&%E2%82%AC=1",
        b"x=%E2%82&y=%zz%2",
        b"data=" + B64 + b"&ip=1",
        b"a=1;b=2",
        b"&".join(b"p%d=1" % i for i in range(MAX_PARAMETERS)),
        b"&".join(b"p%d=1" % i for i in range(MAX_PARAMETERS + 1)),
        b"&" * (MAX_PARAMETERS - 1),
        b"&" * MAX_PARAMETERS,
        b"data=" + b"%2B" * 50 + b"%2b",
    ],
)
def test_sameAsStdlibCases(raw: bytes) -> None:
    """
    The edges that matter, always run whatever hypothesis draws.
    """
    _sameOutcome(raw, {})
    _sameOutcome(raw, {"ip": "0"})


@given(st.lists(st.sampled_from(PIECES[:20]) | st.sampled_from([b"A", b"b", b"9"]), max_size=80))
@settings(max_examples=500, deadline=None)
def test_unquoteIsStdlibs(pieces: List[bytes]) -> None:
    """
    The unquoting of an ASCII field, escape-dense or not, is the stdlib's.
    """
    text = b"".join(pieces).decode("latin-1")
    if not text.isascii():
        return
    expected = unquote_to_bytes(text.replace("+", " "))
    assert decoding._unquote(text) == expected


def test_denseEscapesReplacedInC(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Escape-dense base64 is decoded without the stdlib's per-escape loop;
    sparse escapes, and dense ones with an escape base64 does not use, go
    through it (the control).
    """
    calls: List[str] = []

    def spy(text: str) -> bytes:
        calls.append(text)
        return unquote_to_bytes(text)

    monkeypatch.setattr(decoding, "unquote_to_bytes", spy)
    assert decoding._unquote("%2B%2F%3D" * 20) == b"+/=" * 20
    assert calls == []
    assert decoding._unquote("%2B" + "A" * 400) == b"+" + b"A" * 400
    assert decoding._unquote("%2B%2F%3D" * 20 + "%2b") == b"+/=" * 20 + b"+"
    assert len(calls) == 2


def _sdkShapes() -> List[Tuple[str, bytes, bytes]]:
    batch = json.dumps([EVENT] * 50).encode()
    return [
        ("browser GET", b"data=" + _escaped(B64) + b"&ip=1&_=1718000000123", b""),
        ("browser verbose", b"data=" + _escaped(B64) + b"&ip=1&_=1718000000123&verbose=1", b""),
        ("browser batch", b"ip=1&verbose=1&_=1718000000123", b"data=" + _escaped(B64)),
        ("bench batch50", b"ip=1&verbose=1", b"data=" + _escaped(base64.b64encode(batch))),
        ("node", b"ip=0&verbose=1", b"data=" + B64),
        ("python", b"", urlencode({"data": RAW.decode(), "verbose": 1, "ip": 0}).encode()),
        ("url-safe base64", b"data=" + base64.urlsafe_b64encode(RAW).rstrip(b"=") + b"&ip=1", b""),
    ]


@pytest.mark.parametrize("name, query, body", _sdkShapes(), ids=lambda v: str(v)[:20])
def test_sdkShapesTakeTheFastPath(
    monkeypatch: pytest.MonkeyPatch, name: str, query: bytes, body: bytes
) -> None:
    """
    Every SDK's request shape is parsed without the stdlib path, so that a
    change cannot quietly send them all the slow way, and decodes right.
    """
    calls: List[bytes] = []
    stdlib = decoding._parseFormStdlib

    def spy(raw: bytes, into: Dict[str, str], data: List[bytes]) -> None:
        calls.append(raw)
        stdlib(raw, into, data)

    monkeypatch.setattr(decoding, "_parseFormStdlib", spy)
    decoded = decodeRequest(query, body, None, 1 << 20)
    assert calls == []
    assert decoded.items[0] == EVENT
    assert "data" not in decoded.params


@pytest.mark.parametrize(
    "query",
    [
        b"data=" + B64 + b"&name=caf\xc3\xa9",
        b"data=" + B64 + b"&name=caf%C3%A9;x=1",
        b"data=" + B64 + b"&" + b"&".join(b"p%d=1" % i for i in range(MAX_PARAMETERS)),
    ],
    ids=["non-ASCII", "semicolon", "past the limit"],
)
def test_otherFormsTakeTheStdlibPath(monkeypatch: pytest.MonkeyPatch, query: bytes) -> None:
    """
    The control for the spy above: it sees the forms the fast path leaves
    to the stdlib, which still answer as before.
    """
    calls: List[bytes] = []
    stdlib = decoding._parseFormStdlib

    def spy(raw: bytes, into: Dict[str, str], data: List[bytes]) -> None:
        calls.append(raw)
        stdlib(raw, into, data)

    monkeypatch.setattr(decoding, "_parseFormStdlib", spy)
    try:
        decoded = decodeRequest(query, b"", None, 1 << 20)
    except DecodeError as e:
        assert str(e) == f"more than {MAX_PARAMETERS} parameters"
    else:
        assert decoded.items == [EVENT]
        assert decoded.params["name"] in ("café", "café;x=1")
    assert calls == [query]


def test_parseParamsPastTheLimit() -> None:
    """
    The lenient parser of refused requests keeps the first fields through
    either path.
    """
    many = b"verbose=1&" + b"&".join(b"p%d=%%C3%%A9" % i for i in range(2 * MAX_PARAMETERS))
    params = parseParams(many)
    assert params["verbose"] == "1"
    assert params["p0"] == "é"
    assert len(params) == MAX_PARAMETERS
