"""
The request-line parse mixingest gives twisted.web: Twisted's own, with the
request target checked in C; it must accept and refuse exactly what
Twisted's does.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import pytest
from twisted.web import http

from mixingest import httpsite

original = httpsite._twistedParseRequestLine

pytestmark = pytest.mark.skipif(
    original is None, reason="this Twisted does not check request lines byte by byte"
)


def parsed(
    parse: Optional[Callable[[bytes], Tuple[bytes, bytes, bytes]]], line: bytes
) -> Union[Tuple[bytes, bytes, bytes], str]:
    assert parse is not None
    try:
        return parse(line)
    except ValueError:
        return "refused"


def test_installed() -> None:
    assert http._parseRequestLine is httpsite._parseRequestLine


@pytest.mark.parametrize("byte", range(256))
def test_everyTargetByteAsTwisted(byte: int) -> None:
    """
    Each byte alone, first, in the middle and last of a target: the C check
    lets through exactly the bytes Twisted's loop does (it refuses 32 and
    below and, as it happens, 177 and above).
    """
    b = bytes([byte])
    for target in (b, b + b"/track", b"/track?data=" + b + b"x", b"/track/" + b):
        line = b"GET " + target + b" HTTP/1.1"
        assert parsed(httpsite._parseRequestLine, line) == parsed(original, line), line


def test_boundaries() -> None:
    """
    The control: the check sees the bytes at both edges of Twisted's range.
    """
    assert parsed(httpsite._parseRequestLine, b"GET /\xb0 HTTP/1.1") != "refused"
    assert parsed(httpsite._parseRequestLine, b"GET /\xb1 HTTP/1.1") == "refused"
    assert parsed(httpsite._parseRequestLine, b"GET /! HTTP/1.1") != "refused"
    assert parsed(httpsite._parseRequestLine, b"GET /\x7f HTTP/1.1") != "refused"


@pytest.mark.parametrize(
    "line",
    [
        b"GET /track HTTP/1.1",
        b"POST /track/?ip=1&verbose=1 HTTP/1.0",
        b"GET  HTTP/1.1",
        b"GET /track HTTP/1.1 ",
        b"GET /track  HTTP/1.1",
        b" GET /track HTTP/1.1",
        b"GET /track",
        b"GET",
        b"",
        b"G@T /track HTTP/1.1",
        b" /track HTTP/1.1",
        b"GET /track HTTP/2.0",
        b"GET /track http/1.1",
        b"GET /track HTTP/1.1\r",
        b"GET\t/track HTTP/1.1",
    ],
)
def test_lineAsTwisted(line: bytes) -> None:
    """
    The method, the version and the line's shape are Twisted's to judge.
    """
    assert parsed(httpsite._parseRequestLine, line) == parsed(original, line)
