"""
Every private upstream attribute listed in L{mixingest._upstream} still
exists in the installed Twisted, Klein and txredisapi (run against the
newest releases by tox's C{newest} environment).
"""

from __future__ import annotations

import io
from typing import Any, Callable, Dict

import pytest
from klein import Klein
from klein.resource import KleinResource
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import FileLogObserver, globalLogPublisher
from twisted.python.reflect import namedAny
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site

from mixingest._upstream import PRIVATE_USES, PrivateUse


def _channel() -> HTTPChannel:
    channel = HTTPChannel()
    channel.makeConnection(StringTransport())
    return channel


def _redisFactory() -> Any:
    import txredisapi

    return txredisapi.RedisFactory(uuid="test", dbid=0, poolsize=1, isLazy=True)


INSTANCES: Dict[str, Callable[[], Any]] = {
    "twisted.internet.endpoints.TCP4ServerEndpoint": lambda: serverFromString(
        MemoryReactor(), "tcp:0"
    ),
    "twisted.internet.endpoints.UNIXServerEndpoint": lambda: serverFromString(
        MemoryReactor(), "unix:/tmp/x.sock"
    ),
    "klein.resource.KleinResource": lambda: KleinResource(Klein()),
    "klein.Klein": Klein,
    "twisted.web.http.HTTPChannel": _channel,
    "twisted.web.server.Site": lambda: Site(Resource()),
    "txredisapi.RedisFactory": _redisFactory,
    # reload.py reads the global publisher itself, so the check does too.
    "twisted.logger.LogPublisher": lambda: globalLogPublisher,
    "twisted.logger.FileLogObserver": lambda: FileLogObserver(io.StringIO(), str),
}


def present(use: PrivateUse) -> bool:
    if use.instance:
        owner = INSTANCES[use.owner]()
        assert isinstance(owner, namedAny(use.owner))
    else:
        owner = namedAny(use.owner)
    return hasattr(owner, use.attribute)


@pytest.mark.parametrize("use", PRIVATE_USES, ids=lambda u: f"{u.owner}.{u.attribute}")
def test_privateAttributeStillThere(use: PrivateUse) -> None:
    assert use.user and use.why
    assert present(use), (
        f"{use.owner}.{use.attribute} is gone from the installed release: {use.user} needs "
        f"it because {use.why}"
    )


def test_missingAttributeDetected() -> None:
    """
    The control: an attribute that does not exist is reported, on a class
    and on an instance.
    """
    assert not present(PrivateUse("twisted.web.server.Request", "_noSuch", "x", "y"))
    assert not present(PrivateUse("twisted.web.http.HTTPChannel", "_noSuch", "x", "y", True))
