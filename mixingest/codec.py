"""
The JSON codec for the hot path, chosen per interpreter.

ujson is the fastest codec on CPython, but on PyPy its C-extension bridge makes
it about ten times slower than PyPy's own pure-Python C{json}, which the JIT
compiles well.  Both are wrapped so that callers see one behaviour: C{loads}
raises L{ValueError} for anything that is not exactly one JSON document and
C{dumps} returns compact UTF-8 C{bytes} (non-ASCII kept as UTF-8, C{/} not
escaped), raising L{ValueError} for values JSON cannot carry (lone
surrogates).  Neither rejects NaN or infinities: the cleaner does, because it
must walk every value anyway.
"""

from __future__ import annotations

import json
import platform
from typing import Any, Callable

__all__ = ["CODEC_NAME", "dumps", "loads"]

loads: Callable[[bytes | str], Any]
dumps: Callable[[Any], bytes]

if platform.python_implementation() == "CPython":  # pragma: no branch
    import ujson

    CODEC_NAME = "ujson"
    _ujsonDumps = ujson.dumps

    def loads(data: bytes | str) -> Any:
        return ujson.loads(data)

    def dumps(value: Any) -> bytes:
        try:
            # ensure_ascii, encode_html_chars, escape_forward_slashes, all
            # False, passed by position (ujson's order since 1.x): parsing
            # them as keywords costs more than encoding a small event's
            # values (test_codec checks the three still mean what they did).
            return _ujsonDumps(value, False, False, False).encode()
        except (UnicodeEncodeError, OverflowError, TypeError) as e:
            raise ValueError(str(e)) from None

else:  # pragma: no cover - exercised by the PyPy tox environment
    CODEC_NAME = "json"
    _encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

    def loads(data: bytes | str) -> Any:
        if isinstance(data, bytes):
            # As ujson does: encoded surrogates decode to lone surrogates,
            # which the cleaner refuses record by record; other invalid
            # UTF-8 fails the whole document.
            data = data.decode("utf-8", "surrogatepass")
        try:
            return json.loads(data)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None

    def dumps(value: Any) -> bytes:
        try:
            return _encoder.encode(value).encode("utf-8")
        except (UnicodeEncodeError, RecursionError, TypeError) as e:
            raise ValueError(str(e)) from None
