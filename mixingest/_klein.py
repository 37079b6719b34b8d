# -*- test-case-name: tests.test_api -*-
"""
Klein's resource without the reference cycle it makes for every request.

C{klein.resource.KleinResource.render} (Klein 24.8) defines its error
handler C{processing_failed} as a closure that calls itself, so the function
and its closure cell form a cycle, and the closure holds the request: every
request's whole object graph (request, headers, Klein's adapters, the URL
map adapter, some forty objects) can only be freed by the cyclic garbage
collector.  A handler that answers at once lets the young collection free
it cheaply; mixingest's handlers wait for the journal's fsync, so by then the
graph has survived a collection or two and is freed only by the expensive
older-generation ones: that cost a quarter of the CPU and made the p99
latency (see BENCHMARKS.md).

L{AcyclicKleinResource} renders exactly as Klein does (same routing, error
handlers, cancellation when the client goes away, and answers) with the
callbacks as module functions taking the request as an argument, so that a
finished request is freed by reference counting alone.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from klein import Response
from klein import _resource as _kleinResource
from klein._app import route_metadata
from klein.interfaces import IKleinRequest
from klein.resource import KleinResource
from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.python import log
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import IRenderable, IRequest
from twisted.web.resource import IResource, getChildForRequest
from twisted.web.template import renderElement
from werkzeug.exceptions import HTTPException

__all__ = ["AcyclicKleinResource"]

_StandIn = _kleinResource.StandInResource
_utf8 = _kleinResource.ensure_utf8_bytes


def _process(r: object, request: IRequest) -> Any:
    if isinstance(r, Response):
        r = r._applyToRequest(request)
    if IResource.providedBy(r):
        request.render(getChildForRequest(r, request))  # type: ignore[attr-defined]
        return _StandIn
    if IRenderable.providedBy(r):
        renderElement(request, r)
        return _StandIn
    return r


def _failed(
    failure: Failure,
    handlers: List[Any],
    request: IRequest,
    finished: List[bool],
    app: Any,
) -> Optional[Deferred[Any]]:
    if finished[0]:
        if not failure.check(defer.CancelledError):
            log.err(failure, "Unhandled Error Processing Request.")
        return None
    if not handlers:
        if failure.check(HTTPException):
            he = failure.value
            request.setResponseCode(he.code)
            resp = he.get_response({})
            for header, value in resp.headers:
                request.setHeader(_utf8(header), _utf8(value))
            return succeed(_utf8(b"".join(resp.iter_encoded())))
        request.processingFailed(failure)  # type: ignore[attr-defined]
        return None
    exceptions, handler = handlers[0]
    if failure.check(*exceptions):
        d = maybeDeferred(app.execute_error_handler, handler, request, failure)
        d.addCallback(_process, request)
        return d.addErrback(_failed, handlers[1:], request, finished, app)
    return _failed(failure, handlers[1:], request, finished, app)


def _write(r: object, request: IRequest, finished: List[bool]) -> None:
    if r is _StandIn:
        return
    if isinstance(r, str):
        r = r.encode("utf-8")
    if isinstance(r, bytes):
        request.write(r)
    if not finished[0]:
        request.finish()


def _finished(result: object, finished: List[bool], handling: List[Any]) -> None:
    """
    The request is answered or its client gone: in the latter case, cancel
    the handler's result if it is still pending (as Klein does, with one
    C{notifyFinish} where Klein asks for two, a Deferred less per request).
    """
    finished[0] = True
    if isinstance(result, Failure) and handling:
        handling[0].cancel()


def _execute(
    app: Any, mapper: Any, match: Optional[Tuple[Any, Any]], request: Any, finished: List[bool]
) -> Deferred[Any]:
    # Matched again here when it failed in render: the exception (not
    # found, method not allowed, a redirect) is raised into the Deferred,
    # where the error handlers see it.
    rule, kwargs = match if match is not None else mapper.match(return_rule=True)
    endpoint = rule.endpoint
    segments = route_metadata(app.endpoints[endpoint]).segment_count
    request.prepath.extend(request.postpath[:segments])
    request.postpath = request.postpath[segments:]
    # Asked before the handler runs, so that finished is set even if the
    # request ends while it runs; then nothing is left to cancel.
    handling: List[Any] = []
    request.notifyFinish().addBoth(_finished, finished, handling)
    d = maybeDeferred(app.execute_endpoint, endpoint, request, **kwargs)
    handling.append(d)
    return d


ROUTE_CACHE = 256
"""Routed URLs remembered; past it, the cache starts again empty."""


class AcyclicKleinResource(KleinResource):
    """
    A L{KleinResource} whose rendering leaves no reference cycle behind,
    and which remembers how it routed a URL: binding Werkzeug's map and
    matching the path cost some 10 us a request, for the same handful of
    URLs every time.  Only successful matches are kept (what the map
    answers depends on nothing else than the key), and the map must not
    change once requests come, which Klein apps do not do.
    """

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self._routes: Dict[Tuple[str, str, str, str, bytes], Tuple[Any, Any]] = {}

    def render(self, request: IRequest) -> Any:
        try:
            scheme, serverName, _, pathInfo, scriptName = _kleinResource.extractURLparts(request)
        except _kleinResource.URLDecodeError as e:
            for what, fail in e.errors:
                log.err(fail, f"Invalid encoding in {what}.")
            request.setResponseCode(400)
            return b"Non-UTF-8 encoding in URL."
        app = self._app
        key = (scheme, serverName, scriptName, pathInfo, request.method)
        routed = self._routes.get(key)
        if routed is None:
            mapper = app.url_map.bind(
                serverName,
                scriptName,
                path_info=pathInfo,
                default_method=request.method.decode("utf-8"),
                url_scheme=scheme,
            )
            try:
                routed = (mapper, mapper.match(return_rule=True))
            except Exception:
                routed = (mapper, None)
            else:
                if len(self._routes) >= ROUTE_CACHE:
                    self._routes.clear()
                self._routes[key] = routed
        mapper, match = routed
        IKleinRequest(request).mapper = mapper
        finished = [False]
        d = maybeDeferred(_execute, app, mapper, match, request, finished)
        d.addCallback(_process, request)
        d.addErrback(_failed, app._error_handlers, request, finished, app)
        d.addCallback(_write, request, finished)
        d.addErrback(log.err, _why="Unhandled Error writing response")
        return server.NOT_DONE_YET
