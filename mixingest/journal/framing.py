"""
The journal's on-disk format.

A queue is a directory of segment files named by the sequence number of
their first record, zero-padded so that names sort like numbers.  A segment
is an 8-byte header (magic and format version) followed by records, each
C{>II} (payload length, CRC-32 of the payload) and the payload.  Payloads are
never empty, so zero-filled space (what a crash can leave after a file was
extended but before its data reached the disk) never parses as records.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Iterable, List, Optional, Tuple
from zlib import crc32

__all__ = [
    "BAD",
    "HEADER",
    "HEADER_SIZE",
    "INCOMPLETE",
    "MAX_PAYLOAD",
    "OK",
    "RECORD_HEADER_SIZE",
    "SegmentScanner",
    "encodeRecords",
    "listSegments",
    "segmentPath",
]

HEADER = b"MXJRNL\x00\x01"
"""
Every segment starts with this: a magic string and the format version (1).
"""
HEADER_SIZE = len(HEADER)

_RECORD = struct.Struct(">II")
RECORD_HEADER_SIZE = _RECORD.size

MAX_PAYLOAD = 64 * 1024 * 1024
"""
The largest record payload, in bytes.  A longer length field can only be
damage, so it is reported as such rather than waited for.
"""

OK = 0
"""A whole, valid record (or header)."""
INCOMPLETE = 1
"""The file ends inside the record: torn, or a concurrent append not done yet."""
BAD = 2
"""The bytes are not a record: bad length or CRC, or a wrong segment header."""

_SEGMENT_NAME = re.compile(r"\A([0-9]{20})\.seg\Z")


def segmentPath(queueDir: str, base: int) -> str:
    """
    @param base: the sequence number of the segment's first record.
    """
    return os.path.join(queueDir, f"{base:020d}.seg")


def listSegments(queueDir: str) -> List[int]:
    """
    @return: the base sequence numbers of C{queueDir}'s segments, oldest
        first (empty if the directory does not exist).
    """
    try:
        names = os.listdir(queueDir)
    except FileNotFoundError:
        return []
    bases = []
    for name in names:
        m = _SEGMENT_NAME.match(name)
        if m is not None:
            bases.append(int(m.group(1)))
    bases.sort()
    return bases


def encodeRecords(items: Iterable[bytes]) -> bytearray:
    """
    Frame C{items} as consecutive records, ready for one C{write}.
    """
    pack = _RECORD.pack
    out = bytearray()
    for item in items:
        out += pack(len(item), crc32(item))
        out += item
    return out


class SegmentScanner:
    """
    Reads one segment file record by record through a buffer, by offset.

    The file may be growing (the writer appends while readers read): a
    record that runs past the end of the file is L{INCOMPLETE}, and
    L{forget} drops the buffer so that the next read sees what was appended
    since.  Only whole records whose CRC matches are returned.
    """

    def __init__(self, path: str, chunkSize: int = 1024 * 1024) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self._chunkSize = chunkSize
        self._buf = b""
        self._bufAt = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def forget(self) -> None:
        """
        Drop buffered bytes, so that later reads see the file as it is now.
        """
        self._buf = b""
        self._bufAt = 0

    def _have(self, offset: int, length: int) -> bool:
        """
        Make C{length} bytes at C{offset} available in the buffer if the file
        has them.
        """
        start = offset - self._bufAt
        if start >= 0 and start + length <= len(self._buf):
            return True
        self._buf = os.pread(self._fd, max(length, self._chunkSize), offset)
        self._bufAt = offset
        return len(self._buf) >= length

    def header(self) -> int:
        """
        @return: L{OK}, L{INCOMPLETE} (too short: being created, or torn) or
            L{BAD}.  A zero-filled header counts as incomplete: a crash
            right after the file was created can leave one.
        """
        if not self._have(0, HEADER_SIZE):
            return INCOMPLETE
        head = self._buf[:HEADER_SIZE]  # _have(0, ...) left the buffer at 0
        if head == HEADER:
            return OK
        if head == bytes(HEADER_SIZE):
            return INCOMPLETE
        return BAD

    def recordAt(self, offset: int) -> Tuple[int, Optional[bytes], int, int]:
        """
        @return: C{(OK, payload, end, crc)} for a valid record at C{offset},
            where C{end} is the offset of the next record; otherwise
            C{(INCOMPLETE or BAD, None, offset, 0)}.
        """
        if not self._have(offset, RECORD_HEADER_SIZE):
            return INCOMPLETE, None, offset, 0
        i = offset - self._bufAt
        length, crc = _RECORD.unpack_from(self._buf, i)
        if length == 0 or length > MAX_PAYLOAD:
            return BAD, None, offset, 0
        end = offset + RECORD_HEADER_SIZE + length
        if not self._have(offset, RECORD_HEADER_SIZE + length):
            return INCOMPLETE, None, offset, 0
        i = offset - self._bufAt + RECORD_HEADER_SIZE
        payload = self._buf[i : i + length]
        if crc32(payload) != crc:
            return BAD, None, offset, 0
        return OK, payload, end, crc

    def scan(self, offset: int = HEADER_SIZE) -> Tuple[int, int, int]:
        """
        Walk the valid records from C{offset} to the first one that is not.

        @return: C{(records, end, status)}: how many valid records, the
            offset just after the last of them, and why the walk stopped
            (L{INCOMPLETE} at the end of the file too).
        """
        records = 0
        while True:
            status, _, end, _ = self.recordAt(offset)
            if status != OK:
                return records, offset, status
            records += 1
            offset = end
