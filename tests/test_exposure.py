"""
The real daemon on the open internet (issue 11, "Exposure"), over sockets on
loopback: memory bounded for all connections together, amplified batches
refused before they are parsed, one gzip member, no open redirect, tokens
restricted, a global rate limit that rotating tokens cannot get past, and a
connection limit.

Memory is read from the daemon's C{/proc/PID/status}.  The bounds are the
issue's acceptance bounds, and each memory test has a control: the same load
on a daemon configured to let it through shows the measurement sees the
growth it guards against.
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
from typing import Dict, Iterator, List, Optional, Tuple
from urllib.parse import quote

import pytest

from tests.daemon import Daemon
from tests.test_hostile_requests import Answer, exchange, readAnswer, request

MiB = 1024 * 1024
TIMEOUT = 30.0


def memory(daemon: Daemon) -> Dict[str, int]:
    """
    The daemon's resident memory now (VmRSS) and at its peak (VmHWM), bytes.
    """
    assert daemon.process is not None
    figures = {}
    with open(f"/proc/{daemon.process.pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                figures[name] = int(value.split()[0]) * 1024
    return figures


def resetPeak(daemon: Daemon) -> int:
    """
    Make the daemon's peak (VmHWM) its resident size now, so that the next
    peak is this test's; return that size.  Where the kernel will not, the
    old peak stays, which can only make a growth look larger.
    """
    assert daemon.process is not None
    with contextlib.suppress(OSError), open(f"/proc/{daemon.process.pid}/clear_refs", "w") as f:
        f.write("5")
    return memory(daemon)["VmRSS"]


def event(token: str = "tok", **props: object) -> Dict[str, object]:
    return {"event": "exposure", "properties": {"token": token, **props}}


def goodPost(daemon: Daemon, marker: str) -> Answer:
    """
    One small form POST on a new connection, as an SDK sends a batch.
    """
    data = quote(base64.b64encode(json.dumps([event(marker=marker)]).encode()))
    [answer], _ = exchange(
        daemon.port,
        request(
            "POST",
            "/track",
            b"data=" + data.encode(),
            {"Content-Type": "application/x-www-form-urlencoded"},
        ),
    )
    return answer


def started(tmp_path: Path, *args: str) -> Iterator[Daemon]:
    d = Daemon(tmp_path, "--fsync=never", *args).start()
    try:
        # Warm up: the first requests import and allocate what every later
        # one reuses.
        for n in range(20):
            assert goodPost(d, f"warm-{n}")[0] == 200
        yield d
    finally:
        d.stop()


# -- memory: all bodies together ------------------------------------------------

HELD = 60
HELD_BODY = 9 * MiB


class HeldBody(threading.Thread):
    """
    A client sending all but the last byte of a 9 MiB body, then holding
    its connection open: what the daemon buffers for it is what it costs.
    """

    def __init__(self, port: int, release: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.release = release
        self.sent = threading.Event()
        self.answer: Optional[bytes] = None

    def run(self) -> None:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT) as s,
        ):
            try:
                s.sendall(
                    b"POST /track?verbose=1 HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/x-www-form-urlencoded\r\n"
                    b"Content-Length: %d\r\n\r\ndata=" % HELD_BODY
                )
                piece = b"A" * MiB
                left = HELD_BODY - len(b"data=") - 1
                while left:
                    s.sendall(piece[:left])
                    left -= min(left, len(piece))
            except OSError:
                pass  # refused: the daemon stopped reading, then closed
            finally:
                self.sent.set()
            s.settimeout(0.2)
            with contextlib.suppress(OSError):
                self.answer = s.recv(200)
            self.release.wait(TIMEOUT * 2)


def settle(daemon: Daemon, limit: float = 10.0) -> None:
    """
    Wait (up to C{limit} seconds) until the daemon's memory stops growing:
    the bodies sent are still in socket buffers until it reads them.
    """
    deadline = time.monotonic() + limit
    last = memory(daemon)["VmRSS"]
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = memory(daemon)["VmRSS"]
        if abs(now - last) < MiB:
            return
        last = now


def holdBodies(daemon: Daemon) -> Tuple[int, Answer, Dict[str, object]]:
    """
    Start L{HELD} held bodies; once all are sent, send a good request on
    another connection.

    @return: the peak growth of the daemon's memory, the good request's
        answer and the daemon's C{/stats} C{http} part, all while the
        bodies are held.
    """
    before = resetPeak(daemon)
    release = threading.Event()
    clients = [HeldBody(daemon.port, release) for _ in range(HELD)]
    try:
        for client in clients:
            client.start()
        for client in clients:
            assert client.sent.wait(TIMEOUT * 2), "a client could not send its body"
        settle(daemon)
        answer = goodPost(daemon, "beside-held-bodies")
        http = daemon.stats()["http"]
        grown = memory(daemon)["VmHWM"] - before
    finally:
        release.set()
        for client in clients:
            client.join(TIMEOUT)
    return grown, answer, http


@pytest.fixture
def budgeted(tmp_path: Path) -> Iterator[Daemon]:
    yield from started(tmp_path, "--body-timeout=120")


@pytest.fixture
def unbudgeted(tmp_path: Path) -> Iterator[Daemon]:
    yield from started(tmp_path, "--body-timeout=120", f"--max-buffered-bytes={4096 * MiB}")


def test_heldBodiesBoundedInTotal(budgeted: Daemon) -> None:
    """
    Sixty connections each holding an unfinished 9 MiB body grow the daemon
    by less than 256 MiB in all: past the default 128 MiB budget, bodies
    are answered 503 before they are read.  A good request on another
    connection is answered meanwhile.
    """
    grown, answer, http = holdBodies(budgeted)
    print(f"held bodies, default budget: peak growth {grown / MiB:.0f} MiB")
    assert grown < 256 * MiB
    assert answer[:3:2] == (200, b"1")
    bodies = http["bodies"]
    assert isinstance(bodies, dict)
    assert bodies["refused"] >= HELD - 128 // 9
    assert bodies["peak"] <= bodies["limit"] == 128 * MiB


def test_heldBodiesControl(unbudgeted: Daemon) -> None:
    """
    The control: with a budget large enough for all of them, the same
    sixty bodies are buffered, and the measurement sees it.
    """
    grown, answer, http = holdBodies(unbudgeted)
    print(f"held bodies, 4 GiB budget (control): peak growth {grown / MiB:.0f} MiB")
    assert grown > 256 * MiB
    assert answer[:3:2] == (200, b"1")
    bodies = http["bodies"]
    assert isinstance(bodies, dict)
    assert bodies["refused"] == 0


# -- memory: an amplified batch ---------------------------------------------------

RECORDS = 3_400_000
AMPLIFIED = gzip.compress(b"[" + b"{}," * RECORDS + b"{}]", 1)
"""
45 KB of gzip inflating to 10 MB (under --max-body and 230 times its size,
under the 1000-times guard) of 3.4 million empty records.
"""


def sendAmplified(daemon: Daemon) -> Tuple[int, Answer]:
    """
    @return: the peak growth of the daemon's memory while it answered the
        amplified batch, and the answer.
    """
    before = resetPeak(daemon)
    [answer], _ = exchange(
        daemon.port,
        request("POST", "/track?verbose=1", AMPLIFIED, {"Content-Encoding": "gzip"}),
    )
    return memory(daemon)["VmHWM"] - before, answer


@pytest.fixture
def defaults(tmp_path: Path) -> Iterator[Daemon]:
    yield from started(tmp_path)


@pytest.fixture
def hugeBatches(tmp_path: Path) -> Iterator[Daemon]:
    yield from started(tmp_path, "--max-batch=60000")


def test_amplifiedBatchRefusedUnparsed(defaults: Daemon) -> None:
    """
    The batch is refused (413) from a count of its commas and brackets,
    with less than 64 MiB of peak growth, never parsed; the daemon then
    serves a good request.
    """
    assert 40_000 < len(AMPLIFIED) < 50_000
    grown, (status, _, body) = sendAmplified(defaults)
    print(f"amplified batch, --max-batch 2000: peak growth {grown / MiB:.0f} MiB")
    assert (status, json.loads(body)) == (
        413,
        {
            "status": 0,
            "error": "data holds more than 262144 JSON values; send fewer records per request",
        },
    )
    assert grown < 64 * MiB
    assert goodPost(defaults, "after-amplified")[:3:2] == (200, b"1")


def test_amplifiedBatchControl(hugeBatches: Daemon) -> None:
    """
    The control: with a batch limit that lets the values through, the
    batch is parsed before the record count refuses it, and the
    measurement sees the growth.
    """
    grown, (status, _, body) = sendAmplified(hugeBatches)
    print(f"amplified batch, --max-batch 60000 (control): peak growth {grown / MiB:.0f} MiB")
    assert (status, json.loads(body)["error"]) == (
        413,
        f"{RECORDS + 1} records in one request; the limit is 60000",
    )
    assert grown > 64 * MiB


# -- one daemon for the rest ------------------------------------------------------

MAX_CONNECTIONS = 8


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("guarded")
    tokens = directory / "tokens.json"
    tokens.write_text(json.dumps(["tok"]))
    tokens.chmod(0o644)
    d = Daemon(
        directory,
        "--fsync=never",
        f"--tokens={tokens}",
        "--redirect-allow=allowed.example",
        f"--max-connections={MAX_CONNECTIONS}",
    ).start()
    try:
        yield d
    finally:
        d.terminate()


def test_tokensFileReadableWarned(guarded: Daemon) -> None:
    assert "--tokens file" in guarded.log() and "chmod 600" in guarded.log()


def test_gzipSecondMemberRefused(guarded: Daemon) -> None:
    """
    Events in a second gzip member are not answered 1 and dropped: the
    request is refused with the reason, and nothing of it is stored.
    """
    first = gzip.compress(json.dumps([event(marker="member-1")]).encode())
    second = gzip.compress(json.dumps([event(marker="member-2")]).encode())
    [(status, _, body)], _ = exchange(
        guarded.port,
        request("POST", "/track?verbose=1", first + second, {"Content-Encoding": "gzip"}),
    )
    assert (status, json.loads(body)) == (
        200,
        {"status": 0, "error": "gzip body has data after its end; send one gzip member"},
    )
    [(status, _, body)], _ = exchange(
        guarded.port,
        request("POST", "/track?verbose=1", first, {"Content-Encoding": "gzip"}),
    )
    assert (status, json.loads(body)["status"]) == (200, 1)
    markers = [i["properties"].get("marker") for i in guarded.items()]
    assert "member-1" in markers and "member-2" not in markers
    assert markers.count("member-1") == 1


@pytest.mark.parametrize(
    "query",
    ["redirect=https://anywhere.example/", "redirect=https://anywhere.example/&data=e30"],
    ids=["without-data", "with-data"],
)
def test_redirectRefused(guarded: Daemon, query: str) -> None:
    [(status, headers, body)], _ = exchange(guarded.port, request("GET", f"/track?{query}"))
    assert (status, body) == (400, b"0")
    assert "location" not in headers


def test_redirectAllowed(guarded: Daemon) -> None:
    data = quote(base64.b64encode(json.dumps(event(marker="redirected")).encode()))
    [(status, headers, _)], _ = exchange(
        guarded.port,
        request("GET", f"/track?redirect=https://allowed.example/thanks&data={data}"),
    )
    assert (status, headers["location"]) == (302, "https://allowed.example/thanks")


def test_unknownTokenRefusedAlone(guarded: Daemon) -> None:
    """
    A record for a token not in --tokens fails alone, with its reason; it
    is counted in /stats and /metrics and never stored; the others are.
    """
    batch = [event(marker="known-1"), event("stranger", marker="unknown"), event(marker="known-2")]
    [(status, _, body)], _ = exchange(
        guarded.port,
        request("POST", "/track?verbose=1", json.dumps(batch).encode()),
    )
    answer = json.loads(body)
    assert (status, answer["status"]) == (200, 1)
    assert answer["failed_records"] == [
        {
            "index": 1,
            "field": "properties.token",
            "message": "not a project token this server accepts",
        }
    ]
    markers = [i["properties"].get("marker") for i in guarded.items()]
    assert "known-1" in markers and "known-2" in markers and "unknown" not in markers
    assert guarded.stats()["rejected"]["unknown_token"] == 1
    _, _, metrics = guarded.admin("/metrics")
    assert b'mixingest_events_rejected_total{reason="unknown_token"} 1.0' in metrics


def test_maxConnections(guarded: Daemon) -> None:
    """
    Past --max-connections a new connection is answered 503 before it sends
    a byte, and counted; once one of the others closes, a new one is served.
    """
    held: List[socket.socket] = []
    deadline = time.monotonic() + TIMEOUT
    while guarded.stats()["http"]["connections"]["open"]:
        assert time.monotonic() < deadline, "earlier connections are still open"
        time.sleep(0.05)
    try:
        for _ in range(MAX_CONNECTIONS):
            held.append(socket.create_connection(("127.0.0.1", guarded.port), timeout=TIMEOUT))
        while guarded.stats()["http"]["connections"]["open"] < MAX_CONNECTIONS:
            assert time.monotonic() < deadline, "the daemon did not see the connections"
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=TIMEOUT) as extra:
            (status, headers, body), _ = readAnswer(extra)
        assert (status, headers["retry-after"], body) == (503, "1", b"too many connections\n")
        connections = guarded.stats()["http"]["connections"]
        assert (connections["limit"], connections["refused"]) == (MAX_CONNECTIONS, 1)
        _, _, metrics = guarded.admin("/metrics")
        assert b"mixingest_connections_refused_total 1.0" in metrics
        held.pop().close()
        while guarded.stats()["http"]["connections"]["open"] >= MAX_CONNECTIONS:
            assert time.monotonic() < deadline, "the daemon did not see the close"
            time.sleep(0.05)
        assert goodPost(guarded, "after-max-connections")[:3:2] == (200, b"1")
    finally:
        for s in held:
            s.close()


# -- rotating tokens ----------------------------------------------------------------


def rotate(daemon: Daemon, requests: int = 10, events: int = 100) -> List[Tuple[int, str]]:
    """
    Send batches of C{events} events, each under a token never used before.

    @return: each answer's status and error.
    """
    out = []
    for n in range(requests):
        batch = [event(f"fresh-{n}", i=i) for i in range(events)]
        [(status, _, body)], _ = exchange(
            daemon.port, request("POST", "/track?verbose=1", json.dumps(batch).encode())
        )
        out.append((status, json.loads(body)["error"]))
    return out


@pytest.fixture
def globallyLimited(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, "--fsync=never", "--rate-limit=5", "--global-rate-limit=5").start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def perTokenOnly(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, "--fsync=never", "--rate-limit=5").start()
    try:
        yield d
    finally:
        d.stop()


def test_rotatingTokensGlobalLimit(globallyLimited: Daemon) -> None:
    """
    A fresh token per request gets past a per-token limit of 5 events/s;
    the global limit of 5/s admits the first batch of 100 and refuses the
    next ones (429, for 19 seconds) whatever their token.
    """
    answers = rotate(globallyLimited)
    assert answers[0] == (200, None)
    assert set(answers[1:]) == {(429, "over 5 events/s for this server; retry")}
    stats = globallyLimited.stats()
    assert stats["rejected"] == {"global_rate_limit": 900}
    assert stats["rate_limit"]["global_rate"] == 5


def test_rotatingTokensControl(perTokenOnly: Daemon) -> None:
    """
    The control: with the per-token limit alone, every rotated batch is
    admitted.
    """
    assert set(rotate(perTokenOnly)) == {(200, None)}
