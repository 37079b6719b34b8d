"""
mixingest's site against the floor's, in process: the same requests fed to
both over StringTransport, the queue a stub whose writes succeed in groups
of 20.  No sockets, no journal thread, no fsync: what remains is the cost of
mixingest's own code per request, which separates it from the cost of
waiting for a durable write (compare with scripts/bench's ratios).

    python scripts/bench.d/inprocess.py single|batch50 [REQUESTS] [--profile]

Prints the median over 5 repetitions of the process CPU time per request,
and with --profile, cProfile's view of mixingest's own functions.
"""

from __future__ import annotations

import base64
import cProfile
import gc
import json
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import floor
from events import event
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport

from mixingest.api import IngestAPI
from mixingest.funnel import Funnel
from mixingest.metrics import Metrics, PublicSite

CONNECTIONS = 50
GROUP = 20


class GroupedQueue:
    """
    Writes that succeed in groups of L{GROUP}, as the journal's group commit.
    """

    def __init__(self) -> None:
        self.pending: List[Deferred[None]] = []

    def put(self, name: str, items: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        return d

    def status(self) -> Dict[str, Any]:
        return {}

    def ready(self) -> bool:
        return True

    def settle(self) -> None:
        pending, self.pending = self.pending, []
        for d in pending:
            d.callback(None)


def quoted(data: bytes) -> bytes:
    return base64.b64encode(data).replace(b"+", b"%2B").replace(b"/", b"%2F").replace(b"=", b"%3D")


def single() -> bytes:
    data = quoted(json.dumps(event()).encode())
    return (
        b"GET /track/?data=" + data + b"&ip=1&_=1718000000123 HTTP/1.1\r\n"
        b"Host: 127.0.0.1:8080\r\nUser-Agent: Mozilla/5.0\r\nAccept: */*\r\n"
        b"Origin: https://example.com\r\n\r\n"
    )


def batch50() -> bytes:
    body = b"data=" + quoted(json.dumps([event() for _ in range(50)]).encode())
    return (
        b"POST /track/?ip=1&verbose=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body


def run(site: Any, queue: Optional[GroupedQueue], requests: List[bytes]) -> None:
    channels = []
    for n in range(CONNECTIONS):
        peer = IPv4Address("TCP", "127.0.0.1", 40000 + n)
        channel = site.buildProtocol(peer)
        transport = StringTransport(
            peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 8080)
        )
        channel.makeConnection(transport)
        channels.append((channel, transport))
    for n, request in enumerate(requests, 1):
        channel, transport = channels[n % CONNECTIONS]
        channel.dataReceived(request)
        if queue is not None and n % GROUP == 0:
            queue.settle()
        if n % CONNECTIONS == 0:
            for _, transport in channels:
                answer = transport.value()
                assert not answer or b" 200 OK" in answer, answer[:200]
                transport.clear()
    if queue is not None:
        queue.settle()
    for channel, _ in channels:
        channel.connectionLost(None)


def main() -> None:
    workload = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2].isdigit() else 5000
    make = {"single": single, "batch50": batch50}[workload]
    requests = [make() for _ in range(count)]
    warmup = [make() for _ in range(200)]

    floorSite = floor.QuietSite(floor.app.resource())
    queue = GroupedQueue()
    metrics = Metrics()
    funnel = Funnel(queue, reactor, metrics=metrics)  # type: ignore[arg-type]
    api = IngestAPI(funnel, reactor, maxBody=10 * 1024 * 1024)
    site = PublicSite(api.resource(), metrics=metrics, clock=reactor)
    run(floorSite, None, warmup)
    run(site, queue, warmup)
    getattr(gc, "freeze", lambda: None)()

    times: Dict[str, List[float]] = {"floor": [], "mixingest": []}
    for _ in range(5):
        for name, server, grouped in (("floor", floorSite, None), ("mixingest", site, queue)):
            started = time.process_time()
            run(server, grouped, requests)
            times[name].append((time.process_time() - started) / count * 1e6)
    f, m = statistics.median(times["floor"]), statistics.median(times["mixingest"])
    print(f"{workload}: floor {f:.1f} us/request, mixingest {m:.1f} us/request, ratio {f / m:.3f}")
    if "--profile" in sys.argv:
        profile = cProfile.Profile()
        profile.enable()
        run(site, queue, requests)
        profile.disable()
        pstats.Stats(profile).sort_stats("cumtime").print_stats("mixingest", 40)


if __name__ == "__main__":
    main()
