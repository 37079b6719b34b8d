"""
How fast a consumer group reads the journal: the figures of README
"Consumer groups", reproducible.

    python scripts/bench.d/consume.py [--items N] [--runs R]

Writes N items (default 200,000; SDK-shaped events as the funnel stores
them, about 350 bytes each, from events.py) with the journal's own
L{SegmentWriter} into a temporary directory, then times, R rounds (default
5) in turns so that drift in the machine's load hits all alike:

  - C{consume}: C{python -m mixingest.journal consume DATA events --group G}
    (default C{--batch 1000}) into a pipe that this process drains;
  - C{consume --batch 100}: the same, a commit (an fsync) per 100 items;
  - C{api}: a Python process reading with L{Consumer}, C{poll(1000)} and a
    commit per poll.

Every run reads the whole queue as a new group, process start included,
and must deliver exactly N items.  Prints each way's items per second:
median, minimum and maximum over the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from events import storedItems

from mixingest.journal.fsync import FsyncPolicy
from mixingest.journal.writer import SegmentWriter

ROOT = Path(__file__).resolve().parent.parent.parent
SEGMENT_SIZE = 64 * 1024 * 1024
"""The daemon's default C{--segment-size}."""
CHUNK = 1 << 20

API_READER = """
import sys
from mixingest.journal import Consumer

count = 0
with Consumer(sys.argv[1], "events", sys.argv[2]) as consumer:
    while True:
        records = consumer.poll(1000)
        if not records:
            break
        count += len(records)
        consumer.commit()
print(count)
"""


def write(dataDir: str, count: int) -> float:
    """
    Fill C{dataDir}'s queue C{events} with C{count} items.

    @return: their mean size in bytes.
    """
    items = storedItems(1000)
    writer = SegmentWriter(os.path.join(dataDir, "events"), FsyncPolicy.never(), SEGMENT_SIZE)
    for first in range(0, count, len(items)):
        writer.commit(items[: count - first], sync=False)
    writer.close()
    return sum(map(len, items)) / len(items)


def drained(command: List[str]) -> Tuple[int, bytes]:
    """
    Run C{command}, reading its standard output from a pipe as fast as it
    comes.

    @return: how many lines it wrote, and the last one.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    lines, tail = 0, b""
    while chunk := os.read(fd, CHUNK):
        lines += chunk.count(b"\n")
        tail = (tail + chunk)[-200:]
    proc.stdout.close()
    assert proc.wait() == 0, command
    return lines, tail.rstrip(b"\n").rpartition(b"\n")[2]


def measure(dataDir: str, way: str, group: str, count: int) -> float:
    """
    @return: items per second for one read of the whole queue as C{group};
        the reader must deliver exactly C{count} items (the API reader
        prints how many it read).
    """
    consume = [sys.executable, "-m", "mixingest.journal", "consume", dataDir, "events"]
    if way == "consume":
        command = [*consume, "--group", group]
    elif way == "consume --batch 100":
        command = [*consume, "--group", group, "--batch", "100"]
    else:
        command = [sys.executable, "-c", API_READER, dataDir, group]
    started = time.perf_counter()
    lines, last = drained(command)
    elapsed = time.perf_counter() - started
    delivered = int(last) if way == "api" else lines
    assert delivered == count, (way, delivered, count)
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    ways = ["consume", "consume --batch 100", "api"]
    results: Dict[str, List[float]] = {way: [] for way in ways}
    with tempfile.TemporaryDirectory(prefix="mixingest-consume-") as dataDir:
        size = write(dataDir, args.items)
        print(f"{args.items} items of {size:.0f} bytes on average, {args.runs} rounds")
        for run in range(args.runs):
            order = ways if run % 2 == 0 else ways[::-1]
            for way in order:
                group = f"{way.replace(' ', '').replace('-', '')}{run}"
                results[way].append(measure(dataDir, way, group, args.items))
    for way, rates in results.items():
        print(
            f"{way:22s} median {statistics.median(rates):9,.0f} items/s  "
            f"(min {min(rates):,.0f}, max {max(rates):,.0f})"
        )


if __name__ == "__main__":
    main()
