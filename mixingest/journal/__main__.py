"""
Inspect a journal from the shell: C{python -m mixingest.journal --help}.

Read-only and lock-free, so it is safe while the daemon is appending.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

from twisted.logger import FileLogObserver, formatEvent, globalLogBeginner

from mixingest.journal.framing import listSegments, segmentPath
from mixingest.journal.reader import (
    JournalReader,
    SegmentCounter,
    backlogAfter,
    listCheckpoints,
    listQueues,
    loadCheckpoint,
)
from mixingest.queues.base import validQueueName


def _cat(dataDir: str, queue: str) -> int:
    queueDir = os.path.join(dataDir, queue)
    if not validQueueName(queue) or not os.path.isdir(queueDir):
        print(f"no queue {queue!r} in {dataDir}", file=sys.stderr)
        return 1
    out = sys.stdout.buffer
    try:
        with JournalReader(queueDir) as reader:
            for _, item in reader:
                out.write(item)
                out.write(b"\n")
        out.flush()
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, and keep Python from
        # complaining when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _queueStats(queueDir: str) -> Dict[str, Any]:
    counter = SegmentCounter(queueDir)
    records, _ = backlogAfter(counter, None)
    bases = listSegments(queueDir)
    checkpoints = {}
    for name in listCheckpoints(queueDir):
        position = loadCheckpoint(queueDir, name)
        backlog, backlogBytes = backlogAfter(counter, position)
        checkpoints[name] = {
            "position": None if position is None else position._asdict(),
            "backlogRecords": backlog,
            "backlogBytes": backlogBytes,
        }
    return {
        "records": records,
        "segments": len(bases),
        "bytes": sum(os.path.getsize(segmentPath(queueDir, b)) for b in bases),
        "checkpoints": checkpoints,
    }


def _stats(dataDir: str, asJSON: bool) -> int:
    if not os.path.isdir(dataDir):
        print(f"no journal directory {dataDir}", file=sys.stderr)
        return 1
    stats = {q: _queueStats(os.path.join(dataDir, q)) for q in listQueues(dataDir)}
    if asJSON:
        print(json.dumps({"queues": stats}, indent=2, sort_keys=True))
        return 0
    for queue, s in stats.items():
        print(f"{queue}: {s['records']} records, {s['segments']} segments, {s['bytes']} bytes")
        for name, c in s["checkpoints"].items():
            p = c["position"]
            where = (
                "not committed"
                if p is None
                else (f"at segment {p['segment']} offset {p['offset']} (seq {p['seq']})")
            )
            print(
                f"  checkpoint {name} {where}: backlog {c['backlogRecords']} records, "
                f"{c['backlogBytes']} bytes"
            )
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mixingest.journal",
        description="Inspect a mixingest journal. Read-only; safe while the daemon runs.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cat = commands.add_parser(
        "cat",
        help="print a queue's items",
        description="Print every item of QUEUE, one JSON object per line, oldest first. "
        "Damaged records are skipped and reported on stderr.",
    )
    cat.add_argument("dataDir", metavar="DATA_DIR", help="the journal directory")
    cat.add_argument("queue", metavar="QUEUE", help="the queue name")
    stats = commands.add_parser(
        "stats",
        help="summarise every queue",
        description="For every queue: record, segment and byte counts, and each "
        "checkpoint with its position and backlog (records and bytes after it).",
    )
    stats.add_argument("dataDir", metavar="DATA_DIR", help="the journal directory")
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)

    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(sys.stderr, lambda event: f"{formatEvent(event)}\n")],
        redirectStandardIO=False,
    )
    try:
        if args.command == "cat":
            return _cat(args.dataDir, args.queue)
        return _stats(args.dataDir, args.json)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
