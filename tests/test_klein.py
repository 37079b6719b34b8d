"""
L{mixingest._klein.AcyclicKleinResource}: Klein's rendering, without the
reference cycle Klein leaves behind each request, and with a handler's
pending result cancelled when its client goes away.
"""

from __future__ import annotations

import gc
import platform
import weakref
from typing import Any, Iterator, List

import pytest
from klein import Klein
from klein.resource import KleinResource
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from mixingest._klein import AcyclicKleinResource
from mixingest.httpsite import HardenedSite

app = Klein()
pending: List[Deferred[bytes]] = []
cancelled: List[Deferred[bytes]] = []
requests: List[Any] = []


@app.route("/later")
def later(request: IRequest) -> Deferred[bytes]:
    d: Deferred[bytes] = Deferred(cancelled.append)
    pending.append(d)
    requests.append(weakref.ref(request))
    return d


@app.route("/now")
def now(request: IRequest) -> bytes:
    return b"now"


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    yield
    del pending[:], cancelled[:], requests[:]


def connect(resource: IResource) -> Any:
    site = HardenedSite(resource, reactor=Clock())
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    return channel, transport


def get(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"


def test_answered() -> None:
    channel, transport = connect(AcyclicKleinResource(app))
    channel.dataReceived(get(b"/now"))
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert b"now" in transport.value()
    channel.dataReceived(get(b"/later"))
    pending[0].callback(b"later")
    assert b"later" in transport.value()
    assert cancelled == []


def test_goneClientCancelsHandler() -> None:
    channel, transport = connect(AcyclicKleinResource(app))
    channel.dataReceived(get(b"/later"))
    channel.connectionLost(Failure(ConnectionDone()))
    assert cancelled == pending
    assert transport.value() == b""


def test_answeredHandlerNotCancelled() -> None:
    """
    The control: a request answered, then its connection closed, has
    nothing to cancel.
    """
    channel, _ = connect(AcyclicKleinResource(app))
    channel.dataReceived(get(b"/later"))
    pending[0].callback(b"later")
    channel.connectionLost(Failure(ConnectionDone()))
    assert cancelled == []


@pytest.mark.skipif(
    platform.python_implementation() != "CPython",
    reason="only CPython frees by reference counting; PyPy's collector frees every request alike",
)
@pytest.mark.parametrize("resource, cyclic", [(AcyclicKleinResource, False), (KleinResource, True)])
def test_requestFreedWithoutTheCollector(resource: Any, cyclic: bool) -> None:
    """
    An answered request is freed by reference counting alone; Klein's own
    resource (the control) leaves it for the cyclic collector.
    """
    channel, transport = connect(resource(app))
    gc.collect()
    gc.disable()
    try:
        channel.dataReceived(get(b"/later"))
        pending.pop().callback(b"later")
        assert b"later" in transport.value()
        assert (requests[0]() is not None) is cyclic
    finally:
        gc.enable()


@app.route("/hello/<name>", methods=["GET"])
def hello(request: IRequest, name: str) -> bytes:
    return b"hello " + name.encode()


def answers(resource: IResource, *lines: bytes) -> List[bytes]:
    """
    The status line and body of each request, sent one by one on one
    connection.
    """
    found = []
    for line in lines:
        channel, transport = connect(resource)
        channel.dataReceived(line)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        found.append(head.split(b"\r\n")[0] + b" " + body)
    return found


def test_routesRemembered(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A URL routed once is not bound and matched again; what did not route
    (not found, method not allowed) is not remembered and answers as Klein
    does each time; a converter's values belong to their own URL.
    """
    resource = AcyclicKleinResource(app)
    binds: List[str] = []
    bind = app.url_map.bind

    def counted(*args: Any, **kwargs: Any) -> Any:
        binds.append(kwargs["path_info"])
        return bind(*args, **kwargs)

    monkeypatch.setattr(app.url_map, "bind", counted)
    got = answers(
        resource,
        get(b"/now"),
        get(b"/now"),
        get(b"/hello/ann"),
        get(b"/hello/bob"),
        get(b"/hello/ann"),
        get(b"/nowhere"),
        get(b"/nowhere"),
        b"POST /hello/ann HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        b"POST /hello/ann HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    for answer, body in zip(got, [b"now", b"now", b"hello ann", b"hello bob", b"hello ann"]):
        assert answer.startswith(b"HTTP/1.1 200 OK ") and b"\r\n" + body + b"\r\n" in answer
    assert [g.split(b" ", 2)[1] for g in got[5:]] == [b"404", b"404", b"405", b"405"]
    assert binds == [
        "/now",
        "/hello/ann",
        "/hello/bob",
        "/nowhere",
        "/nowhere",
        "/hello/ann",
        "/hello/ann",
    ]
