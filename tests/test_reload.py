"""
SIGHUP: the reload mechanism in process, and on the real daemon under load
over real sockets: a changed secrets or routes file applies, a bad one is
refused with a log line and the old settings stay, the log file is
reopened, no request fails and the process stays up.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, cast

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import FileLogObserver, ILogObserver, formatEvent, globalLogPublisher
from twisted.python.logfile import LogFile

from mixingest.auth import ImportSecrets
from mixingest.funnel import Funnel
from mixingest.ratelimit import RateLimiter
from mixingest.reload import (
    LimitsFile,
    Reloader,
    ReloadOnSignal,
    RoutesFile,
    SignalWorkers,
    twistdLogFiles,
)
from mixingest.systemd import Notifier
from tests.daemon import Daemon, encoded
from tests.test_funnel import HeldQueue
from tests.test_workers import startDaemon, stopDaemon

WAIT = 20.0


def write(path: Path, document: Any) -> None:
    """
    Replace C{path} atomically, as an operator's deploy tool should.
    """
    temporary = path.with_suffix(".tmp")
    temporary.write_text(document if isinstance(document, str) else json.dumps(document))
    temporary.chmod(0o600)
    os.replace(temporary, path)


class Setting:
    def __init__(self, fail: Optional[Exception] = None) -> None:
        self.fail = fail
        self.reloads = 0

    def reload(self) -> None:
        if self.fail is not None:
            raise self.fail
        self.reloads += 1


@pytest.fixture
def logged() -> Iterator[List[str]]:
    lines: List[str] = []

    def observer(event: Dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(cast(ILogObserver, observer))
    yield lines
    globalLogPublisher.removeObserver(cast(ILogObserver, observer))


def test_eachFileStandsAlone(logged: List[str]) -> None:
    """
    A setting that fails keeps its old state and is logged; the others
    reload all the same, whatever the failure.
    """
    reloader = Reloader(logFiles=lambda: iter(()))
    good, bad = Setting(), Setting(ValueError("x.json is not valid JSON"))
    broken = Setting(KeyError("bug"))
    reloader.register("good", good)
    reloader.register("bad", bad)
    reloader.register("broken", broken)
    reloader.register("after", Setting())
    results = reloader.reload()
    assert results == {
        "good": None,
        "bad": "x.json is not valid JSON",
        "broken": "KeyError('bug')",
        "after": None,
    }
    assert good.reloads == 1
    assert any(
        "reloading bad failed, the previous settings stay: x.json is not valid JSON" in line
        for line in logged
    )
    assert "SIGHUP: reload failed for bad, broken: previous settings kept" in logged


def test_routesFile(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    funnel = Funnel(HeldQueue(), MemoryReactorClock(), routes={"a": "qa", "b": "qb"})
    routes = RoutesFile(str(path), funnel, {"a": "qa", "b": "qb"})
    write(path, {"b": "qb2", "c": "qc"})
    routes.reload()
    assert funnel.routes == {"a": "qa", "b": "qb2", "c": "qc"}
    assert funnel.queueFor("track", "c") == "qc"
    for bad in ('{"c": "no/slashes"}', '{"c": 1}', "[]", "{nope"):
        write(path, bad)
        with pytest.raises(ValueError, match=r"routes\.json"):
            routes.reload()
        assert funnel.routes == {"a": "qa", "b": "qb2", "c": "qc"}
    path.unlink()
    with pytest.raises(ValueError, match="cannot read the --routes-file file"):
        routes.reload()
    assert funnel.routes == {"a": "qa", "b": "qb2", "c": "qc"}


def test_limitsFile(tmp_path: Path) -> None:
    path = tmp_path / "limits.json"
    funnel = Funnel(HeldQueue(), MemoryReactorClock())
    limits = LimitsFile(str(path), funnel, maxTokens=10, rate=None, globalRate=1000)
    write(path, {"rate_limit": 100})
    limits.reload()
    limiter = funnel.limiter
    assert isinstance(limiter, RateLimiter)
    assert (limiter.rate, limiter.globalRate, limiter.maxTokens) == (100, 1000, 10)
    limits.reload()
    assert funnel.limiter is limiter, "unchanged: the buckets are kept"
    write(path, {"rate_limit": 50, "global_rate_limit": None})
    limits.reload()
    changed = funnel.limiter
    assert isinstance(changed, RateLimiter) and (changed.rate, changed.globalRate) == (50, None)
    for bad in (
        '{"rate_limit": 0}',
        '{"rate_limit": true}',
        '{"rate": 5}',
        '{"global_rate_limit": "9"}',
        "[1]",
    ):
        write(path, bad)
        with pytest.raises(ValueError, match=r"limits\.json"):
            limits.reload()
        assert funnel.limiter is changed
    write(path, {"rate_limit": None, "global_rate_limit": None})
    limits.reload()
    assert funnel.limiter is None
    write(path, {})
    limits.reload()
    assert funnel.limiter is not None and funnel.limiter.globalRate == 1000


def test_importSecretsReload(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    write(path, {"tok": "s1"})
    secrets = ImportSecrets.fromFile(str(path))
    write(path, {"tok": "s2"})
    secrets.reload()
    assert secrets._byDigest == ImportSecrets({"tok": "s2"})._byDigest
    write(path, {"tok": ""})
    with pytest.raises(ValueError):
        secrets.reload()
    assert secrets._byDigest == ImportSecrets({"tok": "s2"})._byDigest
    with pytest.raises(ValueError, match="not read from a file"):
        ImportSecrets({"tok": "s"}).reload()


def test_reopensLogFiles(tmp_path: Path) -> None:
    """
    After logrotate moves the log file away, a reload makes the daemon
    write to a new file at the configured path.
    """
    logFile = LogFile.fromFullPath(str(tmp_path / "twistd.log"))
    try:
        logFile.write("before\n")
        logFile.flush()
        os.rename(tmp_path / "twistd.log", tmp_path / "twistd.log.1")
        Reloader(logFiles=lambda: iter([logFile])).reload()
        logFile.write("after\n")
        logFile.flush()
    finally:
        logFile.close()
    assert (tmp_path / "twistd.log.1").read_text() == "before\n"
    assert (tmp_path / "twistd.log").read_text() == "after\n"


def test_findsTwistdLogFile(tmp_path: Path) -> None:
    """
    twistd's C{--logfile} observer is found through the global log
    publisher (this breaks if Twisted changes the internals it relies on).
    """
    logFile = LogFile.fromFullPath(str(tmp_path / "twistd.log"))
    observer = FileLogObserver(logFile, lambda event: "")
    assert logFile not in list(twistdLogFiles())
    globalLogPublisher.addObserver(observer)
    try:
        assert logFile in list(twistdLogFiles())
    finally:
        globalLogPublisher.removeObserver(observer)
        logFile.close()


class ThreadedReactor(MemoryReactorClock):
    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.callLater(0, f, *args, **kwargs)


def test_reloadOnSignal() -> None:
    """
    The signal is ignored from the privileged start (no death by SIGHUP
    while starting), handled once the reactor runs, and the reload runs on
    the reactor thread.
    """
    reactor = ThreadedReactor()
    installed: List[Tuple[int, Any]] = []
    reloads: List[int] = []
    service = ReloadOnSignal(
        reactor, lambda: reloads.append(1), installHandler=lambda n, h: installed.append((n, h))
    )
    service.privilegedStartService()
    service.startService()
    assert installed == [(signal.SIGHUP, signal.SIG_IGN)]
    reactor.run()
    number, handler = installed[-1]
    assert number == signal.SIGHUP and callable(handler)
    handler(signal.SIGHUP, None)
    assert reloads == []
    reactor.advance(0)
    assert reloads == [1]


def test_signalWorkers() -> None:
    class Transport:
        def __init__(self, pid: Optional[int]) -> None:
            self.pid = pid
            self.signals: List[str] = []

        def signalProcess(self, name: str) -> None:
            self.signals.append(name)

    class Worker:
        def __init__(self, index: int, pid: Optional[int]) -> None:
            self.index = index
            self.transport = Transport(pid)

    class Supervisor:
        workers = {0: Worker(0, 10), 1: Worker(1, None)}

    SignalWorkers(Supervisor()).reload()
    assert [w.transport.signals for w in Supervisor.workers.values()] == [["HUP"], []]


def test_reloadTellsTheServiceManager(tmp_path: Path) -> None:
    import socket

    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(WAIT)
    try:
        reloader = Reloader(Notifier(str(tmp_path / "notify")), logFiles=lambda: iter(()))
        reloader.register("bad", Setting(ValueError("nope")))
        reloader.reload()
        reloading = manager.recv(4096).decode().split("\n")
        ready = manager.recv(4096).decode().split("\n")
    finally:
        manager.close()
    assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
    assert ready == ["READY=1", "STATUS=reload failed for bad: previous settings kept"]


def basic(secret: str) -> Dict[str, str]:
    return {
        "Authorization": "Basic " + base64.b64encode(f"{secret}:".encode()).decode(),
        "Content-Type": "application/json",
    }


def imported() -> bytes:
    """
    An /import body of one event, with an C{$insert_id} of its own: each
    one is stored, none is taken for a retry of another.
    """
    event = {
        "event": "i",
        "properties": {
            "token": "tok",
            "distinct_id": "u",
            "time": int(time.time()),
            "$insert_id": uuid.uuid4().hex,
        },
    }
    return json.dumps([event]).encode()


class Load:
    """
    A few clients sending C{/track} as fast as they are answered, a bounded
    number of times; every answer that is not C{1} is a failure.
    """

    def __init__(self, daemon: Daemon, clients: int = 3, perClient: int = 20_000) -> None:
        self.daemon = daemon
        self.acknowledged: List[int] = []
        self.failures: List[Any] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(perClient,)) for _ in range(clients)
        ]

    def _client(self, count: int) -> None:
        path = "/track?data=" + encoded({"event": "e", "properties": {"token": "tok"}})
        for _ in range(count):
            if self._stop.is_set():
                return
            try:
                status, _, body = self.daemon.request(path, timeout=10)
            except OSError as e:
                self.failures.append(e)
                continue
            if (status, body) == (200, b"1"):
                self.acknowledged.append(1)
            else:
                self.failures.append((status, body))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def waitFor(check: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_sighupUnderLoad(tmp_path: Path) -> None:
    """
    SIGHUP on the real daemon under load reloads C{--import-secrets},
    C{--routes-file} and C{--tokens} and reopens the log file; a reload
    with broken files keeps the previous settings; no request fails.
    """
    secrets, routes = tmp_path / "secrets.json", tmp_path / "routes.json"
    tokens = tmp_path / "tokens.json"
    write(secrets, {"tok": "s1"})
    write(routes, {"tok": "first"})
    write(tokens, ["tok", "old"])
    daemon = Daemon(
        tmp_path,
        f"--import-secrets={secrets}",
        f"--routes-file={routes}",
        f"--tokens={tokens}",
        "--fsync=never",
    ).start()
    process = daemon.process
    assert process is not None

    def imports(secret: str) -> int:
        return daemon.request("/import", imported(), basic(secret))[0]

    def accepted(token: str) -> bool:
        event = {"event": "e", "properties": {"token": token}}
        return daemon.request(f"/track?data={encoded(event)}")[2] == b"1"

    try:
        with Load(daemon) as load:
            waitFor(lambda: len(load.acknowledged) > 100, "traffic")
            assert (imports("s1"), imports("s2")) == (200, 401)
            assert (accepted("old"), accepted("new")) == (True, False)
            write(secrets, {"tok": "s2"})
            write(routes, {"tok": "second"})
            write(tokens, ["tok", "new"])
            os.rename(daemon.logFile, tmp_path / "twistd.log.1")
            process.send_signal(signal.SIGHUP)
            waitFor(lambda: imports("s2") == 200, "the new secret")
            assert imports("s1") == 401
            assert (accepted("old"), accepted("new")) == (False, True)
            waitFor(lambda: daemon.logFile.exists(), "the reopened log file")
            assert "SIGHUP: reloaded" in daemon.logFile.read_text()
            before = len(load.acknowledged)
            waitFor(lambda: len(load.acknowledged) > before + 100, "traffic after the reload")

            write(secrets, "{not json")
            write(routes, {"tok": "no/such queue"})
            write(tokens, {"not": "a list"})
            process.send_signal(signal.SIGHUP)
            waitFor(lambda: "previous settings kept" in daemon.log(), "the refusal")
            log = daemon.log()
            assert "reloading --import-secrets failed, the previous settings stay" in log
            assert "reloading --routes-file failed, the previous settings stay" in log
            assert "reloading --tokens failed, the previous settings stay" in log
            assert (imports("s2"), imports("s1")) == (200, 401)
            assert (accepted("old"), accepted("new")) == (False, True)
            before = len(load.acknowledged)
            waitFor(lambda: len(load.acknowledged) > before + 100, "traffic after the bad reload")
            assert process.poll() is None
        assert load.failures == []
        daemon.terminate()
    finally:
        if process.poll() is None:
            daemon.kill()
    first, second = daemon.items("first"), daemon.items("second")
    assert first and second
    assert len(first) + len(second) == len(load.acknowledged) + 3  # and three imports


def test_sighupReachesTheWorkers(tmp_path: Path) -> None:
    """
    Under C{--workers}, SIGHUP to the parent reloads every worker; nobody
    dies of it.  (A worker gets SIGHUP's default action until its own
    handler is installed: the daemon is started once every worker serves,
    on admin ports that were all free, since worker K listens on the
    configured port plus K.)
    """
    secrets = tmp_path / "secrets.json"
    write(secrets, {"tok": "s1"})
    daemon, _ = startDaemon(tmp_path, 2, f"--import-secrets={secrets}")
    process = daemon.process
    assert process is not None
    try:
        write(secrets, {"tok": "s2"})
        process.send_signal(signal.SIGHUP)
        waitFor(
            lambda: all("SIGHUP: reloaded" in _line(daemon.log(), f"worker-{k}") for k in (0, 1)),
            "both workers reloading",
        )
        for _ in range(4):  # the kernel spreads connections over both workers
            assert daemon.request("/import", imported(), basic("s2"))[0] == 200
        assert process.poll() is None
        assert "restart" not in daemon.log()
    finally:
        stopDaemon(daemon)


def _line(log: str, prefix: str) -> str:
    """
    The last line of C{log} about SIGHUP with C{prefix}, or "".
    """
    lines = [line for line in log.splitlines() if prefix in line and "SIGHUP" in line]
    return lines[-1] if lines else ""
