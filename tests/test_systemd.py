"""
systemd integration: the notification protocol on a test datagram socket
(in process and from the real daemon), and socket activation through
C{systemd-socket-activate}.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from mixingest.systemd import Notifier, ReadyNotifier, Watchdog
from tests.daemon import ROOT, Daemon, encoded, freePort, twistdCommand

WAIT = 20.0
TRACK = "/track?data=" + encoded({"event": "e", "properties": {"token": "tok"}})


class NotifySocket:
    """
    A service manager's end: a datagram socket that collects what the
    daemon says.
    """

    def __init__(self, address: str) -> None:
        """
        @param address: a path, or C{@name} for the abstract namespace.
        """
        self.address = address
        self.messages: List[str] = []
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind("\0" + address[1:] if address[0] == "@" else address)

    def receiveUntil(self, done: Callable[[List[str]], bool], timeout: float = WAIT) -> List[str]:
        """
        Collect messages until C{done(messages)}; fail after C{timeout}.
        """
        deadline = time.monotonic() + timeout
        while not done(self.messages):
            left = deadline - time.monotonic()
            assert left > 0, f"gave up waiting; received {self.messages}"
            self._socket.settimeout(left)
            try:
                self.messages.append(self._socket.recv(4096).decode())
            except socket.timeout:
                continue
        return self.messages

    def close(self) -> None:
        self._socket.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(str(tmp_path / "notify"))
    yield s
    s.close()


def has(line: str) -> Callable[[List[str]], bool]:
    return lambda messages: any(line in m.split("\n") for m in messages)


def test_notifyToPath(manager: NotifySocket) -> None:
    Notifier(manager.address).notify("READY=1\nSTATUS=up")
    assert manager.receiveUntil(has("READY=1")) == ["READY=1\nSTATUS=up"]


def test_notifyToAbstractSocket() -> None:
    name = f"@mixingest-test-{os.getpid()}-{time.monotonic_ns()}"
    manager = NotifySocket(name)
    try:
        Notifier(name).notify("WATCHDOG=1")
        assert manager.receiveUntil(has("WATCHDOG=1")) == ["WATCHDOG=1"]
    finally:
        manager.close()


def test_noManagerNoSocket(tmp_path: Path) -> None:
    """
    Without C{NOTIFY_SOCKET}, or with one nobody listens on, notifying does
    nothing and raises nothing.
    """
    notifier = Notifier.fromEnvironment({})
    assert not notifier.enabled and notifier.watchdogPeriod is None
    notifier.notify("READY=1")
    Notifier(str(tmp_path / "nobody")).notify("READY=1")
    assert not Notifier("relative/path").enabled


def test_fromEnvironmentTakesTheVariables() -> None:
    """
    The variables are removed (the workers must not speak for the unit),
    and the watchdog applies only to the process it names.
    """
    env = {"NOTIFY_SOCKET": "@sock", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "42", "X": "1"}
    notifier = Notifier.fromEnvironment(env, pid=42)
    assert (notifier.address, notifier.watchdogPeriod) == ("@sock", 3.0)
    assert env == {"X": "1"}
    other = {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "7"}
    assert Notifier.fromEnvironment(other, pid=42).watchdogPeriod is None
    assert Notifier.fromEnvironment({"WATCHDOG_USEC": "x"}).watchdogPeriod is None


def test_readyOnceRunningStoppingFirst(manager: NotifySocket) -> None:
    reactor = MemoryReactorClock()
    service = ReadyNotifier(reactor, Notifier(manager.address), lambda: "serving on\ntcp:1")
    service.startService()
    reactor.run()
    manager.receiveUntil(has("READY=1"))
    service.stopService()
    messages = manager.receiveUntil(has("STOPPING=1"))
    assert messages[0] == "READY=1\nSTATUS=serving on tcp:1"
    assert messages[1].startswith("STOPPING=1\nSTATUS=")


def test_readyNotBeforeTheReactorRuns(manager: NotifySocket) -> None:
    """
    Control for the test above: before the reactor runs (twistd starts
    the services first), nothing is sent.
    """
    reactor = MemoryReactorClock()
    ReadyNotifier(reactor, Notifier(manager.address), lambda: "x").startService()
    Notifier(manager.address).notify("MARK=1")
    assert manager.receiveUntil(has("MARK=1")) == ["MARK=1"]


def test_watchdogEveryHalfPeriod(manager: NotifySocket) -> None:
    clock = Clock()
    watchdog = Watchdog(clock, Notifier(manager.address, watchdogPeriod=10.0))
    watchdog.startService()
    clock.advance(4.9)
    clock.advance(0.1)
    watchdog.stopService()
    clock.advance(20)
    manager.receiveUntil(lambda m: len(m) == 2)
    Notifier(manager.address).notify("MARK=1")
    assert manager.receiveUntil(has("MARK=1")) == ["WATCHDOG=1", "WATCHDOG=1", "MARK=1"]


def test_noWatchdogWithoutPeriod(manager: NotifySocket) -> None:
    clock = Clock()
    Watchdog(clock, Notifier(manager.address)).startService()
    clock.advance(100)
    assert clock.getDelayedCalls() == []


def test_daemonNotifies(
    tmp_path: Path, manager: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The real daemon: C{READY=1} with a C{STATUS=} once it listens,
    C{WATCHDOG=1} over and over, C{RELOADING=1} then C{READY=1} on
    C{SIGHUP}, C{STOPPING=1} on C{SIGTERM}, and then a graceful exit.
    """
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    daemon = Daemon(tmp_path).start()
    try:
        messages = manager.receiveUntil(has("READY=1"))
        ready = next(m for m in messages if "READY=1" in m.split("\n"))
        assert f"STATUS=serving on tcp:{daemon.port}:interface=127.0.0.1" in ready.split("\n")
        assert daemon.request(TRACK)[::2] == (200, b"1")
        manager.receiveUntil(lambda m: m.count("WATCHDOG=1") >= 3)
        daemon.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        manager.receiveUntil(has("RELOADING=1"))
        manager.receiveUntil(has("STATUS=reloaded"))
        daemon.terminate()
        messages = manager.receiveUntil(has("STOPPING=1"))
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()
    lifecycle = [m for m in messages if m != "WATCHDOG=1"]
    assert [m.split("\n")[0] for m in lifecycle] == [
        "READY=1",
        "RELOADING=1",
        "READY=1",
        "STOPPING=1",
    ]
    assert lifecycle[1].split("\n")[1].startswith("MONOTONIC_USEC=")


def test_socketActivation(tmp_path: Path, manager: NotifySocket) -> None:
    """
    C{--listen systemd:domain=INET:index=0} adopts the socket the service
    manager passes (here C{systemd-socket-activate}, which starts the
    daemon on the first connection: that connection is answered).
    """
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package: systemd)")
    port, adminPort = freePort(), freePort()
    command = [
        activate,
        f"--listen=127.0.0.1:{port}",
        "--fdname=public",
        f"--setenv=PYTHONPATH={ROOT}",
        f"--setenv=NOTIFY_SOCKET={manager.address}",
        *twistdCommand(),
        "--nodaemon",
        "--pidfile=",
        f"--logfile={tmp_path / 'twistd.log'}",
        "mixingest",
        "--listen=systemd:domain=INET:index=0",
        f"--data-dir={tmp_path / 'data'}",
        f"--admin-listen=tcp:{adminPort}:interface=127.0.0.1",
        "--shutdown-grace=0",
    ]
    with (tmp_path / "output.log").open("wb") as output:
        process = subprocess.Popen(command, cwd=tmp_path, stdout=output, stderr=output)
    client = Daemon(tmp_path, port=port)
    try:
        deadline = time.monotonic() + WAIT
        while b"Listening on" not in (tmp_path / "output.log").read_bytes():
            assert process.poll() is None and time.monotonic() < deadline, client.log()
            time.sleep(0.05)
        assert client.request(TRACK, timeout=WAIT)[::2] == (200, b"1")
        manager.receiveUntil(has("READY=1"))
        assert client.request(TRACK)[::2] == (200, b"1")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == -signal.SIGTERM
        manager.receiveUntil(has("STOPPING=1"))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = client.log()
    assert "Server Shut Down." in log and "Traceback" not in log, log


def test_unitsVerify(tmp_path: Path) -> None:
    """
    The shipped units parse, with no unknown keys (systemd only warns of
    those), and the service is the notify type the daemon speaks.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    units = ROOT / "contrib" / "systemd"
    service = (units / "mixingest.service").read_text()
    assert "Type=notify" in service and "ExecReload=/bin/kill -HUP $MAINPID" in service
    (tmp_path / "mixingest.service").write_text(
        service.replace("/opt/mixingest/bin/twistd", shutil.which("true") or "/bin/true")
    )
    shutil.copy(units / "mixingest.socket", tmp_path)
    result = subprocess.run(
        [analyze, "verify", "mixingest.socket", "mixingest.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
