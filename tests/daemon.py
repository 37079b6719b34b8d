"""
Run the real C{twistd mixingest} in a subprocess on a free loopback port, for
tests that need the whole daemon over real sockets.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "Daemon",
    "Flood",
    "encoded",
    "freePort",
    "journaledNumbers",
    "tally",
    "twistdCommand",
]

START_TIMEOUT = 30.0
START_ATTEMPTS = 3
ROOT = Path(__file__).resolve().parent.parent
"""
The checkout: daemons run the same code as the tests that start them.
"""


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def twistdCommand() -> List[str]:
    """
    twistd from the interpreter running the tests, whatever the venv.
    """
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def waitForPort(
    port: int, process: Optional[subprocess.Popen] = None, timeout: float = START_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"daemon exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


class Daemon:
    """
    One daemon process.  C{args} are extra C{twistd mixingest} options.
    """

    def __init__(
        self,
        directory: Path,
        *args: str,
        port: Optional[int] = None,
        dataDir: Optional[Path] = None,
    ) -> None:
        """
        @param dataDir: the journal directory, C{directory / "data"} by
            default (crash tests put it on a file system of their own).
        """
        self.directory = directory
        self.dataDir = directory / "data" if dataDir is None else dataDir
        self.logFile = directory / "twistd.log"
        self._choosePort = port is None
        self.port = port or freePort()
        self.adminPort = freePort()
        self.args: Tuple[str, ...] = args
        self.process: Optional[subprocess.Popen] = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> List[str]:
        return [
            *twistdCommand(),
            "--nodaemon",
            "--pidfile=",
            f"--logfile={self.logFile}",
            "mixingest",
            f"--listen=tcp:{self.port}:interface=127.0.0.1",
            f"--data-dir={self.dataDir}",
            f"--admin-listen=tcp:{self.adminPort}:interface=127.0.0.1",
            "--shutdown-grace=0",  # no load balancer to wait for; args may set one
            *self.args,
        ]

    def start(self) -> Daemon:
        """
        Start the daemon and wait until it listens.  A port that L{freePort}
        found free can be taken (by any client socket's ephemeral port)
        before the daemon binds it: then new ports are chosen and the start
        tried again, a few times.
        """
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        attempt = 1
        while True:
            with open(self.directory / "output.log", "ab") as output:
                self.process = subprocess.Popen(
                    self.command(), cwd=self.directory, env=env, stdout=output, stderr=output
                )
            try:
                waitForPort(self.port, self.process)
                self._waitUntilServing()
                return self
            except RuntimeError as e:
                log = self.log()
                if attempt == START_ATTEMPTS or "Address already in use" not in log:
                    raise RuntimeError(f"{e}\n{log}") from None
            attempt += 1
            self.process.wait()
            if self._choosePort:
                self.port = freePort()
            self.adminPort = freePort()
            for name in (self.logFile, self.directory / "output.log"):
                name.unlink(missing_ok=True)

    def _waitUntilServing(self) -> None:
        """
        Wait until the admin listener answers HTTP: the reactor then runs, so
        twistd has installed its signal handlers.  Listening alone is not
        enough: services start (and bind) before the reactor runs, and a
        SIGTERM in between kills the daemon without its graceful stop.  Not
        for a daemon whose admin listener the test moved, nor for the parent
        of C{--workers}, which has none.
        """
        if any(arg.startswith(("--admin-listen", "--workers")) for arg in self.args):
            return
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode} while starting")
            try:
                self.admin("/healthz", timeout=1.0)
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the admin listener did not answer within {START_TIMEOUT}s")

    def log(self) -> str:
        """
        The daemon's log and anything it printed.
        """
        text = ""
        for name in (self.logFile, self.directory / "output.log"):
            with contextlib.suppress(FileNotFoundError):
                text += name.read_text(errors="replace")
        return text

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """
        Signal the daemon and wait for it to exit; return its exit status.
        """
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def terminate(self, timeout: float = 30.0) -> None:
        """
        Stop gracefully with SIGTERM and check it was graceful: twistd shuts
        down, then re-raises the signal so its exit status reports it.
        """
        status = self.stop(signal.SIGTERM, timeout)
        log = self.log()
        assert status == -signal.SIGTERM and "Server Shut Down." in log, (status, log[-3000:])
        assert "Traceback" not in log, log[-3000:]

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    def request(
        self,
        path: str,
        data: Optional[bytes] = None,
        headers: Optional[Dict[str, str]] = None,
        method: Optional[str] = None,
        timeout: float = 10.0,
    ) -> Tuple[int, Dict[str, str], bytes]:
        """
        One HTTP request; returns status, headers (lower-cased) and body,
        whatever the status.
        """
        return _request(self.base + path, data, headers, method, timeout)

    def admin(self, path: str, timeout: float = 10.0) -> Tuple[int, Dict[str, str], bytes]:
        """
        One C{GET} of the admin listener (C{/readyz}, C{/stats}, C{/metrics}).
        """
        return _request(f"http://127.0.0.1:{self.adminPort}{path}", None, None, None, timeout)

    def stats(self) -> Dict[str, Any]:
        """
        The daemon's C{/stats} document.
        """
        status, _, body = self.admin("/stats")
        assert status == 200, (status, body)
        document: Dict[str, Any] = json.loads(body)
        return document

    def items(self, queue: str = "events") -> List[Dict[str, Any]]:
        """
        Every item of a journal queue, oldest first, via the journal CLI.
        """
        out = subprocess.run(
            [sys.executable, "-m", "mixingest.journal", "cat", str(self.dataDir), queue],
            check=True,
            capture_output=True,
            cwd=ROOT,
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line]


def _request(
    url: str,
    data: Optional[bytes],
    headers: Optional[Dict[str, str]],
    method: Optional[str],
    timeout: float,
) -> Tuple[int, Dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, _lower(response.headers.items()), response.read()
    except urllib.error.HTTPError as e:
        return e.code, _lower(e.headers.items()), e.read()


def _lower(items: Sequence[Tuple[str, str]]) -> Dict[str, str]:
    return {k.lower(): v for k, v in items}


def journaledNumbers(dataDir: Path, queue: str = "events") -> List[int]:
    """
    The event numbers (see L{Flood}) in a journal queue, oldest first, read
    with the journal CLI; none if the queue's directory does not exist (a
    crash may take it).
    """
    if not (dataDir / queue).is_dir():
        return []
    out = subprocess.run(
        [sys.executable, "-m", "mixingest.journal", "cat", str(dataDir), queue],
        check=True,
        capture_output=True,
        cwd=ROOT,
    ).stdout
    return [json.loads(line)["properties"]["n"] for line in out.splitlines() if line]


def tally(acknowledged: Iterable[int], stored: Sequence[int]) -> Dict[str, int]:
    """
    How a queue's content C{stored} (event numbers, oldest first) measures
    up to what a L{Flood} saw acknowledged: C{acknowledged}; C{lost}, those
    not stored; C{duplicated}, stored copies beyond the first; C{reordered},
    first copies stored after a higher number of the same client; and
    C{unacknowledged}, stored events whose answer the client never saw
    (allowed: the answer may have been cut off).
    """
    acked = set(acknowledged)
    seen: set = set()
    highest: Dict[int, int] = {}
    duplicated = reordered = 0
    for n in stored:
        if n in seen:
            duplicated += 1
            continue
        seen.add(n)
        client = n // 1_000_000
        if n < highest.get(client, -1):
            reordered += 1
        highest[client] = max(n, highest.get(client, -1))
    return {
        "acknowledged": len(acked),
        "lost": len(acked - seen),
        "duplicated": duplicated,
        "reordered": reordered,
        "unacknowledged": len(seen - acked),
    }


def encoded(obj: object) -> str:
    """
    C{obj} as the browser SDK sends C{data}: base64 JSON, URL-quoted.
    """
    return urllib.parse.quote(base64.b64encode(json.dumps(obj).encode()))


class Flood:
    """
    Clients sending events to a daemon as fast as it answers, each event
    numbered; C{acknowledged} holds the numbers answered C{1}, and
    C{acknowledgedAt} when (C{time.monotonic()}, as the answer arrived).
    Client K numbers its events from K * 1,000,000, so per-client order can
    be checked on the queue.  A refusal (any other answer) is counted in
    C{refused} by status, with the last C{Retry-After} seen, and the client
    goes on with new numbers: nothing is sent twice.
    """

    def __init__(
        self,
        daemon: Daemon,
        clients: int = 4,
        perClient: int = 100_000,
        *,
        batch: int = 1,
        padding: int = 0,
        start: int = 0,
    ) -> None:
        """
        @param start: client K numbers its events from K * 1,000,000 +
            C{start}: a second flood after a restart goes on above the first.
        @param batch: events per request: one by C{GET}, more as a C{POST}.
        @param padding: about this many bytes of extra properties per event
            (in strings of 250 characters, under the cleaner's limit), to
            fill a disk quickly.
        """
        self.daemon = daemon
        self.perClient = perClient
        self.batch = batch
        self.padding = {f"pad{i}": "x" * 250 for i in range(padding // 250)}
        self.acknowledged: List[int] = []
        self.acknowledgedAt: Dict[int, float] = {}
        self.refused: Dict[int, int] = {}
        self.retryAfter: Optional[str] = None
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(k * 1_000_000 + start,))
            for k in range(clients)
        ]

    def _client(self, offset: int) -> None:
        for first in range(offset, offset + self.perClient, self.batch):
            if self._stop.is_set():
                return
            numbers = range(first, min(first + self.batch, offset + self.perClient))
            events = [
                {"event": "e", "properties": {"token": "tok", "n": n, **self.padding}}
                for n in numbers
            ]
            try:
                if self.batch == 1:
                    status, headers, body = self.daemon.request(
                        f"/track?data={encoded(events[0])}", timeout=5
                    )
                else:
                    status, headers, body = self.daemon.request(
                        "/track",
                        f"data={encoded(events)}".encode(),
                        {"Content-Type": "application/x-www-form-urlencoded"},
                        timeout=5,
                    )
            except OSError:
                return
            if status == 200 and body == b"1":
                now = time.monotonic()
                for n in numbers:
                    self.acknowledgedAt[n] = now
                self.acknowledged.extend(numbers)
            else:
                self.refused[status] = self.refused.get(status, 0) + 1
                self.retryAfter = headers.get("retry-after", self.retryAfter)
                time.sleep(0.02)

    def start(self) -> Flood:
        for thread in self._threads:
            thread.start()
        return self

    def waitFor(self, count: int, timeout: float = 60.0) -> None:
        """
        Wait until C{count} events in all have been acknowledged.
        """
        deadline = time.monotonic() + timeout
        while len(self.acknowledged) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {len(self.acknowledged)} of {count} events acknowledged"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
