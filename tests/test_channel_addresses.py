"""
L{mixingest.httpsite.IngestChannel} asks its transport for the connection's
addresses and security once, not once or twice a request.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from zope.interface import directlyProvides

from mixingest.httpsite import HardenedSite

PEER = IPv4Address("TCP", "203.0.113.7", 40000)
HOST = IPv4Address("TCP", "127.0.0.1", 8080)


class CountingTransport(StringTransport):
    """
    A transport that counts how often it is asked for its addresses.
    """

    def __init__(self) -> None:
        super().__init__(hostAddress=HOST, peerAddress=PEER)
        self.asked: List[str] = []

    def getHost(self) -> Any:
        self.asked.append("host")
        return super().getHost()

    def getPeer(self) -> Any:
        self.asked.append("peer")
        return super().getPeer()

    def setTcpNoDelay(self, enabled: bool) -> None:
        """
        twisted.web asks for it on a TCP transport, as a TLS one is.
        """


class Seen(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: List[Tuple[Any, Any, bool, bytes]] = []

    def render_GET(self, request: IRequest) -> bytes:
        self.seen.append(
            (
                request.getHost(),
                request.getClientAddress(),
                request.isSecure(),
                request.getRequestHostname(),
            )
        )
        request.isSecure()
        return b"ok"


def serve(secure: bool, channelType: Any = None) -> Tuple[Seen, CountingTransport]:
    seen = Seen()
    site = HardenedSite(seen, reactor=Clock())
    if channelType is not None:
        site.protocol = channelType
    channel = site.buildProtocol(PEER)
    transport = CountingTransport()
    if secure:
        directlyProvides(transport, ISSLTransport)
    channel.makeConnection(transport)
    request = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
    channel.dataReceived(request * 3)
    assert transport.value().count(b"ok") == 3
    return seen, transport


@pytest.mark.parametrize("secure", [False, True])
def test_askedOncePerConnection(secure: bool) -> None:
    """
    Three requests on one connection see the connection's addresses and
    security, which the transport was asked for once.
    """
    seen, transport = serve(secure)
    assert seen.seen == [(HOST, PEER, secure, b"example.com")] * 3
    assert sorted(transport.asked) == ["host", "peer"]


def test_askedPerRequestWithoutTheCache() -> None:
    """
    The control: twisted.web's own channel asks the transport again for
    every request.
    """
    seen, transport = serve(False, HTTPChannel)
    assert seen.seen == [(HOST, PEER, False, b"example.com")] * 3
    assert transport.asked.count("host") == 3
    assert transport.asked.count("peer") == 3
