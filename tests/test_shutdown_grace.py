"""
SIGTERM behind a load balancer: C{/readyz} turns 503 first, the daemon
keeps serving for C{--shutdown-grace}, and only then stops listening,
drains and exits.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
from pathlib import Path
from typing import List, Optional, Tuple, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mixingest.lifecycle import OrderedMultiService, ShutdownGrace
from tests.daemon import Daemon, encoded

GRACE = 4.0
TRACK = "/track?data=" + encoded({"event": "e", "properties": {"token": "tok", "n": 1}})


class Advertised:
    stopping = False


class Listener(Service):
    def __init__(self, log: List[str]) -> None:
        self.log = log

    def stopService(self) -> None:
        super().stopService()
        self.log.append("listener stopped")


def test_graceBeforeTheListenersStop() -> None:
    clock, advertised, log = Clock(), Advertised(), cast(List[str], [])
    top = OrderedMultiService()
    Listener(log).setServiceParent(top)
    ShutdownGrace(clock, advertised, 5.0).setServiceParent(top)
    top.startService()
    done: List[None] = []
    stopped: Deferred[None] = top.stopService()
    stopped.addCallback(done.append)
    assert advertised.stopping and log == [] and not done
    clock.advance(4.9)
    assert log == [] and not done
    clock.advance(0.1)
    assert log == ["listener stopped"] and done == [None]


def test_noGrace() -> None:
    clock, advertised, log = Clock(), Advertised(), cast(List[str], [])
    top = OrderedMultiService()
    Listener(log).setServiceParent(top)
    ShutdownGrace(clock, advertised, 0).setServiceParent(top)
    top.startService()
    done: List[None] = []
    top.stopService().addCallback(done.append)
    assert done == [None] and advertised.stopping and log == ["listener stopped"]


def exitedGracefully(daemon: Daemon) -> None:
    """
    Wait for the exit that the SIGTERM already sent asked for (another
    one would only be refused: the reactor is already stopping).
    """
    assert daemon.process is not None
    status = daemon.process.wait(30)
    log = daemon.log()
    assert status == -signal.SIGTERM and "Server Shut Down." in log, (status, log[-3000:])
    assert "Traceback" not in log, log[-3000:]


def _admin(daemon: Daemon) -> Daemon:
    return Daemon(daemon.directory, port=daemon.adminPort)


def stopAndWatch(daemon: Daemon) -> Tuple[bool, Optional[Tuple[int, bytes]]]:
    """
    Send SIGTERM, then poll C{/readyz} until it answers 503 (or the admin
    port closes), and then ask the public port once.

    @return: whether C{/readyz} was seen at 503 saying C{stopping}, and
        the public answer after that (L{None} if refused).
    """
    assert daemon.process is not None
    admin = _admin(daemon)
    daemon.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    sawStopping = False
    while time.monotonic() < deadline:
        try:
            status, _, body = admin.request("/readyz", timeout=5)
        except (urllib.error.URLError, OSError):
            break
        if status == 503:
            sawStopping = json.loads(body)["stopping"] is True
            break
        time.sleep(0.01)
    try:
        status, _, body = daemon.request(TRACK, timeout=5)
    except (urllib.error.URLError, OSError):
        return sawStopping, None
    return sawStopping, (status, body)


def test_sigtermServesThroughTheGrace(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, f"--shutdown-grace={GRACE}").start()
    try:
        assert daemon.request(TRACK)[::2] == (200, b"1")
        assert _admin(daemon).request("/readyz")[0] == 200
        sawStopping, answer = stopAndWatch(daemon)
        assert sawStopping
        assert answer == (200, b"1"), "served during the grace, after /readyz said 503"
        exitedGracefully(daemon)
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()
    assert "serving 4.0s more before closing the listeners" in daemon.log()
    assert len(daemon.items("events")) == 2


def test_withoutGraceTheListenersCloseAtOnce(tmp_path: Path) -> None:
    """
    Control: with no grace, whatever C{/readyz} said, a request sent once
    the stop is under way is not answered C{1}: the test above can see
    the listeners close too early.
    """
    daemon = Daemon(tmp_path, "--shutdown-grace=0").start()
    try:
        assert daemon.request(TRACK)[::2] == (200, b"1")
        _, answer = stopAndWatch(daemon)
        assert answer is None or answer[0] == 503
        exitedGracefully(daemon)
    finally:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()
