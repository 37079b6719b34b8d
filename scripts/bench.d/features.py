"""
What an optional feature costs per request, in process (the harness of
inprocess.py: StringTransport, a stub queue that settles in groups): the
same requests through the same site with the feature off and on, in
alternating rounds, process CPU time per request.

    python scripts/bench.d/features.py geoip [REQUESTS] [ROUNDS] [DATABASE.mmdb]
    python scripts/bench.d/features.py live single|batch50 [REQUESTS] [ROUNDS]

geoip: single-event /track requests from 1,000 public addresses (a trusted
proxy's X-Forwarded-For), without --geoip and with it (GeoLite2 City from
the maxminddb-geolite2 package unless a database is given; warm cache).
live: the live page's tap with no viewer and with one viewer reading
everything; then, with the viewer, the live path's own time inside the same
requests as a share of their CPU.  Prints the medians and the paired on/off
ratios: the machine's noise shows in their spread, which the share does not
suffer from.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from events import event
from inprocess import GroupedQueue, batch50, quoted, run, single
from twisted.internet import reactor

from mixingest.api import IngestAPI
from mixingest.clientip import ClientAddress
from mixingest.funnel import Funnel
from mixingest.metrics import Metrics, PublicSite


def makeSite(**api: Any) -> tuple[Any, GroupedQueue, Funnel]:
    queue = GroupedQueue()
    metrics = Metrics()
    funnel = Funnel(queue, reactor, metrics=metrics)  # type: ignore[arg-type]
    resource = IngestAPI(funnel, reactor, maxBody=10 * 1024 * 1024, **api).resource()
    return PublicSite(resource, metrics=metrics, clock=reactor), queue, funnel


def compare(
    off: Callable[[List[bytes]], None],
    on: Callable[[List[bytes]], None],
    requests: Callable[[], List[bytes]],
    rounds: int,
) -> Dict[str, List[float]]:
    """
    Time C{off} and C{on} handling the C{requests()} made for each run
    (made before the clock starts), in alternating order, C{rounds} times
    each.
    """
    getattr(gc, "freeze", lambda: None)()
    times: Dict[str, List[float]] = {"off": [], "on": []}
    for n in range(rounds):
        for name, work in (("off", off), ("on", on)) if n % 2 else (("on", on), ("off", off)):
            batch = requests()
            started = time.process_time()
            work(batch)
            times[name].append((time.process_time() - started) / len(batch) * 1e6)
    return times


def report(what: str, times: Dict[str, List[float]]) -> None:
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    ratios = sorted(b / a for a, b in zip(times["off"], times["on"]))
    print(
        f"{what}: off {off:.1f} us/request, on {on:.1f} us/request ({(on / off - 1) * 100:+.1f}%); "
        f"paired on/off: median {statistics.median(ratios):.3f}, "
        f"range {ratios[0]:.3f}-{ratios[-1]:.3f}"
    )


def geoip(count: int, rounds: int, database: Optional[str]) -> None:
    from mixingest.geoip import GeoIPDatabase, Geolocator

    if database is None:
        from _maxminddb_geolite2 import geolite2_database

        database = geolite2_database()
    rng = random.Random(1)
    addresses: List[str] = []
    while len(addresses) < 1000:
        address = ".".join(str(rng.randint(1, 223)) for _ in range(4))
        if ipaddress.ip_address(address).is_global:
            addresses.append(address)

    def request(n: int) -> bytes:
        return (
            b"GET /track/?data=" + quoted(json.dumps(event()).encode()) + b"&ip=1 HTTP/1.1\r\n"
            b"Host: 127.0.0.1:8080\r\nUser-Agent: Mozilla/5.0\r\n"
            b"X-Forwarded-For: " + addresses[n % len(addresses)].encode() + b"\r\n\r\n"
        )

    requests = [request(n) for n in range(count)]
    trusted = ClientAddress(["127.0.0.0/8"])
    plain, plainQueue, _ = makeSite(clientAddress=trusted)
    located, locatedQueue, _ = makeSite(
        clientAddress=trusted, geo=Geolocator(GeoIPDatabase(database))
    )
    run(plain, plainQueue, requests[:2000])
    run(located, locatedQueue, requests[:2000])
    times = compare(
        lambda batch: run(plain, plainQueue, batch),
        lambda batch: run(located, locatedQueue, batch),
        lambda: requests,
        rounds,
    )
    report("single /track, --geoip", times)


def live(workload: str, count: int, rounds: int) -> None:
    """
    Whole requests with no viewer and with one (noisy: see BENCHMARKS.md),
    then the time the live path itself takes inside the same requests with
    one viewer: the tap's hooks (L{LiveTap.accepted}, called as a write
    settles) and its flushes, each timed around the call, minus the
    timer's own cost.  That share of a request is what a noisy machine
    cannot hide.
    """
    make = {"single": single, "batch50": batch50}[workload]
    site, queue, funnel = makeSite()
    run(site, queue, [make() for _ in range(300)])
    tap = funnel.live

    class Sink:
        transport = None

        def write(self, data: bytes) -> None:
            pass

        def registerProducer(self, producer: object, streaming: bool) -> None:
            pass

    def withViewer(batch: List[bytes]) -> None:
        viewer = tap.attach(Sink(), None)  # type: ignore[arg-type]
        run(site, queue, batch)
        tap.flush()
        if viewer is not None:
            tap.detach(viewer)

    times = compare(
        lambda batch: run(site, queue, batch),
        withViewer,
        lambda: [make() for _ in range(count)],
        rounds,
    )
    report(f"{workload}, one live viewer", times)

    spent = [0.0]
    clock = time.perf_counter

    def timed(function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return function(*args, **kwargs)
            finally:
                spent[0] += clock() - started

        return wrapper

    def nothing() -> None:
        pass

    empty = timed(nothing)
    calibration = []
    for _ in range(5):
        before = spent[0]
        for _ in range(100_000):
            empty()
        calibration.append((spent[0] - before) / 100_000)
    overhead = min(calibration)
    for name in ("accepted", "deduplicated", "refused", "flush"):
        setattr(tap, name, timed(getattr(tap, name)))
    shares, perRequest = [], []
    for _ in range(rounds):
        batch = [make() for _ in range(count)]
        viewer = tap.attach(Sink(), None)  # type: ignore[arg-type]
        spent[0] = 0.0
        started = time.process_time()
        run(site, queue, batch)
        tap.flush()
        total = time.process_time() - started
        if viewer is not None:
            tap.detach(viewer)
        calls = len(batch) + 1
        inside = max(0.0, spent[0] - calls * overhead)
        shares.append(inside / total)
        perRequest.append(inside / len(batch) * 1e6)
    print(
        f"{workload}, one live viewer, the live path alone: "
        f"{statistics.median(perRequest):.2f} us/request, "
        f"{statistics.median(shares) * 100:.2f}% of the request's CPU "
        f"(range {min(shares) * 100:.2f}-{max(shares) * 100:.2f}%; "
        f"timer cost {overhead * 1e9:.0f} ns per call, subtracted)"
    )


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["geoip"]:
        count = int(args[1]) if len(args) > 1 else 5000
        rounds = int(args[2]) if len(args) > 2 else 11
        geoip(count, rounds, args[3] if len(args) > 3 else None)
    elif args[:1] == ["live"] and len(args) > 1:
        count = int(args[2]) if len(args) > 2 else 3000
        rounds = int(args[3]) if len(args) > 3 else 11
        live(args[1], count, rounds)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
