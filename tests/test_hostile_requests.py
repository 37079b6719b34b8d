"""
Hand-picked hostile requests over real sockets against the real daemon
(C{twistd mixingest} in a subprocess on a loopback port).  Each one asserts the
status and the reason, and that the daemon still serves; a good event goes in
after each bad request, and every one of them must be on the queue at the end.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import quote, quote_from_bytes

import pytest

from tests.daemon import Daemon, freePort

MAX_BODY = 1024 * 1024
MAX_BATCH = 50
SECRET = "s3cret-import-key"
TIMEOUT = 10.0

Answer = Tuple[int, Dict[str, str], bytes]


def readAnswer(sock: socket.socket, buffered: bytes = b"") -> Tuple[Answer, bytes]:
    """
    Read one HTTP answer (every answer here has a Content-Length); return it
    and whatever was read past it.
    """
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of an answer")
        rest += chunk
    return (status, headers, rest[:length]), rest[length:]


def exchange(
    port: int, raw: bytes, answers: int = 1, checkClosed: bool = False
) -> Tuple[List[Answer], bool]:
    """
    Send raw bytes on a new connection; read C{answers} answers; if
    C{checkClosed}, tell whether the daemon closed the connection afterwards
    (waiting half a second for it).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(raw)
        out = []
        rest = b""
        for _ in range(answers):
            answer, rest = readAnswer(sock, rest)
            out.append(answer)
        if not checkClosed:
            return out, False
        sock.settimeout(0.5)
        try:
            closed = rest == b"" and sock.recv(1) == b""
        except socket.timeout:
            closed = False
        except ConnectionResetError:
            closed = True
        return out, closed


def request(
    method: str,
    path: str,
    body: Optional[bytes] = None,
    headers: Optional[Dict[str, str]] = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None and "Transfer-Encoding" not in (headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def form(data: bytes, path: str = "/track?verbose=1", **headers: str) -> bytes:
    return request(
        "POST",
        path,
        b"data=" + quote_from_bytes(data).encode("ascii"),
        {"Content-Type": "application/x-www-form-urlencoded", **headers},
    )


def ev(**props: Any) -> Dict[str, Any]:
    return {"event": "hostile", "properties": {"token": "tok", **props}}


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


DEEP = b"[" * 100_000 + b"]" * 100_000
GZIP_BOMB = gzip.compress(b" " * (40 * MAX_BODY), 9)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory: Path = tmp_path_factory.mktemp("hostile")
    secrets = directory / "secrets.json"
    secrets.write_text(json.dumps({"tok": SECRET}))
    d = Daemon(
        directory,
        f"--max-body={MAX_BODY}",
        f"--max-batch={MAX_BATCH}",
        f"--import-secrets={secrets}",
        f"--admin-listen=tcp:{freePort()}:interface=127.0.0.1",
        "--access-log",
        "--fsync=never",
    ).start()
    try:
        yield d
    finally:
        d.stop()


GOOD: List[int] = []
"""
The numbers of the good events sent so far; all must be stored.
"""


def sendGood(daemon: Daemon) -> None:
    n = len(GOOD)
    payload = base64.b64encode(js([ev(good=n)])).decode()
    [(status, _, body)], _ = exchange(
        daemon.port, request("GET", f"/track?verbose=1&data={quote(payload)}")
    )
    assert (status, json.loads(body)) == (200, {"status": 1, "error": None})
    GOOD.append(n)


def verbose(body: bytes) -> Any:
    return json.loads(body)


HOSTILE: List[Tuple[str, bytes, int, str]] = [
    # payloads: answered 200 with 0 and the reason, as Mixpanel does
    ("invalid-base64", form(b"%%%not base64%%%"), 200, "neither JSON nor valid base64"),
    ("truncated-json", form(b'{"event":"a","prop'), 200, "not valid JSON"),
    ("json-number", form(base64.b64encode(b"12345")), 200, "must be a JSON object or array"),
    (
        "json-string-raw-body",
        request("POST", "/track?verbose=1", b'"str"'),
        200,
        "data, missing or empty",
    ),
    (
        "event-is-object",
        form(js({"event": {"a": 1}, "properties": {"token": "tok"}})),
        200,
        "event: missing or empty",
    ),
    (
        "properties-is-list",
        form(js({"event": "e", "properties": ["token"]})),
        200,
        "properties: missing or not an object",
    ),
    ("time-is-string", form(js(ev(time="yesterday"))), 200, "properties.time: must be a number"),
    (
        "token-is-number",
        form(js({"event": "e", "properties": {"token": 7}})),
        200,
        "properties.token: missing or empty",
    ),
    (
        "nan-literal",
        form(b'{"event":"e","properties":{"token":"tok","x":NaN}}'),
        200,
        "properties.x: NaN and Infinity are not valid JSON numbers",
    ),
    (
        "infinity-literal",
        form(b'{"event":"e","properties":{"token":"tok","x":-Infinity}}'),
        200,
        "properties.x: NaN and Infinity",
    ),
    (
        "1e400",
        form(b'{"event":"e","properties":{"token":"tok","x":1e400}}'),
        200,
        "properties.x: NaN and Infinity",
    ),
    ("int-over-int64", form(js(ev(x=2**64))), 200, "properties.x: integer out of the 64-bit range"),
    (
        "int-100k-digits",
        form(b'{"event":"e","properties":{"x":' + b"9" * 100_000 + b"}}"),
        200,
        "not valid JSON",
    ),
    (
        "invalid-utf8",
        request("POST", "/track?verbose=1", b'{"event":"\xff\xfe\xfd"}'),
        200,
        "not valid JSON",
    ),
    (
        "lone-surrogate",
        form(b'{"event":"e","properties":{"token":"tok","x":["\\ud800"]}}'),
        200,
        "properties.x: contains text that is not valid Unicode",
    ),
    (
        "surrogate-in-name",
        form(b'{"event":"e","properties":{"token":"tok","\\udc00":NaN}}'),
        200,
        "NaN and Infinity",
    ),
    ("nul-bytes", form(b"\x00" * 64), 200, "neither JSON nor valid base64"),
    (
        "nul-in-json",
        request("POST", "/track?verbose=1", b'{"event":"a\x00b"}'),
        200,
        "not valid JSON",
    ),
    ("deep-100k-array", request("POST", "/track?verbose=1", DEEP), 200, "not valid JSON"),
    (
        "deep-100k-object",
        request("POST", "/track?verbose=1", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        200,
        "not valid JSON",
    ),
    ("deep-5-property", form(js(ev(x=[[[[["x"]]]]]))), 200, "nested deeper than 3 levels"),
    (
        "3000-properties",
        form(js(ev(**{f"p{i}": i for i in range(3000)}))),
        200,
        "properties: more than 255 keys",
    ),
    ("empty-batch", form(b"[]"), 200, "data has no records"),
    (
        "batch-over-max",
        form(js([ev(i=i) for i in range(MAX_BATCH + 1)])),
        413,
        f"{MAX_BATCH + 1} records in one request; the limit is {MAX_BATCH}",
    ),
    (
        "data-twice",
        request("POST", "/track?verbose=1&data=e30", b"data=e30"),
        200,
        "data given more than once",
    ),
    (
        "data-query-and-json-body",
        request("POST", "/track?verbose=1&data=e30", b"{}"),
        200,
        "data given both in the query and as a JSON body",
    ),
    ("no-data", request("GET", "/track?verbose=1"), 200, "data, missing or empty"),
    (
        "too-many-params",
        request("GET", "/track?verbose=1&" + "&".join(f"p{i}=" for i in range(200))),
        200,
        "more than 100 parameters",
    ),
    # bodies
    (
        "gzip-bomb",
        request("POST", "/track?verbose=1", GZIP_BOMB, {"Content-Encoding": "gzip"}),
        413,
        f"body exceeds {MAX_BODY} bytes once decompressed",
    ),
    ("gzip-magic-bomb", request("POST", "/track?verbose=1", GZIP_BOMB), 413, "once decompressed"),
    (
        "not-gzip",
        request("POST", "/track?verbose=1", b"data=e30", {"Content-Encoding": "gzip"}),
        200,
        "body is marked Content-Encoding: gzip but is not valid gzip",
    ),
    (
        "truncated-gzip",
        request(
            "POST",
            "/track?verbose=1",
            gzip.compress(b"data=e30" * 100)[:30],
            {"Content-Encoding": "gzip"},
        ),
        200,
        "gzip body is truncated",
    ),
    (
        "brotli",
        request("POST", "/track?verbose=1", b"data=e30", {"Content-Encoding": "br"}),
        200,
        "unsupported Content-Encoding 'br'",
    ),
    # answer parameters: refused, never reflected
    (
        "callback-script",
        form(js(ev()), "/track?verbose=1&callback=alert(document.cookie)//"),
        400,
        "callback must be a JavaScript identifier path",
    ),
    (
        "callback-tag",
        form(js(ev()), "/track?verbose=1&callback=%3C/script%3E%3Cscript%3Ealert(1)"),
        400,
        "callback must be a JavaScript identifier path",
    ),
    (
        "redirect-javascript",
        form(js(ev()), "/track?verbose=1&redirect=javascript:alert(1)"),
        400,
        "redirect must be an absolute http:// or https:// URL",
    ),
    (
        "redirect-data",
        form(js(ev()), "/track?verbose=1&redirect=data:text/html,%3Cscript%3E"),
        400,
        "redirect must be",
    ),
    (
        "redirect-crlf",
        form(js(ev()), "/track?verbose=1&redirect=http://a.example/%0d%0aSet-Cookie:%20x=1"),
        400,
        "redirect must be",
    ),
    (
        "redirect-nul",
        form(js(ev()), "/track?verbose=1&redirect=http://a.example/%00"),
        400,
        "redirect must be",
    ),
    # /import credentials
    (
        "import-no-credentials",
        request("POST", "/import", js([ev(time=1700000000)]), {"Content-Type": "application/json"}),
        401,
        "missing credentials",
    ),
    (
        "import-wrong-secret",
        request(
            "POST",
            "/import?api_key=wrong-guess",
            js([ev(time=1700000000)]),
            {"Content-Type": "application/json"},
        ),
        401,
        "Invalid credentials",
    ),
    (
        "import-bad-basic",
        request(
            "POST",
            "/import",
            js([ev(time=1700000000)]),
            {"Content-Type": "application/json", "Authorization": "Basic %%%"},
        ),
        401,
        "malformed HTTP Basic credentials",
    ),
]


@pytest.mark.parametrize(
    "raw, status, reason", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_hostile(daemon: Daemon, raw: bytes, status: int, reason: str) -> None:
    [(code, headers, body)], _ = exchange(daemon.port, raw)
    assert code == status, body[:300]
    if headers.get("content-type", "").startswith("application/json"):
        answer = verbose(body)
        error = answer["error"]
        assert answer.get("status") in (
            0,
            "Unauthorized",
            "Bad Request",
            "Request Entity Too Large",
        )
    else:
        error = body.decode("utf-8")
    assert reason in error, error[:300]
    assert b"alert" not in body and b"script" not in body
    assert b"Traceback" not in body
    sendGood(daemon)


def test_goodBesideBad(daemon: Daemon) -> None:
    """
    A batch with bad records stores the good ones and says which failed.
    """
    n = len(GOOD)
    batch = [ev(good=n), ev(x=float("nan")), "junk", ev(good=n + 1), ev(time="soon")]
    raw = form(js(batch).replace(b"NaN", b"NaN"))
    [(code, _, body)], _ = exchange(daemon.port, raw)
    answer = verbose(body)
    assert code == 200
    assert answer["status"] == 1
    assert answer["error"].startswith("3 of 5 records failed: #1 properties.x: NaN")
    assert [f["index"] for f in answer["failed_records"]] == [1, 2, 4]
    GOOD.extend([n, n + 1])


def test_truncatedNotRefused(daemon: Daemon) -> None:
    """
    Huge strings and long names are truncated, as Mixpanel does, and stored.
    """
    n = len(GOOD)
    record = {
        "event": "e" * 5000,
        "properties": {"token": "tok", "good": n, "s": "x" * 500_000, "k" * 1000: 1},
    }
    [(code, _, body)], _ = exchange(daemon.port, form(js(record)))
    assert (code, verbose(body)) == (200, {"status": 1, "error": None})
    GOOD.append(n)


def test_nonASCIIForm(daemon: Daemon) -> None:
    """
    The Python SDK's form post of non-ASCII text (percent-escaped UTF-8).
    """
    n = len(GOOD)
    [(code, _, body)], _ = exchange(
        daemon.port, form(json.dumps(ev(good=n, city="Zürich ☕"), ensure_ascii=False).encode())
    )
    assert (code, verbose(body)) == (200, {"status": 1, "error": None})
    GOOD.append(n)


# -- bodies over the limit, before they are read --------------------------------


def test_declaredTooLargeAnsweredAtOnce(daemon: Daemon) -> None:
    """
    Only the headers are sent: the 413 comes back anyway, and the connection
    is closed.
    """
    raw = (
        b"POST /track?verbose=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
    )
    started = time.monotonic()
    [(code, headers, body)], closed = exchange(daemon.port, raw, checkClosed=True)
    assert time.monotonic() - started < 2
    assert (code, verbose(body)["error"]) == (413, f"body exceeds {MAX_BODY} bytes")
    assert headers["connection"] == "close"
    assert closed
    sendGood(daemon)


def test_tooLargeBodyStillSent(daemon: Daemon) -> None:
    """
    A client that sends its whole oversized body before reading (urllib
    does) still reads the 413, not a reset.
    """
    raw = request("POST", "/track?verbose=1", b"data=" + b"A" * (3 * MAX_BODY))
    for _ in range(3):
        [(code, _, body)], _ = exchange(daemon.port, raw)
        assert (code, verbose(body)["error"]) == (413, f"body exceeds {MAX_BODY} bytes")
    sendGood(daemon)


def test_chunkedOverLimit(daemon: Daemon) -> None:
    chunk = b"A" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(20)) + b"0\r\n\r\n"
    raw = request("POST", "/track?verbose=1", b"data=", {"Transfer-Encoding": "chunked"})
    raw = raw[: -len(b"data=")] + body
    [(code, _, answer)], closed = exchange(daemon.port, raw, checkClosed=True)
    assert (code, verbose(answer)["error"]) == (413, f"body exceeds {MAX_BODY} bytes")
    assert closed
    sendGood(daemon)


# -- heads ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, status, reason",
    [
        (b"GET /track?data=" + b"A" * 20_000 + b" HTTP/1.1\r\n\r\n", 414, "request line longer"),
        (b"GET /track HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431, "more than 100 request"),
        (
            b"GET /track HTTP/1.1\r\nCookie: " + b"c" * 20_000 + b"\r\n\r\n",
            431,
            "request headers larger",
        ),
        (
            b"GET /track HTTP/1.1\r\n"
            + b"X-Pad: "
            + b"p" * 4000
            + b"\r\n" * 1
            + b"X-Pad: "
            + b"p" * 4000
            + b"\r\n"
            + b"X-Pad: "
            + b"p" * 4000
            + b"\r\n"
            + b"X-Pad: "
            + b"p" * 4000
            + b"\r\n"
            + b"X-Pad: "
            + b"p" * 4000
            + b"\r\n\r\n",
            431,
            "request headers larger",
        ),
        (b"BLAH\r\n\r\n", 400, "malformed"),
        (b"GET /track HTTP/1.1\r\nBad Header\r\n\r\n", 400, "malformed"),
        (b"POST /track HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n", 400, "malformed"),
        (b"POST /track HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nnothex\r\n", 400, "malformed"),
    ],
    ids=[
        "long-url",
        "header-flood",
        "long-header",
        "big-headers",
        "garbage",
        "no-colon",
        "bad-length",
        "bad-chunk",
    ],
)
def test_badHead(daemon: Daemon, raw: bytes, status: int, reason: str) -> None:
    [(code, _, body)], closed = exchange(daemon.port, raw, checkClosed=True)
    assert (code, closed) == (status, True)
    assert reason in body.decode()
    sendGood(daemon)


def test_pipelining(daemon: Daemon) -> None:
    """
    Good and bad requests pipelined on one connection are answered in order.
    """
    n = len(GOOD)
    good = [base64.b64encode(js(ev(good=n + i))).decode() for i in range(3)]
    raw = b"".join(
        [
            request("GET", f"/track?data={quote(good[0])}"),
            form(b"nonsense!"),
            request("GET", "/nothing/here"),
            request("GET", f"/track?data={quote(good[1])}"),
            request("PUT", "/track"),
            request("GET", f"/track?data={quote(good[2])}&verbose=1"),
        ]
    )
    answers, closed = exchange(daemon.port, raw, answers=6, checkClosed=True)
    assert [a[0] for a in answers] == [200, 200, 404, 200, 405, 200]
    assert [answers[0][2], answers[3][2]] == [b"1", b"1"]
    assert "neither JSON nor valid base64" in verbose(answers[1][2])["error"]
    assert not closed
    GOOD.extend(range(n, n + 3))


# -- no path reaches the filesystem or the operator endpoints -------------------


@pytest.mark.parametrize(
    "path",
    [
        "/../../../../etc/passwd",
        "/track/../../../../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/track/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "//etc/passwd",
        "/etc/passwd%00",
        "/twistd.log",
        "/data/events",
        "/healthz",
        "/readyz",
        "/metrics",
        "/stats",
    ],
)
def test_noSuchPath(daemon: Daemon, path: str) -> None:
    [(code, _, body)], _ = exchange(daemon.port, request("GET", path))
    assert code in (400, 404), body
    assert b"root:" not in body and b"mixingest" not in body.lower()


def test_forwardedForIgnoredFromUntrusted(daemon: Daemon) -> None:
    n = len(GOOD)
    payload = quote(base64.b64encode(js(ev(good=n, marker="xff"))).decode())
    [(code, _, _)], _ = exchange(
        daemon.port,
        request("GET", f"/track?ip=1&data={payload}", headers={"X-Forwarded-For": "6.6.6.6"}),
    )
    assert code == 200
    GOOD.append(n)
    [item] = [i for i in daemon.items() if i["properties"].get("marker") == "xff"]
    assert item["properties"]["ip"] == "127.0.0.1"


# -- slowloris ------------------------------------------------------------------


def test_slowlorisDoesNotStarveClients(daemon: Daemon) -> None:
    """
    Hundreds of connections trickling their headers, and more sending
    nothing, do not delay real clients; each is answered 408 and closed at
    the header deadline (10 s from the connection), however steadily it
    trickles.
    """
    slow: List[socket.socket] = []
    stop = threading.Event()
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT)
            s.sendall(b"POST /track HTTP/1.1\r\nHost: x\r\n")
            slow.append(s)
        silent = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(50)]

        def trickle() -> None:
            while not stop.is_set():
                for s in slow:
                    with contextlib.suppress(OSError):
                        s.send(b"X: y\r\n")
                stop.wait(0.5)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        started = time.monotonic()
        latencies = []
        while time.monotonic() - started < 4:
            t = time.monotonic()
            sendGood(daemon)
            latencies.append(time.monotonic() - t)
            time.sleep(0.1)
        assert max(latencies) < 1.0, latencies
        deadline = started + 20
        answers = []
        for s in slow:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            data = b""
            try:
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            answers.append(data.split(b"\r\n", 1)[0])
        assert set(answers) == {b"HTTP/1.1 408 Request Timeout"}, set(answers)
        for s in silent:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        stop.set()
        thread.join()
        for s in silent:
            s.close()
    finally:
        stop.set()
        for s in slow:
            s.close()
    sendGood(daemon)


# -- afterwards -----------------------------------------------------------------


def test_zzEveryGoodEventStored(daemon: Daemon) -> None:
    """
    Runs last: every good event sent beside the bad ones is on the queue, and
    no secret reached the log.
    """
    stored = sorted(
        i["properties"]["good"] for i in daemon.items("events") if "good" in i["properties"]
    )
    assert stored == sorted(GOOD)
    assert GOOD
    log = daemon.log()
    assert SECRET not in log and "wrong-guess" not in log
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
