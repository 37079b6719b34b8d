"""
Decoding requests the way each SDK sends them.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib

import pytest

from mixingest.decoding import (
    MAX_PARAMETERS,
    MIN_MAX_VALUES,
    VALUES_PER_RECORD,
    checkValues,
    countValues,
    decodeBase64,
    decodeData,
    decodeRequest,
    decompress,
    maxValuesFor,
    parseParams,
)
from mixingest.errors import BodyTooLarge, DecodeError

EVENT = {"event": "Signed Up", "properties": {"token": "t", "name": "~~~>>>???"}}
RAW = json.dumps(EVENT).encode()
B64 = base64.b64encode(RAW)


def test_rawJSONData() -> None:
    assert decodeData(RAW) == [EVENT]


def test_arrayData() -> None:
    assert decodeData(json.dumps([EVENT, EVENT]).encode()) == [EVENT, EVENT]


@pytest.mark.parametrize(
    "encoded",
    [
        B64,
        B64.rstrip(b"="),
        base64.urlsafe_b64encode(RAW),
        base64.urlsafe_b64encode(RAW).rstrip(b"="),
        B64.replace(b"+", b" "),
        base64.encodebytes(RAW),
    ],
    ids=["standard", "unpadded", "urlsafe", "urlsafe-unpadded", "plus-as-space", "mime-lines"],
)
def test_base64Dialects(encoded: bytes) -> None:
    assert b"+" in B64 or b"/" in B64
    assert decodeData(encoded) == [EVENT]


def test_invalidBase64() -> None:
    with pytest.raises(DecodeError, match="neither JSON nor valid base64"):
        decodeBase64(b"!!!!")
    with pytest.raises(DecodeError, match="bad length"):
        decodeBase64(b"abcde")


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "missing or empty"),
        (b"   ", "missing or empty"),
        (b"{", "not valid JSON"),
        (b"[1] x", "not valid JSON"),
        (base64.b64encode(b'"a string"'), "must be a JSON object or array"),
        (base64.b64encode(b"{bad"), "not valid JSON"),
        (b'{"a":"\xff"}', "not valid JSON"),
    ],
)
def test_badData(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decodeData(data)


def test_queryData() -> None:
    decoded = decodeRequest(
        b"data=" + B64.replace(b"=", b"%3D") + b"&verbose=1&ip=0", b"", None, 1000
    )
    assert decoded.items == [EVENT]
    assert decoded.params == {"verbose": "1", "ip": "0"}
    assert not decoded.raw


def test_formBodyAnyContentType() -> None:
    """
    sendBeacon posts text/plain and the Node SDK posts unescaped base64: the
    body is parsed as a form whatever it is labelled, and C{+} survives.
    """
    decoded = decodeRequest(b"ip=1&_=123", b"data=" + B64, None, 10000)
    assert decoded.items == [EVENT]
    assert decoded.params == {"ip": "1", "_": "123"}


def test_pythonSDKForm() -> None:
    """
    The Python SDK posts url-encoded raw JSON, spaces as C{+}.
    """
    from urllib.parse import urlencode

    body = urlencode({"data": RAW.decode(), "verbose": "1", "ip": "0"}).encode()
    decoded = decodeRequest(b"", body, None, 10000)
    assert decoded.items == [EVENT]
    assert decoded.params["verbose"] == "1"


def test_rawJSONBody() -> None:
    decoded = decodeRequest(b"strict=1", b"  " + json.dumps([EVENT]).encode(), None, 10000)
    assert decoded.items == [EVENT]
    assert decoded.raw
    assert decoded.params == {"strict": "1"}


def test_ndjsonBody() -> None:
    body = RAW + b"\n\n{oops\n" + RAW + b"\n"
    decoded = decodeRequest(b"", body, None, 10000)
    assert decoded.items == [EVENT, None, EVENT]
    assert list(decoded.lineErrors) == [1]
    assert "not valid JSON" in decoded.lineErrors[1]


def test_gzipBody() -> None:
    decoded = decodeRequest(b"", gzip.compress(b"data=" + B64), b"gzip", 10000)
    assert decoded.items == [EVENT]


def test_gzipDetectedByMagic() -> None:
    decoded = decodeRequest(b"", gzip.compress(json.dumps([EVENT]).encode()), None, 10000)
    assert decoded.items == [EVENT]


def test_gzipLiar() -> None:
    with pytest.raises(DecodeError, match="not valid gzip"):
        decodeRequest(b"", b"data=" + B64, b"gzip", 10000)


def test_gzipTruncated() -> None:
    with pytest.raises(DecodeError, match="truncated"):
        decompress(gzip.compress(RAW * 100)[:-20], 100000)


def test_gzipOverLimit() -> None:
    with pytest.raises(BodyTooLarge, match="once decompressed"):
        decompress(gzip.compress(b"x" * 10000), 9999)


def test_gzipBombRatio() -> None:
    bomb = zlib.compress(b"\0" * (8 << 20), 9)
    with pytest.raises(BodyTooLarge, match="more than 1000 times"):
        decompress(bomb, 64 << 20)


def test_unsupportedEncoding() -> None:
    with pytest.raises(DecodeError, match="unsupported Content-Encoding"):
        decodeRequest(b"", b"data=" + B64, b"br", 10000)


def test_dataTwice() -> None:
    with pytest.raises(DecodeError, match="more than once"):
        decodeRequest(b"data=" + B64, b"data=" + B64, None, 10000)
    with pytest.raises(DecodeError, match="both in the query and as a JSON body"):
        decodeRequest(b"data=" + B64, RAW, None, 10000)


def test_dataMissing() -> None:
    with pytest.raises(DecodeError, match="data, missing or empty"):
        decodeRequest(b"verbose=1", b"", None, 10000)


def test_tooManyParameters() -> None:
    query = b"&".join(b"p%d=1" % i for i in range(MAX_PARAMETERS + 1))
    with pytest.raises(DecodeError, match="more than"):
        decodeRequest(query, b"", None, 10000)


def test_parseParamsIsLenient() -> None:
    assert parseParams(b"verbose=1&data=xx&callback=cb") == {"verbose": "1", "callback": "cb"}
    many = b"&".join(b"p%d=1" % i for i in range(MAX_PARAMETERS + 1))
    # past the limit, the first MAX_PARAMETERS still say how to answer
    assert parseParams(many) == {f"p{i}": "1" for i in range(MAX_PARAMETERS)}


def test_gzipDataAfterTheFirstMember() -> None:
    """
    Python's one-shot gzip inflate stops at the end of the first member:
    the events in a second one would be answered 1 and dropped.  Any data
    after the first member is an error instead.
    """
    first = gzip.compress(b"data=" + B64)
    for trailer in (gzip.compress(b"&x=1"), b"\0", b"garbage"):
        with pytest.raises(DecodeError, match="data after its end; send one gzip member"):
            decodeRequest(b"", first + trailer, b"gzip", 10000)
    assert decodeRequest(b"", first, b"gzip", 10000).items == [EVENT]


@pytest.mark.parametrize(
    "text, values",
    [
        (b"{}", 2),
        (b"[]", 2),
        (b'[{"a":1,"b":[2,3]},{}]', 8),
        (b'{"a":1}\n{"a":2}\n', 5),
        (b'"a,b,[c"', 4),
    ],
)
def test_countValues(text: bytes, values: int) -> None:
    """
    An upper bound, from commas, brackets and line breaks: at least the
    number of JSON values (elements and members) for any text.
    """
    assert countValues(text) == values


def test_checkValues() -> None:
    """
    Over the bound, refused without parsing; a short text is never counted.
    """
    checkValues(b"[" + b"1," * 48 + b"1]", 50)
    with pytest.raises(BodyTooLarge, match="more than 50 JSON values"):
        checkValues(b"[" + b"1," * 50 + b"1]", 50)
    with pytest.raises(BodyTooLarge, match="more than 50 JSON values"):
        decodeData(base64.b64encode(b"[" + b"{}," * 30 + b"{}]"), 50)
    checkValues(b"[" + b"1," * 50 + b"1]", None)


def test_maxValuesFor() -> None:
    """
    Generous for SDK batches, and never below what a 100,000-level nesting
    needs (the parser refuses it cheaply, with its own reason).
    """
    assert maxValuesFor(2000) == max(MIN_MAX_VALUES, 2000 * VALUES_PER_RECORD)
    assert maxValuesFor(1) == MIN_MAX_VALUES > countValues(b"[" * 100_000 + b"]" * 100_000)


def test_ndjsonBoundedByMaxRecords() -> None:
    """
    An ndjson body stops being parsed at the first record past the limit.
    """
    line = json.dumps(EVENT).encode()
    assert len(decodeRequest(b"", b"\n".join([line] * 3), None, 10000, 3).items) == 3
    with pytest.raises(BodyTooLarge, match="more than 3 records in one request; the limit is 3"):
        decodeRequest(b"", b"\n\n".join([line] * 4), None, 10000, 3)
