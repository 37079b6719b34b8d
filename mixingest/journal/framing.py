"""
The journal's on-disk format.

A queue is a directory of segment files named by the sequence number of
their first record, zero-padded so that names sort like numbers.  A segment
is an 8-byte header (C{MXJRNL\\x00} and a format version byte) followed by
records.

Format 2 (written since issue 10): each record is a 24-byte header then the
payload.  The header is L{SYNC} (4 bytes), C{kind << 28 | length} (4), the
record's own 64-bit sequence number (8), the CRC-32 of the payload (4) and
the CRC-32 of the 20 header bytes before it (4).  The sync marker and the
header CRC let a scanner find the next intact record after damage, so
damage costs only the records it touches; the explicit sequence number
means that the records after damage keep their numbers.  L{SYNC} holds the
bytes 0xFF and 0xFE, which never occur in UTF-8, so a JSON payload can never
contain something that looks like a record.

Format 1 (read only): each record is C{>II} (payload length, CRC-32 of the
payload) and the payload; sequence numbers are implicit (segment base plus
index).  With no sync marker, nothing after damage in a format 1 segment
can be found again: readers skip to the next segment.

In both formats payloads are never empty, so zero-filled space (what a
crash can leave after a file was extended but before its data reached the
disk) never parses as records.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Iterable, List, Optional, Tuple
from zlib import crc32

from mixingest.naming import validQueueName

__all__ = [
    "BAD",
    "HEADER",
    "HEADER_SIZE",
    "HEADER_V1",
    "INCOMPLETE",
    "KIND_ITEM",
    "KIND_MARKER",
    "MAX_PAYLOAD",
    "NO_SEQ",
    "OK",
    "RECORD_HEADER_SIZE",
    "SYNC",
    "V1_RECORD_HEADER_SIZE",
    "JournalFormatError",
    "Marker",
    "SegmentScanner",
    "Survey",
    "checkFormats",
    "encodeRecords",
    "listSegments",
    "segmentPath",
]

MAGIC = b"MXJRNL\x00"
HEADER = MAGIC + b"\x02"
"""
New segments start with this: the magic string and the format version (2).
"""
HEADER_V1 = MAGIC + b"\x01"
"""The header of format 1 segments, which are still read."""
HEADER_SIZE = len(HEADER)

SYNC = b"\xffMX\xfe"
"""
Every format 2 record starts with these bytes; a scanner looks for them to
find the next record after damage.
"""

_HEAD = struct.Struct(">4sIQII")
_PREFIX = struct.Struct(">4sIQI")
_U32 = struct.Struct(">I")
RECORD_HEADER_SIZE = _HEAD.size
_HEAD_CRC_END = RECORD_HEADER_SIZE - 4

_RECORD_V1 = struct.Struct(">II")
V1_RECORD_HEADER_SIZE = _RECORD_V1.size

KIND_ITEM = 0
"""A record that consumers read."""
KIND_MARKER = 1
"""A record that only readers asking for markers see (a L{Marker})."""
_LENGTH_MASK = (1 << 28) - 1
_MARKER_BITS = KIND_MARKER << 28

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
"""The bytes are not a record: bad sync marker, length, CRC or sequence number."""

NO_SEQ = -1
"""
The sequence number that L{SegmentScanner.recordAt} gives a format 1
record, which does not store its own: the reader counts.
"""

_SEGMENT_NAME = re.compile(r"\A([0-9]{20})\.seg\Z")


class Marker(bytes):
    """
    A payload written as a marker record (kind 1) rather than an item.

    Store-and-forward writes one just before a batch's copy to note what
    the remote may already hold; ordinary readers never see them.
    """

    __slots__ = ()


class JournalFormatError(ValueError):
    """
    A segment whose header is not one this version reads: written by a
    newer mixingest, or not a segment at all.  Never skipped silently, since
    that would drop every record in it.

    @ivar path: the segment file.
    @ivar version: its format version byte, or C{None} if the header is not
        a journal header at all.
    """

    def __init__(self, path: str, version: Optional[int]) -> None:
        if version is None:
            what = "does not start with a journal segment header (damaged, or not a segment)"
            todo = "restore it from a backup or move it out of the queue directory"
        else:
            what = f"is in journal format version {version}; this mixingest reads 1 and 2"
            todo = "run a mixingest release that reads it, or move it out of the queue directory"
        super().__init__(f"{path} {what}: {todo}")
        self.path = path
        self.version = version


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


def parseHeader(path: str, head: bytes) -> int:
    """
    @param head: the first (up to) L{HEADER_SIZE} bytes of segment C{path}.
    @return: the format version (1 or 2), or 0 if the header is incomplete:
        too short (being created, or torn) or zero-filled (what a crash
        right after the file was created can leave).
    @raise JournalFormatError: for any other header.
    """
    if head == HEADER:
        return 2
    if head == HEADER_V1:
        return 1
    if len(head) < HEADER_SIZE:
        if HEADER.startswith(head) or head == bytes(len(head)):
            return 0
        raise JournalFormatError(path, None)
    if head == bytes(HEADER_SIZE):
        return 0
    raise JournalFormatError(path, head[-1] if head.startswith(MAGIC) else None)


def checkFormats(dataDir: str) -> None:
    """
    Read the header of every segment of every queue in journal directory
    C{dataDir}: cheap enough for every start.

    @raise JournalFormatError: for the first segment of an unknown format.
    """
    try:
        queues = sorted(os.listdir(dataDir))
    except FileNotFoundError:
        return
    for queue in queues:
        queueDir = os.path.join(dataDir, queue)
        if not validQueueName(queue) or not os.path.isdir(queueDir):
            continue
        for base in listSegments(queueDir):
            path = segmentPath(queueDir, base)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                parseHeader(path, os.pread(fd, HEADER_SIZE, 0))
            finally:
                os.close(fd)


def encodeRecords(items: Iterable[bytes], seq: int, markers: bool = False) -> bytearray:
    """
    Frame C{items} as consecutive format 2 records, ready for one C{write}.

    @param seq: the sequence number of the first item; the others follow.
    @param markers: whether any item may be a L{Marker}, written as a
        marker record: only then is each item's type looked at, which keeps
        the common group cheap.
    """
    pack = _PREFIX.pack
    packCRC = _U32.pack
    out = bytearray()
    if markers:
        for item in items:
            kindLength = len(item) | (_MARKER_BITS if type(item) is Marker else 0)
            prefix = pack(SYNC, kindLength, seq, crc32(item))
            out += prefix
            out += packCRC(crc32(prefix))
            out += item
            seq += 1
        return out
    for item in items:
        prefix = pack(SYNC, len(item), seq, crc32(item))
        out += prefix
        out += packCRC(crc32(prefix))
        out += item
        seq += 1
    return out


class Survey:
    """
    What L{SegmentScanner.survey} found.

    @ivar records: intact records (items and markers).
    @ivar runs: C{[first seq, count]} of each run of consecutive sequence
        numbers among them, in order: more than one only after damage or a
        gap that the writer left on purpose.
    @ivar nextSeq: the sequence number after the last intact record.
    @ivar end: the offset just after the last intact record: what follows
        (if anything) is not a record, or not a whole one yet, and has no
        intact record after it.
    @ivar damaged: C{(offset, length)} of each damaged range that has an
        intact record after it.
    """

    def __init__(self, end: int, nextSeq: int) -> None:
        self.records = 0
        self.runs: List[List[int]] = []
        self.nextSeq = nextSeq
        self.end = end
        self.damaged: List[Tuple[int, int]] = []


class SegmentScanner:
    """
    Reads one segment file record by record through a buffer, by offset.

    The file may be growing (the writer appends while readers read): a
    record that runs past the end of the file is L{INCOMPLETE}, and
    L{forget} drops the buffer so that the next read sees what was appended
    since.  Only whole records whose CRCs match are returned.

    @ivar version: the segment's format, once L{header} returned L{OK}.
    @ivar headerDamaged: whether L{header} found a format 2 segment whose
        version byte says 1.
    """

    def __init__(self, path: str, chunkSize: int = 1024 * 1024) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self._chunkSize = chunkSize
        self._buf = b""
        self._bufAt = 0
        self.version = 0
        self.headerDamaged = False

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
        has them.  If it does not, the buffer starts at C{offset} afterwards.
        """
        start = offset - self._bufAt
        if start >= 0 and start + length <= len(self._buf):
            return True
        self._buf = os.pread(self._fd, max(length, self._chunkSize), offset)
        self._bufAt = offset
        return len(self._buf) >= length

    def header(self) -> int:
        """
        @return: L{OK} (and sets L{version}), or L{INCOMPLETE}: too short
            (being created, or torn) or zero-filled.
        @raise JournalFormatError: for an unknown version or a header that is
            not a journal header.
        """
        self._have(0, HEADER_SIZE)  # either way, the buffer starts at 0 now
        version = parseHeader(self.path, self._buf[:HEADER_SIZE])
        if version == 0:
            return INCOMPLETE
        if version == 1 and self._have(HEADER_SIZE, len(SYNC)):
            i = HEADER_SIZE - self._bufAt
            if self._buf[i : i + len(SYNC)] == SYNC:
                # No format 1 record starts with SYNC (its length would be
                # far too large): this is a format 2 segment whose version
                # byte was damaged.  Every record is still CRC-checked.
                self.headerDamaged = True
                version = 2
        self.version = version
        return OK

    def recordAt(self, offset: int, minSeq: int = 0) -> Tuple[int, Optional[bytes], int, int, int]:
        """
        Call L{header} first.

        @param minSeq: a format 2 record with a lower sequence number is
            L{BAD}: numbers only grow, so it is stale data, not a record.
        @return: C{(OK, payload, end, crc, seq)} for a valid record at
            C{offset}, where C{end} is the offset of the next record, C{crc}
            the payload's CRC and C{seq} its sequence number (L{NO_SEQ} in
            format 1); a marker's payload is a L{Marker}.  Otherwise
            C{(INCOMPLETE or BAD, None, offset, 0, NO_SEQ)}.
        """
        if self.version == 1:
            return self._recordAtV1(offset)
        buf = self._buf
        i = offset - self._bufAt
        if i < 0 or i + RECORD_HEADER_SIZE > len(buf):  # _have, inlined: this is hot
            if not self._have(offset, RECORD_HEADER_SIZE):
                # A record being appended starts with SYNC; anything else is not.
                status = INCOMPLETE if SYNC.startswith(self._buf[: len(SYNC)]) else BAD
                return status, None, offset, 0, NO_SEQ
            buf = self._buf
            i = 0
        sync, kindLength, seq, crc, headCRC = _HEAD.unpack_from(buf, i)
        length = kindLength & _LENGTH_MASK
        kind = kindLength >> 28
        if (
            sync != SYNC
            or crc32(buf[i : i + _HEAD_CRC_END]) != headCRC
            or kind > KIND_MARKER
            or not 0 < length <= MAX_PAYLOAD
            or seq < minSeq
        ):
            return BAD, None, offset, 0, NO_SEQ
        end = offset + RECORD_HEADER_SIZE + length
        i += RECORD_HEADER_SIZE
        if i + length > len(buf):
            if not self._have(offset, RECORD_HEADER_SIZE + length):
                return INCOMPLETE, None, offset, 0, NO_SEQ
            buf = self._buf
            i = RECORD_HEADER_SIZE
        payload = buf[i : i + length]
        if crc32(payload) != crc:
            return BAD, None, offset, 0, NO_SEQ
        if kind:
            payload = Marker(payload)
        return OK, payload, end, crc, seq

    def _recordAtV1(self, offset: int) -> Tuple[int, Optional[bytes], int, int, int]:
        if not self._have(offset, V1_RECORD_HEADER_SIZE):
            return INCOMPLETE, None, offset, 0, NO_SEQ
        length, crc = _RECORD_V1.unpack_from(self._buf, offset - self._bufAt)
        if length == 0 or length > MAX_PAYLOAD:
            return BAD, None, offset, 0, NO_SEQ
        end = offset + V1_RECORD_HEADER_SIZE + length
        if not self._have(offset, V1_RECORD_HEADER_SIZE + length):
            return INCOMPLETE, None, offset, 0, NO_SEQ
        i = offset - self._bufAt + V1_RECORD_HEADER_SIZE
        payload = self._buf[i : i + length]
        if crc32(payload) != crc:
            return BAD, None, offset, 0, NO_SEQ
        return OK, payload, end, crc, NO_SEQ

    def resync(self, offset: int, minSeq: int = 0) -> Tuple[int, int, int]:
        """
        Look for the first intact format 2 record at or after C{offset}
        (after damage: pass the damaged offset plus one).

        @return: C{(OK, at, seq)} for an intact record at C{at}, or
            C{(INCOMPLETE, at, NO_SEQ)} if there is none yet: searching again
            from C{at} later sees what was appended since.
        """
        while True:
            if not self._have(offset, len(SYNC)):
                return INCOMPLETE, offset, NO_SEQ
            found = self._buf.find(SYNC, offset - self._bufAt)
            if found < 0:
                offset = self._bufAt + len(self._buf) - len(SYNC) + 1
                continue
            candidate = self._bufAt + found
            status, _, _, _, seq = self.recordAt(candidate, minSeq)
            if status == OK:
                return OK, candidate, seq
            if status == INCOMPLETE:
                return INCOMPLETE, candidate, NO_SEQ
            offset = candidate + 1

    def recordEndingAt(self, end: int) -> Optional[Tuple[int, int]]:
        """
        Find the format 2 record that ends at C{end} by looking backwards for
        its header: cheap, however much damage lies before it.

        @return: C{(seq, payload crc)} of that record, or C{None} if no
            intact record ends there.
        """
        window = 64 * 1024
        while True:
            start = max(HEADER_SIZE, end - window)
            data = os.pread(self._fd, end - start, start)
            if len(data) < end - start:
                return None
            at = len(data) - RECORD_HEADER_SIZE
            while at >= 0:
                at = data.rfind(SYNC, 0, at + len(SYNC))
                if at < 0:
                    break
                status, _, recordEnd, crc, seq = self.recordAt(start + at)
                if status == OK:
                    # Records do not overlap: the nearest intact one decides.
                    return (seq, crc) if recordEnd == end else None
                at -= 1
            if start == HEADER_SIZE or window >= MAX_PAYLOAD + RECORD_HEADER_SIZE:
                return None
            window = min(window * 4, MAX_PAYLOAD + RECORD_HEADER_SIZE)

    def survey(self, offset: int = HEADER_SIZE, nextSeq: int = 0) -> Survey:
        """
        Walk the intact records from C{offset}, past damage that has an intact
        record after it (format 2), to the first place that has none.  Call
        L{header} first.

        @param nextSeq: the sequence number that the record at C{offset}
            should have at least (format 1: has).
        """
        result = Survey(offset, nextSeq)
        runs = result.runs
        records = 0
        v1 = self.version == 1
        while True:
            status, _, end, _, seq = self.recordAt(offset, nextSeq)
            if status == OK:
                if v1:
                    seq = nextSeq
                if runs and runs[-1][0] + runs[-1][1] == seq:
                    runs[-1][1] += 1
                else:
                    runs.append([seq, 1])
                records += 1
                nextSeq = seq + 1
                offset = end
                continue
            if status == BAD and not v1:
                found, at, _ = self.resync(offset + 1, nextSeq)
                if found == OK:
                    result.damaged.append((offset, at - offset))
                    offset = at
                    continue
            result.records = records
            result.nextSeq = nextSeq
            result.end = offset
            return result
