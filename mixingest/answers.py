"""
How mixingest answers: Mixpanel's classic C{1}/C{0} protocol with its
C{verbose}, C{callback}, C{img} and C{redirect} variants, C{/import}'s JSON
shapes, and the CORS and caching headers every answer carries.

The style of an answer is chosen from the parameters before anything is
stored, so that an unsafe C{callback} or C{redirect} refuses the request
instead of being echoed after its events were kept.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any, Dict, FrozenSet, List, Optional, Tuple
from urllib.parse import urlsplit

from twisted.web.iweb import IRequest

from mixingest import codec
from mixingest.errors import BadAnswerParameter, InvalidEvent

__all__ = [
    "PIXEL",
    "AnswerStyle",
    "answerStyle",
    "importAnswer",
    "preflight",
    "setCommonHeaders",
]

PIXEL = base64.b64decode(b"R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
"""
A 1x1 transparent GIF, what C{img=1} pixel tracking has always received.
"""

MAX_CALLBACK = 128
_URL_TEXT = re.compile(r"\A[\x21-\x7e]+\Z")
"""
What a redirect URL may contain: printable ASCII, no spaces or control
characters (a NUL or DEL in a Location header is a header-injection vector).
"""
_CALLBACK = re.compile(
    r"\A[A-Za-z_$][A-Za-z0-9_$]*(?:\.[A-Za-z_$][A-Za-z0-9_$]*|\[[0-9]{1,9}\])*\Z"
)
"""
A JavaScript identifier path (C{cb_1}, C{mpmetrics.jsonp_callback},
C{mixpanel._jsc[3]}): nothing else can be reflected into a script safely.
"""

MAX_FAILURES_LISTED = 20

_TEXT = b"text/plain; charset=utf-8"
_JSON = b"application/json"
_JAVASCRIPT = b"text/javascript; charset=utf-8"
_ONE = b"1"
_ZERO = b"0"
_VERBOSE_OK = b'{"status":1,"error":null}'
_ALLOWED_METHODS = b"GET, POST, OPTIONS"


def _dumps(value: Any) -> bytes:
    """
    Encode an answer that may quote the request (a field name, an
    C{$insert_id}): lone surrogates, which UTF-8 cannot carry, are escaped.
    """
    try:
        return codec.dumps(value)
    except ValueError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def setCommonHeaders(request: IRequest) -> None:
    """
    CORS and caching headers for every answer.

    The SDKs send credentials (C{withCredentials}), which forbids C{*}: the
    request's own Origin is echoed back, with C{Vary: Origin} so that caches
    keep the answers apart.
    """
    headers = request.responseHeaders
    origin = request.requestHeaders.getRawHeaders(b"origin")
    if origin:
        headers.setRawHeaders(b"access-control-allow-origin", origin[:1])
        headers.setRawHeaders(b"access-control-allow-credentials", [b"true"])
        headers.setRawHeaders(b"vary", [b"Origin"])
    else:
        headers.setRawHeaders(b"access-control-allow-origin", [b"*"])
    headers.setRawHeaders(b"cache-control", [b"no-cache, no-store"])


_PHRASES = {429: b"Too Many Requests"}
"""
Reason phrases twisted.web does not know (it would send C{Unknown Status}).
"""


def _finish(request: IRequest, status: int, contentType: bytes, body: bytes) -> bytes:
    request.setResponseCode(status, _PHRASES.get(status))
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [contentType])
    headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
    return body


def preflight(request: IRequest) -> bytes:
    """
    Answer a CORS preflight, allowing whatever headers the page asked for
    (the browser SDK's C{xhr_headers} are the site's own choice).
    """
    headers = request.responseHeaders
    headers.setRawHeaders(b"access-control-allow-methods", [_ALLOWED_METHODS])
    asked = request.requestHeaders.getRawHeaders(b"access-control-request-headers")
    if asked:
        headers.setRawHeaders(b"access-control-allow-headers", asked[:1])
    headers.setRawHeaders(b"access-control-max-age", [b"86400"])
    return _finish(request, 200, _TEXT, b"")


def _flag(params: Dict[str, str], name: str) -> bool:
    value = params.get(name)
    return value is not None and value not in ("0", "", "false")


def describeFailures(failures: List[Tuple[int, InvalidEvent, Optional[str]]], total: int) -> str:
    """
    One line a developer can act on: how many records failed, and why.
    """
    shown = "; ".join(f"#{index} {error}" for index, error, _ in failures[:MAX_FAILURES_LISTED])
    more = len(failures) - MAX_FAILURES_LISTED
    if more > 0:
        shown += f"; and {more} more"
    if total == 1:
        return str(failures[0][1])
    return f"{len(failures)} of {total} records failed: {shown}"


class AnswerStyle:
    """
    The classic answer variant a request asked for.
    """

    __slots__ = ("callback", "img", "redirect", "verbose")

    def __init__(
        self,
        verbose: bool = False,
        callback: Optional[str] = None,
        img: bool = False,
        redirect: Optional[bytes] = None,
    ) -> None:
        self.verbose = verbose
        self.callback = callback
        self.img = img
        self.redirect = redirect

    def success(self, request: IRequest) -> bytes:
        """
        The fast path: everything was stored.
        """
        if self.callback is None and self.redirect is None and not self.img:
            if self.verbose:
                return _finish(request, 200, _JSON, _VERBOSE_OK)
            return _finish(request, 200, _TEXT, _ONE)
        return self.answer(request, 200, True, None)

    def answer(
        self,
        request: IRequest,
        status: int,
        ok: bool,
        error: Optional[str],
        extra: Optional[Dict[str, Any]] = None,
    ) -> bytes:
        """
        Render a result in this style.  C{status} is the HTTP status for plain
        and verbose answers; JSONP, pixel and redirect answers use what a
        C{<script>}, C{<img>} or navigation can consume.
        """
        if self.redirect is not None:
            request.responseHeaders.setRawHeaders(b"location", [self.redirect])
            return _finish(request, 302, _TEXT, b"")
        if self.img:
            return _finish(request, 200, b"image/gif", PIXEL)
        if self.verbose:
            result: Dict[str, Any] = {"status": 1 if ok else 0, "error": error}
            if extra:
                result.update(extra)
            body = _dumps(result)
        else:
            body = _ONE if ok else _ZERO
        if self.callback is not None:
            script = self.callback.encode("ascii") + b"(" + body + b");"
            return _finish(request, 200, _JAVASCRIPT, script)
        return _finish(request, status, _JSON if self.verbose else _TEXT, body)


_PLAIN = AnswerStyle()
_VERBOSE = AnswerStyle(verbose=True)


def answerStyle(params: Dict[str, str], redirectHosts: FrozenSet[str] = frozenset()) -> AnswerStyle:
    """
    Choose the answer style, refusing unsafe C{callback} and C{redirect}
    values rather than reflecting them.

    @param redirectHosts: the host names (lower case) C{redirect} may lead
        to; any other, and any at all when there are none, is refused: an
        ingestion endpoint that redirects anywhere is an open redirect,
        which phishing links borrow to look trustworthy.
    """
    verbose = _flag(params, "verbose")
    callback = params.get("callback")
    redirect = params.get("redirect")
    img = _flag(params, "img")
    if callback is None and redirect is None and not img:
        return _VERBOSE if verbose else _PLAIN
    if callback is not None and (len(callback) > MAX_CALLBACK or _CALLBACK.match(callback) is None):
        raise BadAnswerParameter(
            "callback must be a JavaScript identifier path such as cb_1,"
            " mpmetrics.jsonp_callback or mixpanel._jsc[3]"
        )
    location = None
    if redirect is not None:
        try:
            parts = urlsplit(redirect)
            safe = parts.scheme in ("http", "https") and bool(parts.netloc)
            location = redirect.encode("ascii")
        except (ValueError, UnicodeEncodeError):
            safe = False
        if not safe or "\\" in redirect or _URL_TEXT.match(redirect) is None:
            raise BadAnswerParameter("redirect must be an absolute http:// or https:// URL")
        if parts.hostname not in redirectHosts:
            raise BadAnswerParameter(
                "redirect is only allowed to the hosts given with --redirect-allow"
            )
    return AnswerStyle(verbose, callback, img, location)


_IMPORT_STATUS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    413: "Request Entity Too Large",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


def importAnswer(
    request: IRequest,
    status: int,
    error: Optional[str] = None,
    imported: Optional[int] = None,
    failures: Optional[List[Tuple[int, InvalidEvent, Optional[str]]]] = None,
) -> bytes:
    """
    Mixpanel's C{/import} JSON answer for raw JSON bodies.
    """
    result: Dict[str, Any] = {"code": status}
    if error is not None:
        result["error"] = error
    if failures:
        result["failed_records"] = [
            {"index": index, "$insert_id": insertId, "field": e.field, "message": e.message}
            for index, e, insertId in failures
        ]
    if imported is not None:
        result["num_records_imported"] = imported
    result["status"] = _IMPORT_STATUS.get(status, "Error")
    return _finish(request, status, _JSON, _dumps(result))


def plainError(request: IRequest, status: int, reason: str) -> bytes:
    """
    An answer for refusals that come before any style is known.
    """
    return _finish(request, status, _TEXT, reason.encode("utf-8"))
