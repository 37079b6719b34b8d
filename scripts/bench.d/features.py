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

No reactor runs here, yet a daemon's tap does part of its work on timers:
a flush every 0.1 s frames the newest records and writes them to the
viewers, a count frame goes out every second.  So the tap is given a clock
of its own, moved by the process time of the rounds with the viewer at each
settle of the stub queue (DaemonTime): the timers run as often per second
of CPU as in a daemon busy on one core, by the tap's own scheduling, and
the share counts their time with the hooks'.  Of the choices, this one
follows the CPU the requests really took, round by round, where a flush
every k requests would assume a rate; and a daemon less busy flushes as
often for fewer requests, so costs more per request (BENCHMARKS.md gives a
figure).  The viewer stays connected throughout: the rounds "off" set
LiveTap.active false, as having no viewer does, so they run exactly the
code of a daemon without a viewer and pay nothing for the clock; the
rounds "on" pay for reading the process time once per settle (every 20
requests).
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
from twisted.internet.task import Clock

from mixingest.api import IngestAPI
from mixingest.clientip import ClientAddress
from mixingest.funnel import Funnel
from mixingest.live import LiveTap
from mixingest.metrics import Metrics, PublicSite


def makeSite(live: Optional[LiveTap] = None, **api: Any) -> tuple[Any, GroupedQueue, Funnel]:
    queue = GroupedQueue()
    metrics = Metrics()
    funnel = Funnel(queue, reactor, metrics=metrics, live=live)  # type: ignore[arg-type]
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


class DaemonTime:
    """
    The live tap's clock, moved by the process time of the rounds it is
    used in, at each settle of the stub queue (where the funnel calls the
    tap, as in a daemon, where records reach the tap as their writes
    settle).  Whatever the daemon's reactor would have run on the tap by
    then runs there, each call at the time it was due: its flushes every
    0.1 s and its count frames every second, as often per second of CPU
    as in a daemon kept busy on one core (one whose journal thread adds
    CPU of its own flushes less often per second of CPU).  Time stands
    still between rounds, so that state carried from one round to the
    next is charged to the round in which its flush falls.
    """

    def __init__(self, clock: Clock, queue: GroupedQueue) -> None:
        self.clock = clock
        self.queue = queue
        self.origin = 0.0

    def __enter__(self) -> None:
        self.origin = time.process_time() - self.clock.seconds()
        # An instance attribute: the rounds without a viewer call the
        # queue's own method, untouched.
        self.queue.settle = self.settle  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        del self.queue.settle
        self.keep()

    def keep(self) -> None:
        now = time.process_time() - self.origin
        # Each call at the time it was due, as the reactor would have made
        # it: what it schedules counts from then, not from this settle.
        while True:
            due = min((call.getTime() for call in self.clock.getDelayedCalls()), default=now)
            if due >= now:
                break
            self.clock.advance(due - self.clock.seconds())
        self.clock.advance(max(0.0, now - self.clock.seconds()))

    def settle(self) -> None:
        self.keep()
        GroupedQueue.settle(self.queue)


def live(workload: str, count: int, rounds: int) -> None:
    """
    Whole requests with no viewer and with one (noisy: see BENCHMARKS.md),
    then the time the live path itself takes inside the same requests with
    one viewer: the tap's hooks (L{LiveTap.accepted}, called as a write
    settles), its flushes and its count frames, each timed around the
    outermost call, minus the timer's own cost.  That share of a request is
    what a noisy machine cannot hide.

    One viewer stays connected throughout, on a tap whose clock is
    L{DaemonTime}; the rounds "off" turn the tap off as having no viewer
    does (L{LiveTap.active} false: nothing calls its hooks), so they run
    exactly the code of a daemon without a viewer, and the rounds "on" turn
    it on again and take up the tap's state and time where the last one
    left them.
    """
    make = {"single": single, "batch50": batch50}[workload]
    clock = Clock()
    clock.advance(time.time())  # timestamps of a daemon's length
    tap = LiveTap(clock)
    site, queue, _ = makeSite(live=tap)
    run(site, queue, [make() for _ in range(300)])
    daemonTime = DaemonTime(clock, queue)

    class Sink:
        transport = None

        def write(self, data: bytes) -> None:
            pass

        def registerProducer(self, producer: object, streaming: bool) -> None:
            pass

    tap.attach(Sink(), None)  # type: ignore[arg-type]
    tap.active = False

    def withViewer(batch: List[bytes]) -> None:
        tap.active = True
        with daemonTime:
            run(site, queue, batch)
        tap.active = False

    times = compare(
        lambda batch: run(site, queue, batch),
        withViewer,
        lambda: [make() for _ in range(count)],
        rounds,
    )
    report(f"{workload}, one live viewer", times)

    spent: Dict[str, float] = {}
    timings: Dict[str, int] = {}
    calls: Dict[str, int] = {}
    inside = [False]
    timer = time.perf_counter

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """
        C{function}, its time added to C{spent[name]} unless another timed
        function called it (a count frame flushes first, and frames past
        64 KiB flush at once): that time is counted already.
        """

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            if inside[0]:
                return function(*args, **kwargs)
            inside[0] = True
            timings[name] = timings.get(name, 0) + 1
            started = timer()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + timer() - started
                inside[0] = False

        return wrapper

    def nothing() -> None:
        pass

    empty = timed("nothing", nothing)
    calibration = []
    for _ in range(5):
        spent.clear()
        for _ in range(100_000):
            empty()
        calibration.append(spent["nothing"] / 100_000)
    overhead = min(calibration)
    for name in ("accepted", "deduplicated", "refused", "flush"):
        setattr(tap, name, timed(name, getattr(tap, name)))
    # What the tap's LoopingCall calls every second: the count frame.
    tap._ticker.f = timed("tick", tap._ticker.f)
    shares, perRequest, periodicPerRequest, cpu = [], [], [], 0.0
    calls.clear()
    for _ in range(rounds):
        batch = [make() for _ in range(count)]
        spent.clear()
        timings.clear()
        tap.active = True
        started = time.process_time()
        with daemonTime:
            run(site, queue, batch)
        total = time.process_time() - started
        tap.active = False
        cpu += total
        own = {name: max(0.0, spent[name] - timings[name] * overhead) for name in spent}
        shares.append(sum(own.values()) / total)
        perRequest.append(sum(own.values()) / len(batch) * 1e6)
        periodic = own.get("flush", 0.0) + own.get("tick", 0.0)
        periodicPerRequest.append(periodic / len(batch) * 1e6)
    print(
        f"{workload}, one live viewer, the live path alone: "
        f"{statistics.median(perRequest):.2f} us/request "
        f"(flushes and count frames {statistics.median(periodicPerRequest):.2f}), "
        f"{statistics.median(shares) * 100:.2f}% of the request's CPU "
        f"(range {min(shares) * 100:.2f}-{max(shares) * 100:.2f}%; "
        f"{calls.get('flush', 0) / cpu:.1f} flushes and {calls.get('tick', 0) / cpu:.1f} "
        f"count frames per second of CPU; timer cost {overhead * 1e9:.0f} ns per call, subtracted)"
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
