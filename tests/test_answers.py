"""
Answer styles: only safe callbacks and redirects, never reflected otherwise.
"""

from __future__ import annotations

import pytest

from mixingest.answers import answerStyle
from mixingest.errors import BadAnswerParameter


@pytest.mark.parametrize(
    "callback",
    ["cb_1", "mpmetrics.jsonp_callback", "mixpanel._jsc[3]", "$", "a.b.c[12].d", "_"],
)
def test_safeCallbacks(callback: str) -> None:
    assert answerStyle({"callback": callback}).callback == callback


@pytest.mark.parametrize(
    "callback",
    [
        "",
        "alert(1)",
        "a;b",
        "a b",
        "1abc",
        "a[b]",
        "a.",
        "a..b",
        "<script>",
        "x\u2028y",
        "a" * 129,
        "a[1",
        "a]",
        "(function(){})",
    ],
)
def test_unsafeCallbacks(callback: str) -> None:
    with pytest.raises(BadAnswerParameter, match="identifier path") as e:
        answerStyle({"callback": callback})
    assert callback not in e.value.reason or not callback


ALLOWED = frozenset(["example.com"])


@pytest.mark.parametrize(
    "url", ["http://example.com/x?y=1", "https://example.com", "https://EXAMPLE.com:8443/"]
)
def test_safeRedirects(url: str) -> None:
    assert answerStyle({"redirect": url}, ALLOWED).redirect == url.encode()


@pytest.mark.parametrize(
    "url, hosts",
    [
        ("https://example.com/", frozenset()),
        ("https://anywhere.example/", ALLOWED),
        ("https://example.com@evil.example/", ALLOWED),
        ("https://example.com.evil.example/", ALLOWED),
        ("https://evil.example/example.com", ALLOWED),
    ],
)
def test_redirectHostNotAllowed(url: str, hosts: frozenset) -> None:  # type: ignore[type-arg]
    """
    Off unless hosts are allowed, and then only to those hosts (the host
    a browser would go to, whatever else the URL holds).
    """
    with pytest.raises(BadAnswerParameter, match="--redirect-allow"):
        answerStyle({"redirect": url}, hosts)


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "data:text/html,x",
        "//evil.example",
        "/relative",
        "ftp://example.com",
        "https://",
        "http://a\r\nSet-Cookie: x",
        "https://ex\u00e4mple.com",
        "http:\\\\evil",
    ],
)
def test_unsafeRedirects(url: str) -> None:
    with pytest.raises(BadAnswerParameter, match="http"):
        answerStyle({"redirect": url}, ALLOWED)


def test_flags() -> None:
    assert answerStyle({"verbose": "1"}).verbose
    assert not answerStyle({"verbose": "0"}).verbose
    assert answerStyle({"img": "1"}).img
    assert not answerStyle({}).img
