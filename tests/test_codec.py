"""
The codec contract both implementations (ujson on CPython, stdlib json on
PyPy) keep, so that the same request gets the same answer on either.
"""

from __future__ import annotations

import math

import pytest

from mixingest import codec


def test_roundTrip() -> None:
    value = {"a": [1, 2.5, None, True], "é": "/x/ü"}
    assert codec.loads(codec.dumps(value)) == value
    assert codec.dumps({"a": "é/"}) == '{"a":"é/"}'.encode()


def test_textKeptAsItIs() -> None:
    """
    Non-ASCII as UTF-8, C{/} and HTML characters unescaped: each of the
    three options ujson's C{dumps} is given by position.
    """
    assert codec.dumps(["é\u2028", "a/b", "<&>"]) == '["é\u2028","a/b","<&>"]'.encode()


@pytest.mark.parametrize("text", [b"[1] x", b"{", b"", b'["\xff"]', b"[" * 100_000])
def test_refusedAsValueError(text: bytes) -> None:
    with pytest.raises(ValueError):
        codec.loads(text)


def test_encodedSurrogateDecodesToALoneSurrogate() -> None:
    """
    Left for the cleaner to refuse record by record, not the whole request.
    """
    assert codec.loads(b'["\xed\xa0\xbd"]') == ["\ud83d"]
    assert codec.loads(b'["\\ud800"]') == ["\ud800"]


def test_loneSurrogateNotEncodable() -> None:
    with pytest.raises(ValueError):
        codec.dumps({"a": "\ud800"})


def test_nonFiniteParsed() -> None:
    """
    NaN, Infinity and overflowing numbers parse; the cleaner refuses them.
    """
    assert math.isnan(codec.loads(b"[NaN]")[0])
    assert codec.loads(b"[1e400]") == [math.inf]


def test_bigIntegers() -> None:
    assert codec.loads(b"[123456789012345678901234567890]") == [123456789012345678901234567890]
