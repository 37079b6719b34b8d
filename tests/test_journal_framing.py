"""
The journal's on-disk format and fsync policy parsing.
"""

from __future__ import annotations

import os
import struct
import zlib

import pytest

from mixingest.journal.framing import (
    BAD,
    HEADER,
    HEADER_SIZE,
    HEADER_V1,
    INCOMPLETE,
    MAX_PAYLOAD,
    NO_SEQ,
    OK,
    RECORD_HEADER_SIZE,
    SYNC,
    JournalFormatError,
    Marker,
    SegmentScanner,
    checkFormats,
    encodeRecords,
    listSegments,
    segmentPath,
)
from mixingest.journal.fsync import FsyncPolicy

ITEMS = [b'{"a":1}', b"x", b'{"event":"' + b"e" * 3000 + b'"}', b"{}"]


def writeSegment(path, body: bytes, header: bytes = HEADER) -> str:
    path.write_bytes(header + body)
    return str(path)


def scanAll(path: str, chunkSize: int = 1024 * 1024, minSeq: int = 0):
    scanner = SegmentScanner(path, chunkSize)
    try:
        assert scanner.header() == OK
        offset, items = HEADER_SIZE, []
        while True:
            status, payload, end, _, _ = scanner.recordAt(offset, minSeq)
            if status != OK:
                return items, status, offset
            items.append(payload)
            offset = end
    finally:
        scanner.close()


def rawRecord(payload: bytes, seq: int, kind: int = 0, length=None) -> bytes:
    """
    A format 2 record built field by field, so that tests can forge any.
    """
    length = len(payload) if length is None else length
    prefix = struct.pack(">4sIQI", SYNC, kind << 28 | length, seq, zlib.crc32(payload))
    return prefix + struct.pack(">I", zlib.crc32(prefix)) + payload


@pytest.mark.parametrize("chunkSize", [1, 7, 1024 * 1024])
def test_roundTrip(tmp_path, chunkSize):
    """
    Encoded records read back whole, whatever the buffer size.
    """
    path = writeSegment(tmp_path / "s", bytes(encodeRecords(ITEMS * 3, 0)))
    items, status, offset = scanAll(path, chunkSize)
    assert items == ITEMS * 3
    assert status == INCOMPLETE
    assert offset == (tmp_path / "s").stat().st_size


def test_recordLayout():
    """
    A format 2 record is the sync marker, kind<<28 | length, the 64-bit
    sequence number, the payload CRC, the CRC of those 20 bytes, then the
    payload.
    """
    assert HEADER == b"MXJRNL\x00\x02"
    assert RECORD_HEADER_SIZE == 24
    prefix = SYNC + struct.pack(">IQI", 3, 41, zlib.crc32(b"abc"))
    record = prefix + struct.pack(">I", zlib.crc32(prefix)) + b"abc"
    assert bytes(encodeRecords([b"abc"], 41)) == record
    assert bytes(encodeRecords([b"abc", b"de"], 41)) == record + rawRecord(b"de", 42)


def test_markers(tmp_path):
    """
    A Marker is written as kind 1 and read back as a Marker; only when the
    caller says the group may hold markers.
    """
    items = [b"a", Marker(b"m"), b"b"]
    data = bytes(encodeRecords(items, 7, markers=True))
    assert data == rawRecord(b"a", 7) + rawRecord(b"m", 8, kind=1) + rawRecord(b"b", 9)
    assert bytes(encodeRecords(items, 7)) == b"".join(
        rawRecord(x, 7 + i) for i, x in enumerate(items)
    )
    read, _, _ = scanAll(writeSegment(tmp_path / "s", data))
    assert read == items
    assert [type(x) for x in read] == [bytes, Marker, bytes]


def test_seqs(tmp_path):
    """
    Each record carries its own sequence number; one lower than the
    minimum asked for is not a record.
    """
    path = writeSegment(tmp_path / "s", rawRecord(b"a", 5) + rawRecord(b"b", 9))
    scanner = SegmentScanner(path)
    assert scanner.header() == OK and scanner.version == 2
    first = scanner.recordAt(HEADER_SIZE, 5)
    assert first[:2] == (OK, b"a") and first[4] == 5
    assert scanner.recordAt(first[2], 6)[4] == 9
    assert scanner.recordAt(HEADER_SIZE, 6)[0] == BAD
    scanner.close()


@pytest.mark.parametrize("cut", [1, 3, 4, 12, 23, 24, 25, 30])
def test_incompleteRecord(tmp_path, cut):
    """
    A record cut short anywhere (header or payload) is INCOMPLETE, and the
    records before it are fine.
    """
    data = bytes(encodeRecords([b"first", b"second!"], 0))
    path = writeSegment(tmp_path / "s", data[: len(data) - 31 + cut])
    items, status, offset = scanAll(path)
    assert (items, status, offset) == ([b"first"], INCOMPLETE, HEADER_SIZE + 24 + 5)


def test_badCRC(tmp_path):
    data = bytearray(encodeRecords([b"first", b"second"], 0))
    data[-1] ^= 0x01
    items, status, _ = scanAll(writeSegment(tmp_path / "s", bytes(data)))
    assert (items, status) == ([b"first"], BAD)


@pytest.mark.parametrize(
    "record",
    [
        bytes(16),
        bytes(3),
        b"\xffMX\x00",
        rawRecord(b"x" * 8, 1, length=MAX_PAYLOAD + 1),
        rawRecord(b"", 1),
        rawRecord(b"x", 1, kind=2),
        rawRecord(b"x", 1)[:-6] + b"\x00" + rawRecord(b"x", 1)[-5:],
        rawRecord(b"x", 0),
    ],
    ids=["zeros", "shortZeros", "notSync", "huge", "empty", "kind", "headerCRC", "oldSeq"],
)
def test_notARecord(tmp_path, record):
    """
    Zero-filled space (which a crash can leave, however short), absurd
    lengths, unknown kinds, a bad header CRC and a sequence number that went
    backwards are BAD: not records and not something to wait for.
    """
    path = writeSegment(tmp_path / "s", bytes(encodeRecords([b"a"], 0)) + record)
    items, _, _ = scanAll(path, minSeq=0)
    scanner = SegmentScanner(path)
    scanner.header()
    assert scanner.recordAt(HEADER_SIZE + 25, 1)[0] == BAD
    scanner.close()
    assert items[0] == b"a"


def test_v1(tmp_path):
    """
    Format 1 segments (>II length and CRC, no sequence numbers) are read.
    """
    body = b"".join(struct.pack(">II", len(x), zlib.crc32(x)) + x for x in ITEMS)
    path = writeSegment(tmp_path / "s", body + b"\x00\x00", HEADER_V1)
    scanner = SegmentScanner(path)
    assert scanner.header() == OK and scanner.version == 1
    status, payload, end, crc, seq = scanner.recordAt(HEADER_SIZE)
    assert (status, payload, end, crc, seq) == (OK, ITEMS[0], 23, zlib.crc32(ITEMS[0]), NO_SEQ)
    survey = scanner.survey(HEADER_SIZE, 100)
    assert (survey.records, survey.runs, survey.nextSeq) == (4, [[100, 4]], 104)
    assert survey.end == HEADER_SIZE + len(body) and survey.damaged == []
    scanner.close()


@pytest.mark.parametrize(
    "header, status",
    [
        (HEADER, OK),
        (HEADER_V1, OK),
        (HEADER[:5], INCOMPLETE),
        (b"", INCOMPLETE),
        (bytes(8), INCOMPLETE),
        (bytes(3), INCOMPLETE),
    ],
)
def test_header(tmp_path, header, status):
    path = writeSegment(tmp_path / "s", b"", header)
    scanner = SegmentScanner(path)
    assert scanner.header() == status
    scanner.close()


@pytest.mark.parametrize(
    "header, version",
    [(b"MXJRNL\x00\x03", 3), (b"MXJRNL\x00\x00", 0), (b"NOTJRNL\x01", None), (b"NOT", None)],
)
def test_unknownHeader(tmp_path, header, version):
    """
    An unknown version, or a header that is not a journal header, is an
    error naming the file and the version: never skipped.
    """
    path = writeSegment(tmp_path / "s", bytes(encodeRecords([b"a"], 0)), header)
    scanner = SegmentScanner(path)
    with pytest.raises(JournalFormatError) as caught:
        scanner.header()
    scanner.close()
    assert caught.value.path == path and caught.value.version == version
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert path in message and "move it out of the queue directory" in message
    if version is not None:
        assert f"format version {version}" in message


def test_checkFormats(tmp_path):
    """
    checkFormats reads every segment header of every queue and raises on
    the first unknown one; torn and format 1 headers are fine.
    """
    for queue in ["a", "b"]:
        (tmp_path / queue).mkdir()
        writeSegment(tmp_path / queue / "00000000000000000000.seg", b"")
    writeSegment(tmp_path / "a" / "00000000000000000005.seg", b"", HEADER_V1)
    writeSegment(tmp_path / "a" / "00000000000000000007.seg", b"", bytes(3))
    (tmp_path / "lock").write_bytes(b"")
    (tmp_path / "not-a-queue.d").mkdir()
    writeSegment(tmp_path / "not-a-queue.d" / "00000000000000000000.seg", b"", b"JUNKJUNK")
    checkFormats(str(tmp_path))
    checkFormats(str(tmp_path / "missing"))
    bad = writeSegment(tmp_path / "b" / "00000000000000000009.seg", b"", b"MXJRNL\x00\x07")
    with pytest.raises(JournalFormatError, match="format version 7") as caught:
        checkFormats(str(tmp_path))
    assert caught.value.path == bad


@pytest.mark.parametrize("chunkSize", [1, 7, 1024 * 1024])
def test_resyncAndSurvey(tmp_path, chunkSize):
    """
    After damage the scanner finds the next intact record; a survey walks
    past damage that has an intact record after it, counts runs of
    numbers, and stops where nothing intact follows.
    """
    records = [rawRecord(b"r%d" % n, n) for n in range(6)]
    garbage = b"\xffMX\xfe" + b"junk" * 5 + SYNC
    body = b"".join(records[:2]) + garbage + b"".join(records[3:5]) + b"\x00" * 40
    path = writeSegment(tmp_path / "s", body)
    scanner = SegmentScanner(path, chunkSize)
    assert scanner.header() == OK
    damagedAt = HEADER_SIZE + len(records[0]) * 2
    assert scanner.recordAt(damagedAt)[0] == BAD
    assert scanner.resync(damagedAt + 1, 2) == (OK, damagedAt + len(garbage), 3)
    # A candidate numbered below the minimum is not accepted.
    assert scanner.resync(damagedAt + 1, 4)[0:2] == (OK, damagedAt + len(garbage) + len(records[3]))
    survey = scanner.survey(HEADER_SIZE, 0)
    assert (survey.records, survey.runs, survey.nextSeq) == (4, [[0, 2], [3, 2]], 5)
    assert survey.damaged == [(damagedAt, len(garbage))]
    assert survey.end == HEADER_SIZE + len(body) - 40
    status, at, _ = scanner.resync(survey.end + 1, 5)
    assert status == INCOMPLETE and survey.end < at <= os.path.getsize(path)
    scanner.close()


def test_resyncWaitsForIncompleteCandidate(tmp_path):
    """
    An intact-looking header whose payload runs past the end is INCOMPLETE:
    searching again from there sees it once complete.
    """
    record = rawRecord(b"payload", 3)
    path = writeSegment(tmp_path / "s", b"junk!" + record[:-2])
    scanner = SegmentScanner(path)
    scanner.header()
    assert scanner.resync(HEADER_SIZE + 1) == (INCOMPLETE, HEADER_SIZE + 5, NO_SEQ)
    with open(path, "ab") as f:
        f.write(record[-2:])
    scanner.forget()
    assert scanner.resync(HEADER_SIZE + 5) == (OK, HEADER_SIZE + 5, 3)
    scanner.close()


def test_recordEndingAt(tmp_path):
    """
    The record ending at an offset is found by looking backwards, past
    damage before it, and through a large payload.
    """
    big = b"y" * 200_000
    body = rawRecord(b"a", 0) + b"\x13" * 50 + rawRecord(b"b", 4) + rawRecord(big, 5)
    path = writeSegment(tmp_path / "s", body + rawRecord(b"c", 6))
    scanner = SegmentScanner(path)
    scanner.header()
    afterB = HEADER_SIZE + 25 + 50 + 25
    assert scanner.recordEndingAt(afterB) == (4, zlib.crc32(b"b"))
    assert scanner.recordEndingAt(HEADER_SIZE + len(body)) == (5, zlib.crc32(big))
    assert scanner.recordEndingAt(afterB - 1) is None
    assert scanner.recordEndingAt(HEADER_SIZE + 25 + 10) is None
    assert scanner.recordEndingAt(os.path.getsize(path) + 10) is None
    scanner.close()


def test_scannerSeesGrowth(tmp_path):
    """
    After forget(), a record completed by a concurrent append is read.
    """
    data = bytes(encodeRecords([b"hello"], 0))
    path = writeSegment(tmp_path / "s", data[:6])
    scanner = SegmentScanner(path)
    scanner.header()
    assert scanner.recordAt(HEADER_SIZE)[0] == INCOMPLETE
    with open(path, "ab") as f:
        f.write(data[6:])
    scanner.forget()
    assert scanner.recordAt(HEADER_SIZE) == (
        OK,
        b"hello",
        HEADER_SIZE + len(data),
        zlib.crc32(b"hello"),
        0,
    )
    survey = scanner.survey()
    assert (survey.records, survey.end, survey.damaged) == (1, HEADER_SIZE + len(data), [])
    scanner.close()


def test_segmentNames(tmp_path):
    """
    Segments are named by their first sequence number, zero-padded to sort;
    other files are ignored.
    """
    assert segmentPath("q", 12) == "q/00000000000000000012.seg"
    for name in [
        "00000000000000000100.seg",
        "00000000000000000009.seg",
        "checkpoint.x",
        "00000000000000000001.seg.tmp",
        "1.seg",
        "lock",
    ]:
        (tmp_path / name).write_bytes(b"")
    assert listSegments(str(tmp_path)) == [9, 100]
    assert listSegments(str(tmp_path / "missing")) == []


@pytest.mark.parametrize(
    "text, policy",
    [
        ("always", FsyncPolicy.always()),
        ("never", FsyncPolicy.never()),
        ("interval:250", FsyncPolicy("interval", 0.25)),
    ],
)
def test_policyParse(text, policy):
    assert FsyncPolicy.parse(text) == policy
    assert str(policy) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Always",
        "interval",
        "interval:",
        "interval:0",
        "interval:-5",
        "interval:1.5",
        "interval:abc",
        "sometimes",
    ],
)
def test_policyParseRejects(text):
    with pytest.raises(ValueError, match=r"expected 'always', 'never' or 'interval:MS'|positive"):
        FsyncPolicy.parse(text)


def test_policyDefaults():
    assert FsyncPolicy.always().syncsEveryAppend
    assert not FsyncPolicy.every(10).syncsEveryAppend
    assert FsyncPolicy.every(10).syncsEver
    assert not FsyncPolicy.never().syncsEver


def test_versionByteDamagedToOne(tmp_path):
    """
    A format 2 segment whose version byte became 1 is still read as format
    2 (no format 1 record starts with the sync marker), and says so.
    """
    path = writeSegment(tmp_path / "s", bytes(encodeRecords([b"a", b"b"], 0)), HEADER_V1)
    scanner = SegmentScanner(path)
    assert scanner.header() == OK
    assert (scanner.version, scanner.headerDamaged) == (2, True)
    assert scanner.survey().records == 2
    scanner.close()
    v1 = writeSegment(tmp_path / "v1", struct.pack(">II", 1, zlib.crc32(b"a")) + b"a", HEADER_V1)
    scanner = SegmentScanner(v1)
    assert scanner.header() == OK
    assert (scanner.version, scanner.headerDamaged) == (1, False)
    scanner.close()
