"""
Whatever is appended, and however the newest segment's tail is torn, a
reader gets a prefix of what was appended, never garbage, and appends
after reopening follow that prefix.  Wherever one byte is damaged, only
the record holding it is lost.
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from mixingest.journal.framing import (
    HEADER_SIZE,
    RECORD_HEADER_SIZE,
    JournalFormatError,
    listSegments,
    segmentPath,
)
from mixingest.journal.fsync import FsyncPolicy
from mixingest.journal.reader import JournalReader
from mixingest.journal.writer import SegmentWriter

groupsOfItems = st.lists(st.lists(st.binary(min_size=1, max_size=40), max_size=6), max_size=12)
tears = st.one_of(
    st.none(),
    st.tuples(st.integers(min_value=0, max_value=120), st.binary(max_size=24)),
)


def readWithSeqs(queueDir: str, batch: int) -> list[tuple[int, bytes]]:
    """
    Every item of the queue with its sequence number, read C{batch} at a
    time.
    """
    with JournalReader(queueDir) as reader:
        out = []
        while True:
            got = reader.read(maxItems=batch)
            if not got:
                return out
            out.extend((position.seq - 1, p) for position, p in got)


def readBack(queueDir: str, batch: int) -> list[bytes]:
    return [item for _, item in readWithSeqs(queueDir, batch)]


@settings(max_examples=80, deadline=None)
@given(
    groups=groupsOfItems,
    tear=tears,
    segmentSize=st.integers(min_value=HEADER_SIZE + 1, max_value=400),
    batch=st.integers(min_value=1, max_value=5),
)
def test_prefixNeverGarbage(groups, tear, segmentSize, batch):
    with tempfile.TemporaryDirectory() as dataDir:
        queueDir = os.path.join(dataDir, "q")
        writer = SegmentWriter(queueDir, FsyncPolicy.never(), segmentSize)
        for items in groups:
            writer.commit(items, sync=False)
        writer.close()
        appended = [item for items in groups for item in items]

        if tear is not None and listSegments(queueDir):
            # Cut the newest segment anywhere (keeping a whole header if
            # garbage follows: a crash tears data, it does not forge headers)
            # and append junk, like a crash mid-write.
            cut, junk = tear
            segment = segmentPath(queueDir, listSegments(queueDir)[-1])
            size = os.path.getsize(segment)
            keep = max(HEADER_SIZE if junk else 0, size - cut)
            with open(segment, "r+b") as f:
                f.truncate(keep)
                f.seek(keep)
                f.write(junk)

        read = readBack(queueDir, batch)
        assert read == appended[: len(read)]
        if tear is None:
            assert read == appended

        writer = SegmentWriter(queueDir, FsyncPolicy.never(), segmentSize)
        writer.commit([b"after"], sync=False)
        writer.close()
        assert readBack(queueDir, batch) == [*read, b"after"]


@settings(max_examples=150, deadline=None)
@given(
    groups=st.lists(
        st.lists(st.binary(min_size=1, max_size=60), max_size=6), min_size=1, max_size=10
    ),
    segmentSize=st.integers(min_value=HEADER_SIZE + 1, max_value=500),
    where=st.floats(min_value=0, max_value=1, exclude_max=True),
    mask=st.integers(min_value=1, max_value=255),
    batch=st.integers(min_value=1, max_value=5),
)
def test_damageCostsOnlyItsRecord(groups, segmentSize, where, mask, batch):
    """
    One damaged byte anywhere: every record whose bytes are untouched is
    read back, in order and with its number, none is invented; after the
    writer reopens the queue, appends follow them with a higher number.
    Damage in a segment header is an error (an unknown format) instead.
    """
    with tempfile.TemporaryDirectory() as dataDir:
        queueDir = os.path.join(dataDir, "q")
        writer = SegmentWriter(queueDir, FsyncPolicy.never(), segmentSize)
        for items in groups:
            writer.commit(items, sync=False)
        writer.close()
        appended = [item for items in groups for item in items]
        # Where each record lies: (segment, start, end).
        with JournalReader(queueDir) as reader:
            spans = [
                (p.segment, p.offset - RECORD_HEADER_SIZE - len(item), p.offset)
                for p, item in reader
            ]
        assert len(spans) == len(appended)

        bases = listSegments(queueDir)
        sizes = [os.path.getsize(segmentPath(queueDir, b)) for b in bases]
        at = int(where * sum(sizes))
        damaged = 0
        while at >= sizes[damaged]:
            at -= sizes[damaged]
            damaged += 1
        base = bases[damaged]
        with open(segmentPath(queueDir, base), "r+b") as f:
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ mask]))

        expected = [
            (seq, item)
            for seq, (item, (segment, start, end)) in enumerate(zip(appended, spans))
            if not (segment == base and start <= at < end)
        ]
        if at < HEADER_SIZE:
            # An unknown format, except when the version byte became 1: then
            # the records (which format 1 cannot hold) are read all the same.
            try:
                read = readWithSeqs(queueDir, batch)
            except JournalFormatError:
                return
            assert read == expected == list(enumerate(appended))
            return
        assert readWithSeqs(queueDir, batch) == expected

        writer = SegmentWriter(queueDir, FsyncPolicy.never(), segmentSize)
        writer.commit([b"after"], sync=False)
        writer.close()
        read = readWithSeqs(queueDir, batch)
        assert read[:-1] == expected and read[-1][1] == b"after"
        assert read[-1][0] >= len(appended)
