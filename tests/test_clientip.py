"""
Whose address C{ip=1} records.
"""

from __future__ import annotations

from typing import Optional

import pytest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.web.test.requesthelper import DummyRequest

from mixingest.clientip import ClientAddress


def request(peer: str, forwarded: Optional[str] = None) -> DummyRequest:
    r = DummyRequest([b"track"])
    r.client = IPv4Address("TCP", peer, 1234)
    if forwarded is not None:
        r.requestHeaders.setRawHeaders(b"x-forwarded-for", [forwarded])
    return r


def test_untrustedPeerIsTheClient() -> None:
    assert ClientAddress()(request("198.51.100.7", "1.2.3.4")) == "198.51.100.7"


@pytest.mark.parametrize(
    "forwarded, client",
    [
        ("203.0.113.5", "203.0.113.5"),
        ("1.1.1.1, 203.0.113.5", "203.0.113.5"),
        ("203.0.113.5, 10.0.0.2", "203.0.113.5"),
        ("10.0.0.3, 10.0.0.2", "10.0.0.3"),
        ("garbage, 10.0.0.2", "10.0.0.2"),
        ("2001:db8::1", "2001:db8::1"),
    ],
)
def test_trustedChain(forwarded: str, client: str) -> None:
    resolve = ClientAddress(["10.0.0.0/8"])
    assert resolve(request("10.0.0.1", forwarded)) == client


def test_trustedPeerWithoutHeader() -> None:
    assert ClientAddress(["10.0.0.0/8"])(request("10.0.0.1")) == "10.0.0.1"


def test_unixPeer() -> None:
    r = DummyRequest([b"track"])
    r.client = UNIXAddress(b"/run/x.sock")
    r.requestHeaders.setRawHeaders(b"x-forwarded-for", [b"203.0.113.5"])
    assert ClientAddress()(r) is None
    assert ClientAddress(["unix"])(r) == "203.0.113.5"


def test_invalidNetwork() -> None:
    with pytest.raises(ValueError):
        ClientAddress(["not-a-network"])
