"""
The CPU cost of mixingest's Redis write path, in process, against a real
redis-server on loopback: C{RedisQueue.put} driven by 50 concurrent callers
(as 50 HTTP connections would), each awaiting its put before the next.

    python scripts/bench.d/redis_writer.py [batch50|single|both] [--puts N]
        [--rounds R] [--profile] [--old REV]

Workloads: C{batch50}, every put 50 items of ~300 bytes; C{single}, every
put one item (the queue coalesces what arrives while a write is in flight).
Reports the process CPU time per event (C{time.process_time} around a
bounded number of puts, so reactor, socket and Deferred costs all count)
as the median and range over the rounds.  With C{--old REV} the queue of
that git revision (default HEAD) is loaded into a module of its own and
measured interleaved with the working tree's, round by round, so both see
the same machine; the ratio old/new is printed per workload.  With
C{--profile}, one extra run per variant under cProfile prints its top
functions by own time.

redis-server runs without persistence here: an fsync per write would only
add latency, and latency changes how many puts coalesce into one write.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.util
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from events import storedItems
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint

from tests.servers import freePort

ROOT = Path(__file__).resolve().parent.parent.parent
CALLERS = 50
BATCH = 50


def loadOld(rev: str) -> types.ModuleType:
    """
    C{mixingest/queues/redis.py} and its scripts module at C{rev}, as
    modules of their own, so both versions run in this process.
    """

    def load(name: str, path: str) -> types.ModuleType:
        source = subprocess.check_output(["git", "-C", str(ROOT), "show", f"{rev}:{path}"])
        spec = importlib.util.spec_from_loader(name, loader=None)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
        return module

    oldScripts = load("mixingest_old_redis_scripts", "mixingest/queues/redis_scripts.py")
    old = load("mixingest_old_redis", "mixingest/queues/redis.py")
    old.scripts = oldScripts  # type: ignore[attr-defined]
    return old


class Redis:
    """A throw-away redis-server on a free loopback port, without persistence."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed")
        self.directory = tempfile.mkdtemp(prefix="bench-redis-")
        self.port = freePort()
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def started(queueClass: Any, port: int) -> Any:
    endpoint = HostnameEndpoint(reactor, "127.0.0.1", port, timeout=2)
    queue = queueClass(endpoint, reactor, address=f"bench:{port}", prefix="bench:")
    queue.startService()
    for _ in range(500):
        if queue.ready():
            return queue
        await sleep(0.01)
    raise RuntimeError("no Redis connection")


async def workload(queue: Any, pool: List[bytes], perPut: int, puts: int, lanes: int) -> int:
    """
    C{puts} puts of C{perPut} items by L{CALLERS} concurrent callers, spread
    over C{lanes} lists (each list has its own write in flight: more than
    one approximates what pipelining a list's writes would cost).
    @return: the number of events put.
    """
    remaining = [puts]
    cursor = [0]
    done: List[Deferred[None]] = []

    def caller(_: object, finished: Deferred[None], name: str) -> None:
        # Plain callbacks, not coroutines: the caller's own cost stays small
        # next to the queue's, as an HTTP request answered on a callback.
        if remaining[0] <= 0:
            finished.callback(None)
            return
        remaining[0] -= 1
        start = cursor[0]
        cursor[0] = (start + perPut) % (len(pool) - perPut)
        queue.put(name, pool[start : start + perPut]).addCallback(caller, finished, name)

    for n in range(CALLERS):
        finished: Deferred[None] = Deferred()
        done.append(finished)
        caller(None, finished, f"events{n % lanes}")
    await gatherResults(done)
    return puts * perPut


async def measure(
    queueClass: Any,
    port: int,
    pool: List[bytes],
    perPut: int,
    puts: int,
    profile: bool,
    lanes: int = 1,
) -> tuple[float, float]:
    """CPU microseconds per event, and events per wall second, for C{puts} puts."""
    queue = await started(queueClass, port)
    try:
        await workload(queue, pool, perPut, max(CALLERS, puts // 10), lanes)  # warm up
        gc.collect()
        profiler = cProfile.Profile() if profile else None
        start = time.process_time()
        wall = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        events = await workload(queue, pool, perPut, puts, lanes)
        if profiler is not None:
            profiler.disable()
        cpu = time.process_time() - start
        wall = time.perf_counter() - wall
        if profiler is not None:
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(18)
        return cpu / events * 1e6, events / wall
    finally:
        await queue.stopService()


def summary(values: List[float]) -> str:
    low, high = min(values), max(values)
    return f"{statistics.median(values):7.2f} µs/event (range {low:.2f} to {high:.2f})"


async def main(args: argparse.Namespace) -> None:
    from mixingest.queues import redis as new

    variants: Dict[str, Any] = {"new": new.RedisQueue}
    if args.old:
        variants = {"old": loadOld(args.old).RedisQueue, **variants}
    workloads = {"batch50": (BATCH, args.puts), "single": (1, args.puts * 10)}
    chosen = list(workloads) if args.workload == "both" else [args.workload]
    redis = Redis()
    try:
        await sleep(0.3)
        pool = storedItems(5000)
        results: Dict[tuple[str, str], List[float]] = {}
        rates: Dict[tuple[str, str], List[float]] = {}
        for _ in range(args.rounds):
            for name in chosen:
                perPut, puts = workloads[name]
                for variant, queueClass in variants.items():
                    for lanes in args.lanes:
                        key = variant if lanes == 1 else f"{variant}/{lanes}"
                        value, rate = await measure(
                            queueClass, redis.port, pool, perPut, puts, False, lanes
                        )
                        results.setdefault((name, key), []).append(value)
                        rates.setdefault((name, key), []).append(rate)
        for name in chosen:
            perPut, puts = workloads[name]
            for key in sorted({k for n, k in results if n == name}):
                print(
                    f"{name:8} {key:6} {summary(results[name, key])}, "
                    f"{statistics.median(rates[name, key]):9.0f} events/s wall"
                )
            if "old" in variants:
                ratios = [o / n for o, n in zip(results[name, "old"], results[name, "new"])]
                print(
                    f"{name:8} old/new  {statistics.median(ratios):.2f} "
                    f"(range {min(ratios):.2f} to {max(ratios):.2f}, {args.rounds} rounds)"
                )
        if args.profile:
            for name in chosen:
                perPut, puts = workloads[name]
                for variant, queueClass in variants.items():
                    print(f"\n=== cProfile: {name}, {variant} ===")
                    await measure(queueClass, redis.port, pool, perPut, puts, True)
    finally:
        redis.stop()


def run(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "workload", nargs="?", default="both", choices=["batch50", "single", "both"]
    )
    parser.add_argument("--puts", type=int, default=2000, help="puts of 50 per run (singles: x10)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--lanes", type=int, nargs="+", default=[1], help="lists the callers spread over"
    )
    parser.add_argument("--old", nargs="?", const="HEAD", default=None, metavar="REV")
    args = parser.parse_args(argv)

    def go(_: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(main(args))

    task.react(go)


if __name__ == "__main__":
    run(sys.argv[1:])
