"""
The public HTTP API: Mixpanel's C{/track}, C{/engage}, C{/groups} and
C{/import}, as Klein routes.

A handler decodes and cleans synchronously, hands the good records to the
funnel and answers once they are stored.  Every refusal is an answer with a
reason, never a traceback; a bad record never costs the good ones beside it.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any, Dict, FrozenSet, Iterable, List, Optional

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException

from mixingest._klein import AcyclicKleinResource
from mixingest.answers import (
    AnswerStyle,
    answerStyle,
    describeFailures,
    importAnswer,
    plainError,
    preflight,
    setCommonHeaders,
)
from mixingest.auth import ImportSecrets
from mixingest.cleaning import Cleaned, Context, clean
from mixingest.clientip import ClientAddress
from mixingest.decoding import Decoded, decodeRequest, maxValuesFor, parseParams
from mixingest.defaults import DEFAULT_MAX_BATCH
from mixingest.errors import (
    BadAnswerParameter,
    BodyTooLarge,
    InvalidEvent,
    Overloaded,
    QueueUnavailable,
    RequestRefused,
    Unauthorized,
)
from mixingest.funnel import Funnel
from mixingest.tokens import TokenList

__all__ = ["UNKNOWN_TOKEN", "IngestAPI"]

QUEUE_RETRY_AFTER = 5
BUDGET_RETRY_AFTER = 1
UNKNOWN_TOKEN = "not a project token this server accepts"
"""
Why a record for a token missing from C{--tokens} is refused.
"""
_TOKEN_FIELDS = {
    "track": "properties.token",
    "import": "properties.token",
    "engage": "$token",
    "groups": "$token",
}
_METHODS = ["GET", "POST", "OPTIONS"]
_ROUTE = "/<any(track, engage, groups, import):kind>"
_JSON_TYPES = (b"application/json", b"application/x-ndjson", b"application/x-json-stream")


class IngestAPI:
    """
    The Klein application; one instance per daemon, bound to its funnel.
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        funnel: Funnel,
        clock: IReactorTime,
        maxBody: int,
        maxBatch: int = DEFAULT_MAX_BATCH,
        secrets: Optional[ImportSecrets] = None,
        clientAddress: Optional[ClientAddress] = None,
        tokens: Optional[TokenList] = None,
        redirectHosts: Iterable[str] = (),
    ) -> None:
        """
        @param tokens: the project tokens accepted (C{--tokens}), or L{None}
            for any.
        @param redirectHosts: the hosts C{redirect=} may send a browser to
            (C{--redirect-allow}); none by default.
        """
        self.funnel = funnel
        self.clock = clock
        self.maxBody = maxBody
        self.maxBatch = maxBatch
        self.maxValues = maxValuesFor(maxBatch)
        self.secrets = secrets
        self.clientAddress = clientAddress or ClientAddress()
        self.tokens = tokens
        self.redirectHosts = frozenset(host.lower() for host in redirectHosts)

    def resource(self) -> IResource:
        # Klein's own resource leaves every request in a reference cycle,
        # which costs dearly once requests wait for fsync (see _klein).
        return AcyclicKleinResource(self.app)

    @app.handle_errors(HTTPException)
    def routingError(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        setCommonHeaders(request)
        if error.code == 405:
            request.setHeader(b"allow", b"GET, POST, OPTIONS")
        return plainError(request, error.code, f"{error.name}\n")

    @app.route(_ROUTE, methods=_METHODS)
    @app.route(_ROUTE + "/", methods=_METHODS, endpoint="ingest_slash")
    def ingest(self, request: IRequest, kind: str) -> Any:
        setCommonHeaders(request)
        if request.method == b"OPTIONS":
            return preflight(request)
        modern = kind == "import" and _isJSONBody(request)
        style: Optional[AnswerStyle] = None
        try:
            decoded = self._decode(request)
            style = answerStyle(decoded.params, self.redirectHosts)
            tokens = None
            if kind == "import":
                if self.secrets is None:
                    raise Unauthorized("/import is not enabled: start with --import-secrets")
                tokens = self.secrets.tokensFor(request, decoded.params)
            cleaned = self._clean(request, kind, decoded, tokens)
        except RequestRefused as refusal:
            # The style from the body too: the Python SDK posts verbose=1.
            # An unsafe callback or redirect in the query is the refusal,
            # whatever else was wrong (no data, say).
            if style is None:
                refusal = _badAnswerParameter(request, self.redirectHosts) or refusal
            return self._refuse(request, refusal, modern, style)
        total = len(decoded.items)
        if not cleaned.items:
            error = describeFailures(cleaned.failures, total) if total else "data has no records"
            if modern:
                return importAnswer(request, 400, error, 0, cleaned.failures)
            return style.answer(request, 200, False, error, _failedRecords(cleaned))
        try:
            stored = self.funnel.store(kind, cleaned.items)
        except RequestRefused as refusal:
            return self._refuse(request, refusal, modern, style)
        answered: Deferred[bytes] = Deferred()
        stored.addCallbacks(
            self._stored,
            self._notStored,
            callbackArgs=(request, style, modern, cleaned, total),
            errbackArgs=(request, style, modern),
        ).chainDeferred(answered)
        return answered

    def _decode(self, request: IRequest) -> Decoded:
        if getattr(request, "bodyTooLarge", False):
            raise BodyTooLarge(f"body exceeds {self.maxBody} bytes")
        if getattr(request, "bodyOverBudget", False):
            raise Overloaded(
                "too many request bodies are being received at once; retry", BUDGET_RETRY_AFTER
            )
        uri = request.uri
        mark = uri.find(b"?")
        query = uri[mark + 1 :] if mark >= 0 else b""
        content = request.content
        body = content.read() if content is not None else b""
        if len(body) > self.maxBody:
            raise BodyTooLarge(f"body exceeds {self.maxBody} bytes")
        return decodeRequest(
            query,
            body,
            request.getHeader(b"content-encoding"),
            self.maxBody,
            self.maxBatch,
            self.maxValues,
        )

    def _clean(
        self,
        request: IRequest,
        endpoint: str,
        decoded: Decoded,
        tokens: Optional[FrozenSet[str]],
    ) -> Cleaned:
        records = decoded.items
        if len(records) > self.maxBatch:
            raise BodyTooLarge(
                f"{len(records)} records in one request; the limit is {self.maxBatch}"
            )
        wantsIP = decoded.params.get("ip")
        if wantsIP is None:
            wantsIP = "1" if endpoint == "engage" else "0"
        ip = self.clientAddress(request) if wantsIP == "1" else None
        received = round(self.clock.seconds(), 3)
        cleaned = clean(endpoint, records, Context(received, ip, tokens))
        if self.tokens is not None:
            cleaned = self._knownTokensOnly(endpoint, cleaned, len(records))
        if decoded.lineErrors:
            for i, (index, _, insertId) in enumerate(cleaned.failures):
                reason = decoded.lineErrors.get(index)
                if reason is not None:
                    cleaned.failures[i] = (index, InvalidEvent("", reason), insertId)
        return cleaned

    def _knownTokensOnly(self, endpoint: str, cleaned: Cleaned, total: int) -> Cleaned:
        """
        Refuse, each alone, the records for a token not in C{--tokens}: a
        failure like any invalid record's, counted, never stored.
        """
        known = self.tokens
        assert known is not None
        unknown = [i for i, item in enumerate(cleaned.items) if item.token not in known]
        if not unknown:
            return cleaned
        # Each record is an item or a failure, in request order: the items'
        # indexes in the request are those that did not fail.
        failed = {index for index, _, _ in cleaned.failures}
        indexes = [index for index in range(total) if index not in failed]
        error = InvalidEvent(_TOKEN_FIELDS[endpoint], UNKNOWN_TOKEN)
        items = cleaned.items
        failures = cleaned.failures + [(indexes[i], error, items[i].insertId) for i in unknown]
        failures.sort(key=itemgetter(0))
        refused = set(unknown)
        kept = [item for i, item in enumerate(items) if i not in refused]
        self.funnel.countRefused("unknown_token", len(unknown))
        return Cleaned(kept, failures, cleaned.truncated)

    def _stored(
        self,
        _: None,
        request: IRequest,
        style: AnswerStyle,
        modern: bool,
        cleaned: Cleaned,
        total: int,
    ) -> bytes:
        if modern:
            if cleaned.failures:
                return importAnswer(
                    request,
                    400,
                    "some data points in the request failed validation",
                    len(cleaned.items),
                    cleaned.failures,
                )
            return importAnswer(request, 200, None, len(cleaned.items))
        if not cleaned.failures:
            return style.success(request)
        return style.answer(
            request,
            200,
            True,
            describeFailures(cleaned.failures, total),
            _failedRecords(cleaned),
        )

    def _notStored(
        self, failure: Failure, request: IRequest, style: AnswerStyle, modern: bool
    ) -> bytes:
        if failure.check(RequestRefused):
            refusal = failure.value
        elif failure.check(QueueUnavailable):
            refusal = _unavailable(f"queue unavailable: {failure.value}")
        else:
            self.log.failure("storing events failed", failure)
            refusal = _unavailable("internal error storing events; retry")
            refusal.status = 500
        return self._refuse(request, refusal, modern, style)

    def _refuse(
        self,
        request: IRequest,
        refusal: RequestRefused,
        modern: bool,
        style: Optional[AnswerStyle] = None,
    ) -> bytes:
        if refusal.retryAfter is not None:
            request.setHeader(b"retry-after", b"%d" % refusal.retryAfter)
        if modern or (refusal.status == 401 and style is None and _isJSONBody(request)):
            status = 400 if refusal.status == 200 else refusal.status
            return importAnswer(request, status, refusal.reason)
        if style is None:
            style = _fallbackStyle(request, self.redirectHosts)
        return style.answer(request, refusal.status, False, refusal.reason)


def _unavailable(reason: str) -> RequestRefused:
    refusal = RequestRefused(reason)
    refusal.status = 503
    refusal.retryAfter = QUEUE_RETRY_AFTER
    return refusal


def _isJSONBody(request: IRequest) -> bool:
    contentType = request.getHeader(b"content-type")
    if contentType is None:
        return False
    return contentType.split(b";", 1)[0].strip().lower() in _JSON_TYPES


def _queryParams(request: IRequest) -> Dict[str, str]:
    uri = request.uri
    mark = uri.find(b"?")
    return parseParams(uri[mark + 1 :]) if mark >= 0 else {}


def _badAnswerParameter(
    request: IRequest, redirectHosts: FrozenSet[str]
) -> Optional[BadAnswerParameter]:
    """
    The refusal of an unsafe C{callback} or C{redirect} in the query, if
    there is one.
    """
    try:
        answerStyle(_queryParams(request), redirectHosts)
    except BadAnswerParameter as bad:
        return bad
    return None


def _fallbackStyle(request: IRequest, redirectHosts: FrozenSet[str]) -> AnswerStyle:
    """
    The answer style from the query alone, for requests refused before their
    parameters could be decoded; an unsafe style falls back to plain.
    """
    params = _queryParams(request)
    try:
        return answerStyle(params, redirectHosts)
    except RequestRefused:
        return AnswerStyle(verbose=params.get("verbose") == "1")


def _failedRecords(cleaned: Cleaned) -> Optional[Dict[str, List[Dict[str, Any]]]]:
    if not cleaned.failures:
        return None
    return {
        "failed_records": [
            {"index": index, "field": e.field, "message": e.message}
            for index, e, _ in cleaned.failures
        ]
    }
