"""
The journal's on-disk format and fsync policy parsing.
"""

from __future__ import annotations

import struct
import zlib

import pytest

from mixingest.journal.framing import (
    BAD,
    HEADER,
    HEADER_SIZE,
    INCOMPLETE,
    MAX_PAYLOAD,
    OK,
    SegmentScanner,
    encodeRecords,
    listSegments,
    segmentPath,
)
from mixingest.journal.fsync import FsyncPolicy

ITEMS = [b'{"a":1}', b"x", b'{"event":"' + b"e" * 3000 + b'"}', b"{}"]


def writeSegment(path, body: bytes, header: bytes = HEADER) -> str:
    path.write_bytes(header + body)
    return str(path)


def scanAll(path: str, chunkSize: int = 1024 * 1024):
    scanner = SegmentScanner(path, chunkSize)
    try:
        assert scanner.header() == OK
        offset, items = HEADER_SIZE, []
        while True:
            status, payload, end, _ = scanner.recordAt(offset)
            if status != OK:
                return items, status, offset
            items.append(payload)
            offset = end
    finally:
        scanner.close()


@pytest.mark.parametrize("chunkSize", [1, 7, 1024 * 1024])
def test_roundTrip(tmp_path, chunkSize):
    """
    Encoded records read back whole, whatever the buffer size.
    """
    path = writeSegment(tmp_path / "s", bytes(encodeRecords(ITEMS * 3)))
    items, status, offset = scanAll(path, chunkSize)
    assert items == ITEMS * 3
    assert status == INCOMPLETE
    assert offset == (tmp_path / "s").stat().st_size


def test_recordLayout():
    """
    A record is >II (length, CRC-32 of the payload) then the payload.
    """
    assert bytes(encodeRecords([b"abc"])) == struct.pack(">II", 3, zlib.crc32(b"abc")) + b"abc"


@pytest.mark.parametrize("cut", [1, 4, 8, 9])
def test_incompleteRecord(tmp_path, cut):
    """
    A record cut short anywhere (header or payload) is INCOMPLETE, and the
    records before it are fine.
    """
    data = bytes(encodeRecords([b"first", b"second!"]))
    path = writeSegment(tmp_path / "s", data[: len(data) - 15 + cut])
    items, status, offset = scanAll(path)
    assert (items, status, offset) == ([b"first"], INCOMPLETE, HEADER_SIZE + 8 + 5)


def test_badCRC(tmp_path):
    data = bytearray(encodeRecords([b"first", b"second"]))
    data[-1] ^= 0x01
    items, status, _ = scanAll(writeSegment(tmp_path / "s", bytes(data)))
    assert (items, status) == ([b"first"], BAD)


@pytest.mark.parametrize(
    "record",
    [bytes(16), struct.pack(">II", MAX_PAYLOAD + 1, 0) + b"x" * 8],
    ids=["zeros", "huge"],
)
def test_impossibleLength(tmp_path, record):
    """
    Zero-filled space (which a crash can leave) and absurd lengths are BAD,
    not records and not something to wait for.
    """
    items, status, _ = scanAll(writeSegment(tmp_path / "s", bytes(encodeRecords([b"a"])) + record))
    assert (items, status) == ([b"a"], BAD)


@pytest.mark.parametrize(
    "header, status",
    [
        (HEADER, OK),
        (HEADER[:5], INCOMPLETE),
        (b"", INCOMPLETE),
        (bytes(8), INCOMPLETE),
        (b"NOTJRNL\x01", BAD),
        (HEADER[:-1] + b"\x02", BAD),
    ],
)
def test_header(tmp_path, header, status):
    path = writeSegment(tmp_path / "s", b"", header)
    scanner = SegmentScanner(path)
    assert scanner.header() == status
    scanner.close()


def test_scannerSeesGrowth(tmp_path):
    """
    After forget(), a record completed by a concurrent append is read.
    """
    data = bytes(encodeRecords([b"hello"]))
    path = writeSegment(tmp_path / "s", data[:6])
    scanner = SegmentScanner(path)
    assert scanner.recordAt(HEADER_SIZE)[0] == INCOMPLETE
    with open(path, "ab") as f:
        f.write(data[6:])
    scanner.forget()
    assert scanner.recordAt(HEADER_SIZE) == (
        OK,
        b"hello",
        HEADER_SIZE + len(data),
        zlib.crc32(b"hello"),
    )
    assert scanner.scan() == (1, HEADER_SIZE + len(data), INCOMPLETE)
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
