"""
The client address recorded for C{ip=1}.

C{X-Forwarded-For} is anyone's to forge, so it is believed only when the
socket peer is a trusted proxy (C{--trusted-proxy}), and then only as far as
the chain of trusted proxies reaches: walking the header from the right, the
first hop that is not a trusted proxy is the client.
"""

from __future__ import annotations

import ipaddress
from typing import Dict, List, Optional, Sequence, Union

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.web.iweb import IRequest

__all__ = ["ClientAddress", "parseNetwork"]

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
UNIX = "unix"
_CACHE_SIZE = 4096


def parseNetwork(text: str) -> Optional[Network]:
    """
    A CIDR (or a bare address) for C{--trusted-proxy}; C{unix} (returned as
    L{None}) trusts peers on a Unix socket, for a proxy on the same host.

    @raise ValueError: not an address or network.
    """
    if text == UNIX:
        return None
    return ipaddress.ip_network(text, strict=False)


class ClientAddress:
    """
    Resolves a request's client address, caching the trust decision per peer.
    """

    def __init__(self, trusted: Sequence[str] = ()) -> None:
        networks = [parseNetwork(t) for t in trusted]
        self._trustUnix = None in networks
        self._networks: List[Network] = [n for n in networks if n is not None]
        self._trusted: Dict[str, bool] = {}

    def _isTrusted(self, host: str) -> bool:
        known = self._trusted.get(host)
        if known is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                known = False
            else:
                known = any(address in n for n in self._networks)
            if len(self._trusted) >= _CACHE_SIZE:
                self._trusted.clear()
            self._trusted[host] = known
        return known

    def __call__(self, request: IRequest) -> Optional[str]:
        peer = request.getClientAddress()
        if isinstance(peer, (IPv4Address, IPv6Address)):
            host: Optional[str] = peer.host
            trusted = bool(self._networks) and self._isTrusted(peer.host)
        else:
            host = None
            trusted = self._trustUnix
        if not trusted:
            return host
        forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for")
        if not forwarded:
            return host
        hops = b",".join(forwarded).decode("latin-1").split(",")
        for hop in reversed(hops):
            hop = hop.strip()
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return host
            if not self._isTrusted(hop):
                return hop
            host = hop
        return host
