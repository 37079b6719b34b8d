"""
The CPU cost of mixingest's Kestrel write path, in process, against a real
memcached on loopback (it answers the same C{set} as Kestrel):
C{KestrelQueue.put} of batches of 50 items of ~300 bytes, driven by 50
concurrent callers (as 50 HTTP connections would), each awaiting its put
before the next.

    python scripts/bench.d/kestrel_writer.py [--puts N] [--rounds R]
        [--per-put K] [--old REV] [--profile]

Reports the process CPU time per event (C{time.process_time} around a
bounded number of puts, so reactor, socket and Deferred costs all count)
as the median and range over the rounds.  The queue of git revision REV
(default HEAD) is loaded into a module of its own and measured interleaved
with the working tree's, round by round, so both see the same machine; the
ratio old/new is printed.  With C{--profile}, one extra run per variant
under cProfile prints its top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.util
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from events import storedItems
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults

from tests.servers import freePort

ROOT = Path(__file__).resolve().parent.parent.parent
CALLERS = 50


async def sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def loadOld(rev: str) -> types.ModuleType:
    """C{mixingest/queues/kestrel.py} at C{rev}, as a module of its own."""
    path = "mixingest/queues/kestrel.py"
    source = subprocess.check_output(["git", "-C", str(ROOT), "show", f"{rev}:{path}"])
    spec = importlib.util.spec_from_loader("mixingest_old_kestrel", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
    return module


class Memcached:
    """A throw-away memcached on a free loopback port."""

    def __init__(self) -> None:
        binary = shutil.which("memcached") or "/usr/bin/memcached"
        if not Path(binary).exists():
            raise SystemExit("memcached is not installed")
        self.port = freePort()
        args = [binary, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", "64"]
        if os.geteuid() == 0:
            args += ["-u", "root"]  # memcached refuses to run as root without it
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


async def started(queueClass: Any, port: int) -> Any:
    queue = queueClass([("127.0.0.1", port)], reactor, connectionsPerServer=2)
    queue.startService()
    for _ in range(500):
        if queue.ready():
            return queue
        await sleep(0.01)
    raise RuntimeError("no memcached connection")


async def workload(queue: Any, pool: List[bytes], perPut: int, puts: int) -> int:
    """
    C{puts} puts of C{perPut} items by L{CALLERS} concurrent callers.
    @return: the number of events put.
    """
    remaining = [puts]
    cursor = [0]

    async def caller() -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            start = cursor[0]
            cursor[0] = (start + perPut) % (len(pool) - perPut)
            await queue.put("events", pool[start : start + perPut])

    await gatherResults([Deferred.fromCoroutine(caller()) for _ in range(CALLERS)])
    return puts * perPut


async def measure(
    queueClass: Any, port: int, pool: List[bytes], perPut: int, puts: int, profile: bool
) -> float:
    """CPU microseconds per event for one run of C{puts} puts."""
    queue = await started(queueClass, port)
    try:
        await workload(queue, pool, perPut, max(CALLERS, puts // 10))  # warm up
        gc.collect()
        profiler = cProfile.Profile() if profile else None
        start = time.process_time()
        if profiler is not None:
            profiler.enable()
        events = await workload(queue, pool, perPut, puts)
        if profiler is not None:
            profiler.disable()
        cpu = time.process_time() - start
        if profiler is not None:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        stored = sum(s["stored"] for s in queue.status()["servers"])
        if stored < events:
            raise RuntimeError(f"only {stored} of {events} events stored")
        return cpu / events * 1e6
    finally:
        await queue.stopService()


def summary(values: List[float]) -> str:
    return (
        f"{statistics.median(values):7.2f} µs/event (range {min(values):.2f} to {max(values):.2f})"
    )


async def main(args: argparse.Namespace) -> None:
    from mixingest.queues import kestrel as new

    variants: Dict[str, Any] = {
        f"old ({args.old})": loadOld(args.old).KestrelQueue,
        "new": new.KestrelQueue,
    }
    pool = storedItems(2000)
    server = Memcached()
    try:
        await sleep(0.3)
        figures: Dict[str, List[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, queueClass in variants.items():
                figures[name].append(
                    await measure(queueClass, server.port, pool, args.per_put, args.puts, False)
                )
        print(
            f"batches of {args.per_put} items of ~{len(pool[0])} bytes, {args.puts} puts, "
            f"{CALLERS} callers, {args.rounds} interleaved rounds:"
        )
        for name, values in figures.items():
            print(f"  {name:12s} {summary(values)}")
        oldName, newName = variants
        ratios = [o / n for o, n in zip(figures[oldName], figures[newName])]
        print(
            f"  old/new per round: median {statistics.median(ratios):.2f} "
            f"(range {min(ratios):.2f} to {max(ratios):.2f})"
        )
        if args.profile:
            for name, queueClass in variants.items():
                print(f"\n--- profile: {name}")
                await measure(queueClass, server.port, pool, args.per_put, args.puts, True)
    finally:
        server.stop()


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--puts", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-put", type=int, default=50)
    parser.add_argument("--old", default="HEAD")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    failure: List[BaseException] = []

    async def go() -> None:
        try:
            await main(args)
        except BaseException as e:
            failure.append(e)
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(go()))
    reactor.run()
    if failure:
        raise failure[0]


if __name__ == "__main__":
    run()
