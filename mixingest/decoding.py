"""
From an HTTP request's query and body to a list of JSON values, one per
event or profile update, exactly as the Mixpanel SDKs send them.

The parameters may arrive in the query, in a form body of any content type
(C{sendBeacon} posts C{text/plain}), or both; C{data} may be raw JSON or
base64 in any of the dialects the SDKs produce; the body may be gzipped or be
raw JSON or ndjson.  Everything here is synchronous, allocation-light and
raises L{DecodeError} or L{BodyTooLarge} with a reason a developer can act on.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import zlib
from typing import Any, Dict, List, Optional
from urllib.parse import parse_qsl, unquote_to_bytes

import attr

from mixingest import codec
from mixingest.errors import BodyTooLarge, DecodeError

__all__ = [
    "MAX_GZIP_RATIO",
    "MAX_PARAMETERS",
    "MIN_MAX_VALUES",
    "VALUES_PER_RECORD",
    "Decoded",
    "checkValues",
    "countValues",
    "decodeBase64",
    "decodeData",
    "decodeRequest",
    "decompress",
    "maxValuesFor",
    "parseParams",
]

MAX_PARAMETERS = 100
"""
More form or query fields than any SDK sends; past it the request is refused
before it costs more parsing.
"""

MAX_GZIP_RATIO = 1000
"""
Compressed bodies inflating past this ratio (and past 1 MiB) are bombs, not
event batches: refused while inflating, before the memory is spent.
"""

VALUES_PER_RECORD = 128
"""
JSON values (elements, object members) a request may hold per record of
its batch limit, on average: an SDK event holds 20 to 40, Mixpanel allows
255 properties.  See L{maxValuesFor}.
"""

MIN_MAX_VALUES = 1 << 18
"""
The fewest JSON values any request may hold, whatever the batch limit: as
many as a 100,000-level nesting, which the parser refuses cheaply.
"""

_GZIP_MAGIC = b"\x1f\x8b"
_URLSAFE = bytes.maketrans(b"-_", b"+/")
_GZIP_ENCODINGS = frozenset((b"gzip", b"x-gzip"))
_IDENTITY = frozenset((b"", b"identity"))


@attr.s(slots=True, auto_attribs=True)
class Decoded:
    """
    A decoded request.

    @ivar params: the single-valued parameters other than C{data} (first
        value wins), from the query and a form body.
    @ivar items: one decoded JSON value per record, in request order; the
        cleaner decides whether each is a valid event.
    @ivar lineErrors: for ndjson bodies, the index of each line that was not
        JSON and why; those indexes have L{None} in C{items}.
    @ivar raw: the payload was a raw JSON body rather than C{data=}.
    """

    params: Dict[str, str]
    items: List[Any]
    lineErrors: Dict[int, str] = attr.ib(factory=dict)
    raw: bool = False


def maxValuesFor(maxBatch: int) -> int:
    """
    The most JSON values a request with at most C{maxBatch} records may hold
    before it is decoded.

    Decoded JSON costs up to 30 bytes of memory per byte of text (C{[{},{},
    ...]}: a 64-byte dict per three bytes), so a body under C{--max-body}
    could still cost hundreds of MB before the batch limit refuses it.  Per
    value, though, it costs at most about 160 bytes (an object member with
    a short key and string), so this bound caps the memory of one decode at
    about 40 MB by default.
    """
    return max(MIN_MAX_VALUES, maxBatch * VALUES_PER_RECORD)


def countValues(data: bytes) -> int:
    """
    An upper bound of the JSON values in C{data}, counted in C rather than
    parsed: every array element and object member after the first follows a
    comma, every first one an opening bracket, every ndjson line a line
    break.  Commas and brackets inside strings are counted too, which only
    errs on the safe side.
    """
    return data.count(b",") + data.count(b"{") + data.count(b"[") + data.count(b"\n") + 1


def checkValues(data: bytes, maxValues: Optional[int]) -> None:
    """
    Refuse JSON text holding more than C{maxValues} values before it is
    parsed, so that no request materialises more objects than that.

    @raise BodyTooLarge: it holds more.
    """
    # Each value takes at least one byte: a shorter text cannot hold more.
    if maxValues is not None and len(data) > maxValues and countValues(data) > maxValues:
        raise BodyTooLarge(
            f"data holds more than {maxValues} JSON values; send fewer records per request"
        )


def decompress(body: bytes, maxBody: int) -> bytes:
    """
    Inflate a gzip (or zlib) body without ever holding more than C{maxBody}
    bytes of output.  Only one gzip member is read: anything after it is an
    error rather than silently dropped events.
    """
    inflater = zlib.decompressobj(wbits=47)
    try:
        out = inflater.decompress(body, maxBody + 1)
    except zlib.error:
        raise DecodeError("body is marked Content-Encoding: gzip but is not valid gzip") from None
    if len(out) > maxBody:
        raise BodyTooLarge(f"body exceeds {maxBody} bytes once decompressed")
    if len(out) > 1 << 20 and len(out) > MAX_GZIP_RATIO * len(body):
        raise BodyTooLarge(f"body decompresses more than {MAX_GZIP_RATIO} times its size")
    if not inflater.eof:
        raise DecodeError("gzip body is truncated")
    if inflater.unused_data:
        raise DecodeError("gzip body has data after its end; send one gzip member")
    return out


def decodeBase64(data: bytes) -> bytes:
    """
    Decode base64 as every SDK dialect sends it: standard or URL-safe, padded
    or not, with C{+} turned into a space by form decoding (the Node SDK posts
    its base64 unescaped) and with MIME line breaks.
    """
    if b" " in data:
        data = data.replace(b" ", b"+")
    if b"\n" in data or b"\r" in data:
        data = data.replace(b"\r", b"").replace(b"\n", b"")
    if b"-" in data or b"_" in data:
        data = data.translate(_URLSAFE)
    data = data.rstrip(b"=")
    if len(data) % 4 == 1:
        raise DecodeError("data is neither JSON nor valid base64 (bad length)")
    data += b"=" * (-len(data) % 4)
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise DecodeError("data is neither JSON nor valid base64 (invalid characters)") from None


def decodeData(data: bytes, maxValues: Optional[int] = None) -> List[Any]:
    """
    Decode one C{data} parameter (raw JSON or base64 of JSON) into a list of
    records: a single object becomes a list of one.

    @param maxValues: refuse JSON holding more values than this before
        parsing it (see L{checkValues}); L{None} for no bound.
    """
    start = data[:1]
    if start not in (b"{", b"["):
        stripped = data.strip()
        if not stripped:
            raise DecodeError("data, missing or empty")
        if stripped[:1] in (b"{", b"["):
            data = stripped
        else:
            data = decodeBase64(stripped).strip()
            if data[:1] not in (b"{", b"["):
                raise DecodeError("data must be a JSON object or array")
            if b"\xed" in data:
                data = _CESU8_PAIR.sub(_joinSurrogates, data)
    return _records(data, maxValues)


_CESU8_PAIR = re.compile(rb"\xed([\xa0-\xaf])([\x80-\xbf])\xed([\xb0-\xbf])([\x80-\xbf])")


def _joinSurrogates(pair: re.Match[bytes]) -> bytes:
    """
    mixpanel-browser's base64 encodes UTF-8 one UTF-16 code unit at a time
    (CESU-8), so a character past U+FFFF (an emoji) arrives as two encoded
    surrogates: join them into the character's real UTF-8.
    """
    high = ((pair[1][0] & 0x0F) << 6) | (pair[2][0] & 0x3F)
    low = ((pair[3][0] & 0x0F) << 6) | (pair[4][0] & 0x3F)
    return chr(0x10000 + (high << 10) + low).encode("utf-8")


def _records(data: bytes, maxValues: Optional[int]) -> List[Any]:
    checkValues(data, maxValues)
    try:
        value = codec.loads(data)
    except ValueError as e:
        raise DecodeError(f"data is not valid JSON: {e}") from None
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        return [value]
    raise DecodeError("data must be a JSON object or array")


def _unquote(text: str) -> bytes:
    """
    Form-decode one ASCII key or value exactly as C{parse_qsl} does (C{+}
    is a space, then each valid C{%XX} is its byte, anything else stays)
    into the bytes sent, with the stdlib's own C{unquote_to_bytes}, the
    function C{parse_qsl} applies to ASCII text.  That costs a Python loop
    step per escape: base64 of non-ASCII text escapes a C{+} or C{/} every
    few dozen bytes, so where escapes are dense, the three that base64 uses
    are replaced in C first.
    """
    if "+" in text:
        text = text.replace("+", " ")
    if "%" not in text:
        return text.encode("ascii")
    if text.count("%") * _DENSE_ESCAPES > len(text):
        # The patterns start with the only "%" they hold and their
        # replacements hold none, so no replacement can make or break
        # another escape: with no "%" left, each one was a valid escape.
        fast = text.replace("%2B", "+").replace("%2F", "/").replace("%3D", "=")
        if "%" not in fast:
            return fast.encode("ascii")
    return unquote_to_bytes(text)


_DENSE_ESCAPES = 100
"""
Escapes are dense from one per this many bytes: there three passes of
C{str.replace} cost less than C{unquote_to_bytes}'s loop (measured).
"""


def _parseForm(raw: bytes, into: Dict[str, str], data: List[bytes]) -> None:
    # Every request passes here, and parse_qsl's generality costs more than
    # the rest of decoding a single event.  An ASCII form without ";" (a
    # separator to parse_qsl before Python 3.9.2) within the field limit is
    # split here, as ASCII text (whose scans are cheaper than bytes'), with
    # the same results; anything else goes the stdlib's way, limit errors
    # included.  An unescaped ASCII key or value is its own text already.
    if not raw.isascii():
        _parseFormStdlib(raw, into, data)
        return
    text = raw.decode("ascii")
    if ";" in text:
        _parseFormStdlib(raw, into, data)
        return
    if "&" in text:
        if text.count("&") >= MAX_PARAMETERS:
            _parseFormStdlib(raw, into, data)
            return
        fields = text.split("&")
    else:
        fields = [text]
    for field in fields:
        if not field:
            continue
        key, _, value = field.partition("=")
        if "%" in key or "+" in key:
            # Escapes may spell non-ASCII bytes: decoded as UTF-8, as below.
            key = _unquote(key).decode("utf-8", "replace")
        if key == "data":
            data.append(_unquote(value))
        elif key not in into:
            if "%" in value or "+" in value:
                value = _unquote(value).decode("utf-8", "replace")
            into[key] = value


def _parseFormStdlib(raw: bytes, into: Dict[str, str], data: List[bytes]) -> None:
    # parse_qsl on bytes insists on ASCII (a percent-escaped UTF-8 character
    # raises): parse latin-1 text instead, which maps every byte to one
    # character and back, so values come out as the exact bytes sent.
    try:
        fields = parse_qsl(
            raw.decode("latin-1"),
            keep_blank_values=True,
            max_num_fields=MAX_PARAMETERS,
            encoding="latin-1",
        )
    except ValueError:
        raise DecodeError(f"more than {MAX_PARAMETERS} parameters") from None
    for key, value in fields:
        if key == "data":
            data.append(value.encode("latin-1"))
        else:
            name = key if key.isascii() else key.encode("latin-1").decode("utf-8", "replace")
            if name not in into:
                into[name] = (
                    value if value.isascii() else value.encode("latin-1").decode("utf-8", "replace")
                )


def parseParams(query: bytes) -> Dict[str, str]:
    """
    The parameters of a query string other than C{data}, leniently: for
    answering a request that was refused before it could be decoded.
    """
    params: Dict[str, str] = {}
    # Past the limit, the first fields still say how to answer (verbose=1).
    query = b"&".join(query.split(b"&", MAX_PARAMETERS)[:MAX_PARAMETERS])
    with contextlib.suppress(DecodeError):
        _parseForm(query, params, [])
    return params


def _ndjson(body: bytes, maxRecords: Optional[int]) -> Decoded:
    # The body passed checkValues, which counts line breaks: the lines are
    # bounded, and no more than maxRecords of them are parsed.
    items: List[Any] = []
    errors: Dict[int, str] = {}
    for line in body.split(b"\n"):
        line = line.strip()
        if not line:
            continue
        if len(items) == maxRecords:
            raise BodyTooLarge(
                f"more than {maxRecords} records in one request; the limit is {maxRecords}"
            )
        try:
            items.append(codec.loads(line))
        except ValueError as e:
            errors[len(items)] = f"line is not valid JSON: {e}"
            items.append(None)
    return Decoded({}, items, errors, True)


def decodeRequest(
    query: bytes,
    body: bytes,
    contentEncoding: Optional[bytes],
    maxBody: int,
    maxRecords: Optional[int] = None,
    maxValues: Optional[int] = None,
) -> Decoded:
    """
    Decode a request's parameters and records.

    A body whose first non-blank byte is C{{} or C{[} is raw JSON (or ndjson)
    whatever its Content-Type; any other body is a form, whatever its
    Content-Type, because browsers' C{sendBeacon} posts forms as text/plain.

    @param maxRecords: refuse an ndjson body of more lines than this while
        reading it (a JSON array's length is the caller's to check).
    @param maxValues: refuse JSON holding more values than this before
        parsing it (see L{maxValuesFor}).
    """
    params: Dict[str, str] = {}
    data: List[bytes] = []
    if query:
        _parseForm(query, params, data)
    if body:
        encoding = (contentEncoding or b"").strip().lower()
        if encoding in _GZIP_ENCODINGS or body[:2] == _GZIP_MAGIC:
            body = decompress(body, maxBody)
        elif encoding not in _IDENTITY:
            raise DecodeError(
                f"unsupported Content-Encoding {encoding.decode('latin-1')!r}; send gzip or nothing"
            )
        head = body[:1]
        if head not in (b"{", b"[") and head in (b" ", b"\t", b"\r", b"\n"):
            body = body.strip()
            head = body[:1]
        if head in (b"{", b"["):
            if data:
                raise DecodeError("data given both in the query and as a JSON body")
            try:
                return Decoded(params, _records(body, maxValues), {}, True)
            except DecodeError:
                if b"\n" not in body:
                    raise
            decoded = _ndjson(body, maxRecords)
            decoded.params = params
            return decoded
        _parseForm(body, params, data)
    if not data:
        raise DecodeError("data, missing or empty")
    if len(data) > 1:
        raise DecodeError("data given more than once")
    return Decoded(params, decodeData(data[0], maxValues))
