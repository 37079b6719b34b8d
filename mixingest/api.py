"""
The public HTTP API: Mixpanel's C{/track}, C{/engage}, C{/groups} and
C{/import}, as Klein routes.

A handler decodes and cleans synchronously, hands the good records to the
funnel and answers once they are stored.  Every refusal is an answer with a
reason, never a traceback; a bad record never costs the good ones beside it.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence

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
from mixingest.cleaning import Cleaned, CleanItem, Context, clean
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
from mixingest.geoip import Geolocator
from mixingest.live import reasonOf, tokenOf
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
_IMPORT_REASONS = {
    "event": "import_event",
    "properties.time": "import_time",
    "properties.distinct_id": "import_distinct_id",
    "properties.$insert_id": "import_insert_id",
    "properties.token": "import_token",
}
"""
The refusal counter of each field that C{/import} with C{strict=0} drops a
record for; any other field counts as C{import_invalid}.
"""


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
        geo: Optional[Geolocator] = None,
    ) -> None:
        """
        @param tokens: the project tokens accepted (C{--tokens}), or L{None}
            for any.
        @param redirectHosts: the hosts C{redirect=} may send a browser to
            (C{--redirect-allow}); none by default.
        @param geo: geolocation and IP privacy (C{--geoip}), or L{None}.
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
        self.geo = geo

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
            cleaned = self._clean(request, kind, decoded, tokens, modern)
        except RequestRefused as refusal:
            # The style from the body too: the Python SDK posts verbose=1.
            # An unsafe callback or redirect in the query is the refusal,
            # whatever else was wrong (no data, say).
            if style is None:
                refusal = _badAnswerParameter(request, self.redirectHosts) or refusal
            return self._refuse(request, refusal, modern, style, kind)
        total = len(decoded.items)
        lenient = modern and decoded.params.get("strict") == "0"
        if cleaned.failures and self.funnel.live.active:
            self._showInvalid(kind, 400 if modern and not lenient else 200, decoded, cleaned)
        if lenient:
            cleaned = self._dropInvalid(cleaned)
            if not cleaned.items:
                return importAnswer(request, 200, None, 0)
        if not cleaned.items:
            error = describeFailures(cleaned.failures, total) if total else "data has no records"
            if modern:
                return importAnswer(request, 400, error, 0, cleaned.failures)
            return style.answer(request, 200, False, error, _failedRecords(cleaned))
        try:
            stored = self.funnel.store(kind, cleaned.items)
        except RequestRefused as refusal:
            return self._refuse(request, refusal, modern, style, kind, cleaned.items)
        answered: Deferred[bytes] = Deferred()
        stored.addCallbacks(
            self._stored,
            self._notStored,
            callbackArgs=(request, style, modern, cleaned, total),
            errbackArgs=(request, style, modern, kind, cleaned.items),
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
        modern: bool,
    ) -> Cleaned:
        records = decoded.items
        if len(records) > self.maxBatch:
            raise BodyTooLarge(
                f"{len(records)} records in one request; the limit is {self.maxBatch}"
            )
        wantsIP = decoded.params.get("ip")
        if wantsIP is None:
            # With --geoip, /track geolocates the request's address unless
            # ip=0, as Mixpanel does; /import's requests come from servers,
            # so only the events' own ip properties are geolocated there.
            default = endpoint == "engage" or (self.geo is not None and endpoint == "track")
            wantsIP = "1" if default else "0"
        ip = self.clientAddress(request) if wantsIP == "1" else None
        received = round(self.clock.seconds(), 3)
        context = Context(received, ip, tokens, self.geo, endpoint == "import" and modern)
        cleaned = clean(endpoint, records, context)
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

    def _dropInvalid(self, cleaned: Cleaned) -> Cleaned:
        """
        C{strict=0}: Mixpanel's answer has no per-record errors, so the
        invalid records are dropped, counted by field in C{/stats} and
        C{/metrics}, and logged.
        """
        if not cleaned.failures:
            return cleaned
        reasons: Dict[str, int] = {}
        for _, error, _ in cleaned.failures:
            if error.message == UNKNOWN_TOKEN:  # counted as unknown_token already
                continue
            reason = _IMPORT_REASONS.get(error.field, "import_invalid")
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, count in reasons.items():
            self.funnel.countRefused(reason, count)
        self.log.info(
            "/import strict=0: {count} invalid records dropped: {why}",
            count=len(cleaned.failures),
            why=describeFailures(cleaned.failures, len(cleaned.failures) + len(cleaned.items)),
        )
        return Cleaned(cleaned.items, [], cleaned.truncated)

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
        self,
        failure: Failure,
        request: IRequest,
        style: AnswerStyle,
        modern: bool,
        kind: str,
        items: Sequence[CleanItem],
    ) -> bytes:
        if failure.check(RequestRefused):
            refusal = failure.value
        elif failure.check(QueueUnavailable):
            refusal = _unavailable(f"queue unavailable: {failure.value}")
        else:
            self.log.failure("storing events failed", failure)
            refusal = _unavailable("internal error storing events; retry")
            refusal.status = 500
        return self._refuse(request, refusal, modern, style, kind, items)

    def _refuse(
        self,
        request: IRequest,
        refusal: RequestRefused,
        modern: bool,
        style: Optional[AnswerStyle] = None,
        kind: str = "",
        items: Sequence[CleanItem] = (),
    ) -> bytes:
        """
        Answer a request refused as a whole; C{items} are its cleaned records
        when it got that far, for the live view.
        """
        if refusal.retryAfter is not None:
            request.setHeader(b"retry-after", b"%d" % refusal.retryAfter)
        if modern or (refusal.status == 401 and style is None and _isJSONBody(request)):
            status = 400 if refusal.status == 200 else refusal.status
            answer = importAnswer(request, status, refusal.reason)
        else:
            if style is None:
                style = _fallbackStyle(request, self.redirectHosts)
            answer = style.answer(request, refusal.status, False, refusal.reason)
        live = self.funnel.live
        if live.active:
            status = getattr(request, "code", refusal.status)
            tokens = [item.token for item in items] or [""]
            live.refused(
                kind,
                status,
                reasonOf(status),
                [(token, "", refusal.reason, None) for token in tokens],
            )
        return answer

    def _showInvalid(self, kind: str, status: int, decoded: Decoded, cleaned: Cleaned) -> None:
        """
        Show the records refused one by one on the live view, with the field
        and message their answer gives.
        """
        records = decoded.items
        failures = []
        for index, error, _ in cleaned.failures:
            record = records[index] if index < len(records) else None
            failures.append((tokenOf(record), error.field, error.message, record))
        unknown = [f for f in failures if f[2] == UNKNOWN_TOKEN]
        if unknown:
            self.funnel.live.refused(kind, status, "unauthorised", unknown)
        self.funnel.live.refused(
            kind, status, "invalid", [f for f in failures if f[2] != UNKNOWN_TOKEN]
        )


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
