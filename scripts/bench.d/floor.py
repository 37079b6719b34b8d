"""
The benchmark's floor: a bare Klein route that does mixingest's decoding
(the same L{mixingest.decoding.decodeRequest}), adds the client address and
encodes each record again with the same codec, then stores nothing.

    python scripts/bench.d/floor.py PORT

Same Klein, same twisted.web Site (without the access log and without
Twisted's own parse of form bodies, as in mixingest), same answers
(C{1}, or the verbose or C{/import} JSON) with an explicit Content-Length.
What mixingest costs beyond this is cleaning, the funnel and the queue.
"""

from __future__ import annotations

import sys

from klein import Klein
from twisted.internet import endpoints, reactor
from twisted.web.server import Site

from mixingest import codec
from mixingest.decoding import decodeRequest

MAX_BODY = 10 * 1024 * 1024
ROUTE = "/<any(track, engage, groups, import):kind>"
METHODS = ["GET", "POST", "OPTIONS"]

app = Klein()


def encodeWithAddress(records, ip):
    """
    The floor's work per record: the client address added, encoded again.
    """
    kept = []
    for record in records:
        if ip is not None and type(record) is dict:
            props = record.get("properties")
            if type(props) is dict:
                props["ip"] = ip
            else:
                record["$ip"] = ip
        kept.append(codec.dumps(record))
    return kept


@app.route(ROUTE, methods=METHODS)
@app.route(ROUTE + "/", methods=METHODS, endpoint="slash")
def ingest(request, kind):
    uri = request.uri
    mark = uri.find(b"?")
    query = uri[mark + 1 :] if mark >= 0 else b""
    body = request.content.read()
    decoded = decodeRequest(query, body, request.getHeader(b"content-encoding"), MAX_BODY)
    ip = None
    if decoded.params.get("ip", "1" if kind == "engage" else "0") == "1":
        ip = request.getClientAddress().host
    kept = encodeWithAddress(decoded.items, ip)
    if decoded.raw and kind == "import":
        answer = b'{"code":200,"num_records_imported":%d,"status":"OK"}' % len(kept)
        contentType = b"application/json"
    elif decoded.params.get("verbose") == "1":
        answer, contentType = b'{"status":1,"error":null}', b"application/json"
    else:
        answer, contentType = b"1", b"text/plain; charset=utf-8"
    request.setHeader(b"content-type", contentType)
    request.setHeader(b"content-length", b"%d" % len(answer))
    return answer


class QuietSite(Site):
    """
    No access log, and no parse of form bodies into C{request.args}: the
    decoder parses them, and mixingest's site turns Twisted's parse off
    too (on PyPy it costs more than everything else a batch needs).
    """

    def __init__(self, resource):
        super().__init__(resource)
        self._parsePOSTFormSubmission = False

    def log(self, request):
        pass


def main(port: int) -> None:
    endpoint = endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
    endpoint.listen(QuietSite(app.resource()))
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
