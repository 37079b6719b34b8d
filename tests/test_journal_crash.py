"""
SIGKILL a process appending with fsync=always: every append it saw
acknowledged is read back, and the journal reopens and goes on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest_twisted

from mixingest.journal import Journal
from mixingest.journal.framing import listSegments
from mixingest.journal.reader import JournalReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent(
    """
    import os, sys
    from twisted.internet import reactor
    from mixingest.journal import Journal

    journal = Journal(sys.argv[1], segmentSize=16 * 1024)
    journal.startService()
    counter = [0]

    def acked(_, first, count):
        os.write(1, b"".join(b"%d\\n" % n for n in range(first, first + count)))

    def pump():
        # Keep several appends in flight so that a group is being written
        # and another is queued at any moment.
        for _ in range(10):
            first, count = counter[0], 1 + counter[0] % 3
            counter[0] += count
            items = [b'{"n":%d,"pad":"%s"}' % (n, b"x" * (n % 50))
                     for n in range(first, first + count)]
            journal.put("q", items).addCallback(acked, first, count)
        reactor.callLater(0.001, pump)

    reactor.callWhenRunning(pump)
    reactor.run()
    """
)


@pytest_twisted.inlineCallbacks
def test_killedWriterLosesNothingAcknowledged(tmp_path):
    dataDir = str(tmp_path / "data")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, dataDir],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    try:
        acked = []
        while len(acked) < 2000:
            line = child.stdout.readline()
            assert line, "the child died"
            acked.append(int(line))
    finally:
        os.kill(child.pid, signal.SIGKILL)
        rest = child.stdout.read()
        child.stdout.close()
        child.wait(30)
    # Only whole lines: the last one may have been cut by the kill.
    acked.extend(int(n) for n in rest.split(b"\n")[:-1])

    def numbers():
        with JournalReader(os.path.join(dataDir, "q")) as reader:
            return [json.loads(p)["n"] for _, p in reader]

    stored = numbers()
    # The journal holds exactly a prefix of what was appended (some of it
    # perhaps never acknowledged), and every acknowledged item is in it.
    assert stored == list(range(len(stored)))
    assert max(acked) < len(stored)
    assert len(listSegments(os.path.join(dataDir, "q"))) > 2  # it rotated

    journal = Journal(dataDir)
    journal.startService()
    try:
        yield journal.put("q", [b'{"n":-1}'])
    finally:
        yield journal.stopService()
    assert numbers() == [*stored, -1]
