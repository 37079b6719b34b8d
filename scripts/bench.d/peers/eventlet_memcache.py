"""
Peer: the seed's 2011 design.  eventlet's raw WSGI server and simplejson,
each event put on a Kestrel queue by a memcache-protocol
C{set QUEUE 0 0 N}: all of a request's sets written at once (pipelined) on a
pooled green connection, the request answered after every C{STORED} came
back.  Here the server is memcached, which speaks the same C{set}.

    python eventlet_memcache.py --port PORT --memcache 127.0.0.1:11211 --queue events

The same minimal job as the other peers (see fastapi_redis.py); a plain WSGI
callable, the query and form body parsed with the standard library.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Iterable, List
from urllib.parse import parse_qs

import eventlet
import eventlet.pools
import eventlet.wsgi
import minimal
import simplejson


class MemcacheConnection:
    """
    One green connection: C{put} pipelines sets and reads their answers.
    """

    def __init__(self, host: str, port: int) -> None:
        self.sock = eventlet.connect((host, port))
        self.reader = self.sock.makefile("rb")

    def put(self, queue: bytes, items: List[bytes]) -> None:
        self.sock.sendall(
            b"".join(b"set %s 0 0 %d\r\n%s\r\n" % (queue, len(item), item) for item in items)
        )
        for _ in items:
            line = self.reader.readline()
            if line != b"STORED\r\n":
                raise OSError(f"set answered {line!r}")


def decode(data: str, ip: str) -> List[bytes]:
    """The minimal job, with simplejson as in 2011."""
    events = minimal.decode(data, ip, simplejson.loads, simplejson.dumps)
    return [event.encode() for event in events]


def application(pool: eventlet.pools.Pool, queue: bytes) -> Callable[..., Iterable[bytes]]:
    def track(environ: dict, startResponse: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"].rstrip("/") != "/track":
            startResponse("404 Not Found", [("Content-Length", "0")])
            return [b""]
        query = parse_qs(environ.get("QUERY_STRING", ""))
        data = query.get("data", [""])[0]
        if environ["REQUEST_METHOD"] == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            form = parse_qs(environ["wsgi.input"].read(length).decode("latin-1"))
            data = form.get("data", [data])[0]
        verbose = query.get("verbose", [""])[0] == "1"
        try:
            events = decode(data, environ.get("REMOTE_ADDR", ""))
            ok, error = True, None
        except ValueError as e:
            ok, error = False, str(e)
        if ok:
            with pool.item() as connection:
                connection.put(queue, events)
        if verbose:
            body = simplejson.dumps({"status": int(ok), "error": error}, separators=(",", ":"))
            body = body.encode()
            kind = "application/json"
        else:
            body, kind = (b"1" if ok else b"0"), "text/plain"
        startResponse("200 OK", [("Content-Type", kind), ("Content-Length", str(len(body)))])
        return [body]

    return track


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--memcache", required=True, help="HOST:PORT")
    parser.add_argument("--queue", default="events")
    args = parser.parse_args()
    host, _, port = args.memcache.rpartition(":")

    class Connections(eventlet.pools.Pool):
        def create(self) -> MemcacheConnection:
            return MemcacheConnection(host, int(port))

    pool = Connections(max_size=64)
    eventlet.wsgi.server(
        eventlet.listen(("127.0.0.1", args.port)),
        application(pool, args.queue.encode()),
        log_output=False,
    )


if __name__ == "__main__":
    main()
