"""
C{--workers N}: its options, its service tree, and the real thing: one
C{twistd} with two workers on one port, a worker killed and replaced, the
parent's C{SIGTERM} drained through both, and workers that outlive a killed
parent only for a moment.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from base64 import b64encode
from pathlib import Path
from typing import Callable, List, Tuple

import pytest
from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, Logger, LogLevel, formatEvent, formatEventAsClassicLogText
from twisted.python.usage import UsageError

from mixingest.journal.service import Journal
from mixingest.orphans import OrphanJournals
from mixingest.tap import Options, makeService
from mixingest.workers import WorkerSupervisor, _Worker, workerAdminEndpoint, workerLogObserver
from tests.daemon import ROOT, Daemon, freePort
from tests.servers import startRedis


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_workersOption() -> None:
    assert parse()["workers"] == 1
    options = parse("--workers", "3", "--listen", "tcp:0")
    assert options["workers"] == 3
    assert options.argv == ["--workers", "3", "--listen", "tcp:0"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "positive"),
        (["--workers", "two"], "number"),
        (["--workers", "2", "--listen", "ssl:8443:privateKey=k.pem"], "tcp:, tcp6: or unix:"),
        (["--workers", "2", "--admin-listen", "systemd:domain=INET:index=0"], "admin-listen"),
    ],
)
def test_badWorkerOptions(args: List[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(*args)


@pytest.mark.parametrize(
    "description, index, expected",
    [
        ("tcp:8001:interface=127.0.0.1", 2, "tcp:8003:interface=127.0.0.1"),
        ("tcp:port=8001", 1, "tcp:port=8002"),
        ("tcp6:8001:interface=\\:\\:1", 1, "tcp6:8002:interface=\\:\\:1"),
        ("tcp:0:interface=127.0.0.1", 3, "tcp:0:interface=127.0.0.1"),
        ("unix:/run/mixingest-admin.sock:mode=600", 1, "unix:/run/mixingest-admin.sock-1:mode=600"),
    ],
)
def test_workerAdminEndpoint(description: str, index: int, expected: str) -> None:
    assert workerAdminEndpoint(description, index) == expected


def test_serviceTree(tmp_path: Path) -> None:
    """
    The parent holds no journal and no listener: only the supervisor, which
    starts every worker with the parent's options and its own directory
    (logging through the parent), and the forwarder of orphaned journals.
    """
    options = parse(
        "--workers=2", f"--data-dir={tmp_path}", "--listen=tcp:0", "--fsync", "interval:20"
    )
    top = makeService(options, MemoryReactorClock())
    assert isinstance(top, MultiService)
    [supervisor] = [child for child in top if isinstance(child, WorkerSupervisor)]
    [orphans] = [child for child in top if isinstance(child, OrphanJournals)]
    assert (orphans.dataDir, orphans.workers) == (str(tmp_path), 2)
    assert not any(isinstance(child, Journal) for child in top)
    command = supervisor.workerCommand(1)
    assert "--logger=mixingest.workers.workerLogObserver" in command
    assert command[command.index("mixingest") + 1 :] == [
        "--workers=2",
        f"--data-dir={tmp_path}",
        "--listen=tcp:0",
        "--fsync",
        "interval:20",
        "--workers=1",
        f"--data-dir={tmp_path / 'worker-1'}",
        "--admin-listen=tcp:8002:interface=127.0.0.1",
    ]


def adjacentFreePorts(count: int = 2) -> int:
    """
    A port P such that P to P + count - 1 were all free a moment ago.
    """
    for _ in range(50):
        port = freePort()
        try:
            for offset in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no {count} adjacent free ports")


def childrenOf(pid: int) -> List[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return children


def waitFor(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(100).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def track(daemon: Daemon, insertId: str) -> Tuple[int, bytes]:
    event = {"event": "e", "properties": {"token": "tok", "$insert_id": insertId}}
    data = b64encode(json.dumps(event).encode()).decode()
    status, _, body = daemon.request(f"/track?data={data}", timeout=20)
    return status, body


def workerItems(daemon: Daemon, index: int) -> List[dict]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mixingest.journal",
            "cat",
            str(daemon.dataDir / f"worker-{index}"),
            "events",
        ],
        check=True,
        capture_output=True,
        cwd=ROOT,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line]


@pytest.fixture
def workers(tmp_path: Path):
    admin = adjacentFreePorts()
    daemon = Daemon(
        tmp_path, "--workers=2", f"--admin-listen=tcp:{admin}:interface=127.0.0.1", "--fsync=never"
    )
    daemon.start()
    try:
        waitFor(lambda: healthy(admin) and healthy(admin + 1), "both workers")
        yield daemon, admin
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()
        for pid in childrenOf(daemon.process.pid if daemon.process else -1):
            os.kill(pid, signal.SIGKILL)


def test_workersShareThePortAndSurviveAKill(workers: Tuple[Daemon, int]) -> None:
    """
    Two workers serve one port (each connection lands on one of them, so
    both get some of 100), a killed worker is replaced while requests keep
    being answered, and SIGTERM to the parent drains both: every event
    acknowledged is in one worker's journal, exactly once.
    """
    daemon, admin = workers
    assert daemon.process is not None
    # The parent makes DATA_DIR, the workers their journals in it: all
    # private, whatever the umask.
    for directory in (daemon.dataDir, daemon.dataDir / "worker-0", daemon.dataDir / "worker-1"):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
    sent = []
    for _ in range(100):
        sent.append(uuid.uuid4().hex[:32])
        assert track(daemon, sent[-1]) == (200, b"1")
    [victim, survivor] = sorted(childrenOf(daemon.process.pid))
    os.kill(victim, signal.SIGKILL)
    for _ in range(50):
        sent.append(uuid.uuid4().hex[:32])
        assert track(daemon, sent[-1]) == (200, b"1")
    waitFor(lambda: len(childrenOf(daemon.process.pid)) == 2, "the replacement worker")
    replacement = (set(childrenOf(daemon.process.pid)) - {survivor}).pop()
    assert replacement != victim
    waitFor(lambda: healthy(admin) and healthy(admin + 1), "the replacement to serve")
    for _ in range(50):
        sent.append(uuid.uuid4().hex[:32])
        assert track(daemon, sent[-1]) == (200, b"1")

    daemon.terminate()
    assert childrenOf(daemon.process.pid) == []
    log = daemon.log()
    assert "exited (signal 9)" in log and "starting it again" in log
    assert log.count("Server Shut Down.") >= 3  # both workers, then the parent
    # Through the parent's --logfile, with the worker as the log system.
    assert "[worker-0] Server Shut Down." in log and "[worker-1] Server Shut Down." in log
    perWorker = [workerItems(daemon, 0), workerItems(daemon, 1)]
    assert all(perWorker), [len(items) for items in perWorker]
    stored = [item["properties"]["$insert_id"] for items in perWorker for item in items]
    assert sorted(stored) == sorted(sent)


def test_workersDieWithTheParent(workers: Tuple[Daemon, int]) -> None:
    """
    A parent killed outright cannot drain its workers, but they notice
    (SIGTERM from the kernel) and stop on their own.
    """
    daemon, _ = workers
    assert daemon.process is not None
    children = childrenOf(daemon.process.pid)
    assert len(children) == 2
    daemon.kill()

    def gone() -> bool:
        for pid in children:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        return False
            except OSError:
                pass
        return True

    waitFor(gone, "the orphaned workers to exit", timeout=30)


class RelayedTo:
    """
    What a L{_Worker} needs of its supervisor to relay its output: the
    publisher of its log events and a logger for plain text.
    """

    def __init__(self) -> None:
        self.events: List[LogEvent] = []
        self.log = Logger(observer=self.events.append)

    def publish(self, event: LogEvent) -> None:
        self.events.append(event)


def test_workerLogEventsKeepTheirLevel() -> None:
    """
    A worker's log events reach the parent's observers as events of the
    same level (an error stays an error, with its traceback), in the system
    C{worker-K}; plain output is info, standard error is an error.
    """
    out = io.StringIO()
    workerLog = Logger(observer=workerLogObserver(out), namespace="w")
    workerLog.info("serving {n}", n=1)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        workerLog.failure("write failed")
    parent = RelayedTo()
    worker = _Worker(parent, 1)  # type: ignore[arg-type]
    data = out.getvalue().encode()
    worker.childDataReceived(1, data[:7])
    worker.childDataReceived(1, data[7:] + b"not json\n")
    worker.childDataReceived(2, b"Traceback (most recent call last):\n")
    info, error, text, stderr = parent.events
    assert (info["log_level"], info["log_system"]) == (LogLevel.info, "worker-1")
    assert formatEvent(info) == "serving 1"
    assert (error["log_level"], error["log_system"]) == (LogLevel.critical, "worker-1")
    assert "ZeroDivisionError: division by zero" in formatEventAsClassicLogText(error)
    assert (text["log_level"], formatEvent(text)) == (LogLevel.info, "not json")
    assert (stderr["log_level"], stderr["log_system"]) == (LogLevel.error, "worker-1")


def startDaemon(directory: Path, count: int, *args: str) -> Tuple[Daemon, int]:
    """
    The daemon with C{--workers count}, once every worker answers.
    """
    admin = adjacentFreePorts(count)
    daemon = Daemon(
        directory,
        f"--workers={count}",
        f"--admin-listen=tcp:{admin}:interface=127.0.0.1",
        "--fsync=never",
        *args,
    ).start()
    try:
        waitFor(lambda: all(healthy(admin + k) for k in range(count)), "every worker")
    except BaseException:
        stopDaemon(daemon)
        raise
    return daemon, admin


def stopDaemon(daemon: Daemon) -> None:
    if daemon.process is not None and daemon.process.poll() is None:
        daemon.terminate()
    for pid in childrenOf(daemon.process.pid if daemon.process else -1):
        os.kill(pid, signal.SIGKILL)


def journalItems(directory: Path) -> List[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "mixingest.journal", "cat", str(directory), "events"],
        capture_output=True,
        cwd=ROOT,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (3, 2)])
def test_changingWorkersStrandsNothing(tmp_path: Path, before: int, after: int) -> None:
    """
    Events spooled while Redis was down, by a daemon with C{--workers
    before}, all reach Redis exactly once after a restart with C{--workers
    after} and Redis up, whichever journal directories held them.
    """
    redis = startRedis(tmp_path)
    redis.stop()
    daemon, _ = startDaemon(tmp_path, before, f"--queue={redis.url}")
    sent = []
    try:
        for _ in range(200):
            sent.append(uuid.uuid4().hex[:32])
            assert track(daemon, sent[-1]) == (200, b"1")
    finally:
        stopDaemon(daemon)
    data = daemon.dataDir
    spooled = [data] if before == 1 else [data / f"worker-{k}" for k in range(before)]
    owned = [data] if after == 1 else [data / f"worker-{k}" for k in range(after)]
    # The control: what the restarted daemon's own journals do not hold.
    stranded = [d for d in spooled if d not in owned and journalItems(d)]
    assert stranded, "no journal to strand: the test would prove nothing"
    assert sorted(
        i["properties"]["$insert_id"] for d in spooled for i in journalItems(d)
    ) == sorted(sent)

    redis.start()
    try:
        daemon, _ = startDaemon(tmp_path, after, f"--queue={redis.url}")
        try:
            waitFor(lambda: len(redis.items("events")) >= len(sent), "every event in Redis", 60)
            waitFor(
                lambda: all(
                    f"{d} forwarded: orphaned journal released" in daemon.log() for d in stranded
                ),
                "the orphaned journals released",
            )
        finally:
            stopDaemon(daemon)
        stored = [json.loads(item)["properties"]["$insert_id"] for item in redis.items("events")]
    finally:
        redis.stop()
    assert sorted(stored) == sorted(sent)
