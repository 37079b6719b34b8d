"""
Inspect and consume a journal from the shell: C{python -m mixingest.journal --help}.

Lock-free, so it is safe while the daemon is appending.  Only C{consume}
and C{reset} write anything: a consumer group's cursor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, BinaryIO, Dict, List, Optional, TextIO

from twisted.logger import FileLogObserver, formatEvent, globalLogBeginner

from mixingest.journal.consumer import Consumer, GroupInUse, groupStatus, resetGroup
from mixingest.journal.framing import (
    HEADER_SIZE,
    INCOMPLETE,
    JournalFormatError,
    SegmentScanner,
    listSegments,
    segmentPath,
)
from mixingest.journal.reader import (
    JournalReader,
    SegmentCounter,
    backlogAfter,
    listCheckpoints,
    listQueues,
    loadCheckpoint,
)
from mixingest.naming import validQueueName


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


def _consume(args: argparse.Namespace, out: BinaryIO) -> int:
    """
    Write a group's next items to C{out}, one per line, committing each
    batch only once it is written and flushed: killed at any point, the
    group resumes with at most the last batch written again.
    """
    left = args.max
    with Consumer(args.dataDir, args.queue, args.group, start=args.start) as consumer:
        try:
            while left is None or left > 0:
                batch = consumer.poll(args.batch if left is None else min(args.batch, left))
                if not batch:
                    if not args.follow:
                        break
                    time.sleep(args.interval)
                    continue
                for record in batch:
                    if args.envelope:
                        out.write(b'{"seq":%d,"item":%s}\n' % (record.seq, record.payload))
                    else:
                        out.write(record.payload + b"\n")
                out.flush()
                consumer.commit(batch[-1].position)
                if left is not None:
                    left -= len(batch)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except KeyboardInterrupt:
            pass
        if consumer.damagedRanges:
            print(
                f"skipped {consumer.damagedRanges} damaged ranges (logged above)", file=sys.stderr
            )
    return 0


def _groups(dataDir: str, queue: Optional[str], asJSON: bool) -> int:
    if not os.path.isdir(dataDir):
        print(f"no journal directory {dataDir}", file=sys.stderr)
        return 1
    now = time.time()
    found: Dict[str, Dict[str, Any]] = {}
    if queue is not None and not validQueueName(queue):
        print(f"invalid queue name {queue!r}", file=sys.stderr)
        return 1
    for name in listQueues(dataDir) if queue is None else [queue]:
        queueDir = os.path.join(dataDir, name)
        counter = SegmentCounter(queueDir)
        found[name] = {g: groupStatus(counter, g, now) for g in listCheckpoints(queueDir)}
    if asJSON:
        print(json.dumps({"queues": found}, indent=2, sort_keys=True))
        return 0
    for name, groups in found.items():
        for group, g in groups.items():
            print(
                f"{name} {group}: next seq {g['nextSeq']}, lag {g['lagItems']} items "
                f"({g['lagBytes']} bytes, {g['lagSeconds']:.0f}s)"
            )
    return 0


def _reset(args: argparse.Namespace) -> int:
    position = resetGroup(args.dataDir, args.queue, args.group, args.to)
    where = "the start" if position is None else f"seq {position.seq}"
    print(f"group {args.group} of {args.queue} now reads from {where}")
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


class _Findings:
    """
    What L{_verify} found, printed as it goes.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.queues = self.segments = self.records = 0
        self.damaged = self.damagedBytes = self.tornTails = self.unknown = 0

    def report(self, queue: str, base: int, what: str) -> None:
        print(f"{queue}/{os.path.basename(segmentPath('', base))}: {what}", file=self.out)

    def damage(self, queue: str, base: int, offset: int, length: int, why: str = "") -> None:
        self.damaged += 1
        self.damagedBytes += length
        self.report(queue, base, f"damaged: {length} bytes at offset {offset}{why}")

    def tornTail(self, queue: str, base: int, offset: int, length: int) -> None:
        self.tornTails += 1
        self.report(
            queue,
            base,
            f"torn tail: {length} bytes at offset {offset} (newest segment: what a crash "
            "leaves; the daemon cuts it when it next writes the queue)",
        )

    def summary(self) -> str:
        return (
            f"{self.queues} queues, {self.segments} segments, {self.records} records: "
            f"{self.damaged} damaged ranges ({self.damagedBytes} bytes), "
            f"{self.tornTails} torn tails, {self.unknown} unknown formats"
        )


def _verifySegment(findings: _Findings, queue: str, queueDir: str, base: int, newest: bool) -> None:
    try:
        scanner = SegmentScanner(segmentPath(queueDir, base))
    except FileNotFoundError:
        return  # deleted since the listing: consumed
    try:
        size = scanner.size()
        try:
            header = scanner.header()
        except JournalFormatError as e:
            findings.unknown += 1
            findings.report(queue, base, f"unknown format: {e}")
            return
        findings.segments += 1
        if header == INCOMPLETE:
            if newest:
                if size:
                    findings.tornTail(queue, base, 0, size)
            else:
                findings.damage(queue, base, 0, size, " (no segment header)")
            return
        if scanner.headerDamaged:
            findings.damage(queue, base, 0, HEADER_SIZE, " (format 2 header that says 1)")
        survey = scanner.survey(HEADER_SIZE, base)
        findings.records += survey.records
        for offset, length in survey.damaged:
            findings.damage(queue, base, offset, length)
        rest = size - survey.end
        if rest <= 0:
            return
        if newest:
            findings.tornTail(queue, base, survey.end, rest)
        else:
            why = " (format 1: the rest of the segment is lost)" if scanner.version == 1 else ""
            findings.damage(queue, base, survey.end, rest, why)
    finally:
        scanner.close()


def _verify(dataDir: str, queue: Optional[str]) -> int:
    """
    Scan every segment of every queue (or of C{queue}) and print what is
    wrong.  A torn tail of a queue's newest segment is reported but is no
    failure: a crash mid-write leaves one, and the daemon cuts it.

    @return: 0 if everything is intact, 1 for damage or an unknown format,
        2 if there is no such journal or queue.
    """
    if queue is not None and not validQueueName(queue):
        print(f"invalid queue name {queue!r}", file=sys.stderr)
        return 2
    if not os.path.isdir(dataDir):
        print(f"no journal directory {dataDir}", file=sys.stderr)
        return 2
    queues = listQueues(dataDir) if queue is None else [queue]
    if queue is not None and not os.path.isdir(os.path.join(dataDir, queue)):
        print(f"no queue {queue!r} in {dataDir}", file=sys.stderr)
        return 2
    findings = _Findings(sys.stdout)
    for name in queues:
        queueDir = os.path.join(dataDir, name)
        findings.queues += 1
        bases = listSegments(queueDir)
        for i, base in enumerate(bases):
            _verifySegment(findings, name, queueDir, base, newest=i == len(bases) - 1)
    failed = findings.damaged or findings.unknown
    print(f"{'DAMAGED' if failed else 'OK'}: {findings.summary()}")
    return 1 if failed else 0


def _positiveInt(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value}")
    return number


def _consumerCommands(commands: Any) -> None:
    consume = commands.add_parser(
        "consume",
        help="print a consumer group's next items and commit them",
        description="Write the items of QUEUE after the cursor of consumer group NAME to "
        "stdout, one JSON object per line, and move the cursor after each batch once it is "
        "written and flushed. Killed at any point, the group resumes with at most the last "
        "batch (--batch items) written again; never a gap. Damaged records are reported on "
        "stderr and skipped.",
    )
    consume.add_argument("dataDir", metavar="DATA_DIR", help="the journal directory")
    consume.add_argument("queue", metavar="QUEUE", help="the queue name")
    consume.add_argument("--group", required=True, metavar="NAME", help="the consumer group")
    consume.add_argument(
        "--follow", action="store_true", help="wait for new items instead of exiting at the end"
    )
    consume.add_argument("--max", type=_positiveInt, metavar="N", help="stop after N items")
    consume.add_argument(
        "--from",
        dest="start",
        choices=("start", "end"),
        default="start",
        help="where a new group begins (default: start); an existing group resumes",
    )
    consume.add_argument(
        "--batch", type=_positiveInt, default=1000, metavar="N", help="items per commit"
    )
    consume.add_argument(
        "--interval", type=float, default=0.2, metavar="S", help="--follow polls every S seconds"
    )
    consume.add_argument(
        "--envelope",
        action="store_true",
        help='write {"seq": N, "item": ITEM} lines, for consumers that deduplicate by seq',
    )
    groups = commands.add_parser(
        "groups",
        help="list consumer groups and their lag",
        description="For every queue (or QUEUE): each consumer group (and the forwarder's "
        "checkpoint) with the next sequence number it reads and its lag in items, bytes and "
        "seconds.",
    )
    groups.add_argument("dataDir", metavar="DATA_DIR", help="the journal directory")
    groups.add_argument("queue", metavar="QUEUE", nargs="?", help="only this queue")
    groups.add_argument("--json", action="store_true", help="print JSON instead of text")
    reset = commands.add_parser(
        "reset",
        help="move a consumer group's cursor",
        description="Move the cursor of group NAME (creating the group) to the start of "
        "QUEUE, its end, or the first item numbered SEQ or higher. Stop the group's "
        "consumers first.",
    )
    reset.add_argument("dataDir", metavar="DATA_DIR", help="the journal directory")
    reset.add_argument("queue", metavar="QUEUE", help="the queue name")
    reset.add_argument("--group", required=True, metavar="NAME", help="the consumer group")
    reset.add_argument("--to", required=True, metavar="start|end|SEQ", help="the new cursor")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mixingest.journal",
        description="Inspect a mixingest journal and consume it in consumer groups. Safe while "
        "the daemon runs; only consume and reset write (a group's cursor).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cat = commands.add_parser(
        "cat",
        help="print a queue's items",
        description="Print every item of QUEUE, one JSON object per line, oldest first. "
        "Damaged records are skipped and reported on stderr; the rest is printed.",
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
    verify = commands.add_parser(
        "verify",
        help="check every segment for damage",
        description="Scan every segment of every queue (or of QUEUE) and print each damaged "
        "range (queue, segment file, offset, length), each torn tail of a newest segment "
        "and each segment of an unknown format, then a summary line. Exit status: 0 if "
        "everything is intact (a torn tail is what a crash leaves, and the daemon cuts it), "
        "1 for damage or an unknown format, 2 for usage errors or a missing journal.",
    )
    verify.add_argument("dataDir", metavar="DATA_DIR", help="the journal directory")
    verify.add_argument("queue", metavar="QUEUE", nargs="?", help="only this queue")
    _consumerCommands(commands)
    args = parser.parse_args(argv)

    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(sys.stderr, lambda event: f"{formatEvent(event)}\n")],
        redirectStandardIO=False,
    )
    try:
        if args.command == "cat":
            return _cat(args.dataDir, args.queue)
        if args.command == "verify":
            return _verify(args.dataDir, args.queue)
        if args.command == "consume":
            return _consume(args, sys.stdout.buffer)
        if args.command == "groups":
            return _groups(args.dataDir, args.queue, args.json)
        if args.command == "reset":
            return _reset(args)
        return _stats(args.dataDir, args.json)
    except (OSError, ValueError, GroupInUse) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
