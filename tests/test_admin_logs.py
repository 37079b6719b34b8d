"""
Logs for shippers: flat JSON lines through twistd's C{--logger}, and the
opt-in access log still working through the metered site.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, List

from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from mixingest.logs import eventAsJSONLine, jsonLogger
from tests.daemon import ROOT, Daemon, freePort, twistdCommand, waitForPort
from tests.test_workers import adjacentFreePorts, healthy, waitFor


def captured() -> tuple[Logger, List[Dict[str, Any]]]:
    lines: List[Dict[str, Any]] = []
    publisher = LogPublisher(lambda event: lines.append(json.loads(eventAsJSONLine(event) or "")))
    return Logger(namespace="mixingest.test", observer=publisher), lines


def test_flatFields() -> None:
    log, lines = captured()
    log.warn(
        "queue {queue} diverted after {count} failures", queue="events", count=3, where=object()
    )
    (line,) = lines
    assert line["level"] == "warn"
    assert line["namespace"] == "mixingest.test"
    assert line["message"] == "queue events diverted after 3 failures"
    assert (line["queue"], line["count"]) == ("events", 3)
    assert line["where"].startswith("<object object")
    assert line["time"].endswith("+00:00")
    assert not any(key.startswith("log_") for key in line)


def test_failureHasTraceback() -> None:
    log, lines = captured()
    try:
        raise ZeroDivisionError("no")
    except ZeroDivisionError:
        log.failure("storing failed", Failure(), level=LogLevel.error)
    (line,) = lines
    assert line["level"] == "error"
    assert "ZeroDivisionError" in line["traceback"]


def test_observerFactory() -> None:
    assert ILogObserver.providedBy(jsonLogger())


def jsonLogged(
    tmp_path: Path, port: int, admin: int, *args: str, meanwhile: Callable[[], None]
) -> List[Dict[str, Any]]:
    """
    Run the daemon with twistd's C{--logger=mixingest.logs.jsonLogger} on
    C{port} and admin port C{admin}, call C{meanwhile} once it runs, stop it
    with SIGTERM.

    @return: every JSON line it logged.
    """
    output = tmp_path / "stdout"
    command = [
        *twistdCommand(),
        "--nodaemon",
        "--pidfile=",
        "--logger=mixingest.logs.jsonLogger",
        "mixingest",
        f"--listen=tcp:{port}:interface=127.0.0.1",
        f"--admin-listen=tcp:{admin}:interface=127.0.0.1",
        f"--data-dir={tmp_path / 'data'}",
        *args,
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with output.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            meanwhile()
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == -signal.SIGTERM
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)
    return records


def test_daemonLogsJSONAndAccessLog(tmp_path: Path) -> None:
    port = freePort()

    def request() -> None:
        waitForPort(port)
        assert Daemon(tmp_path, port=port).request("/track?data=W10%3D")[0] == 200

    records = jsonLogged(tmp_path, port, freePort(), "--access-log", meanwhile=request)
    messages = [r["message"] for r in records]
    assert any('"GET /track?data=W10%3D HTTP/1.1" 200' in m for m in messages), messages
    assert "Server Shut Down." in messages


def test_workersLogThroughTheParentsLogger(tmp_path: Path) -> None:
    """
    Under C{--workers}, twistd's C{--logger} (given before C{mixingest})
    applies to every worker: their lines come out of the parent's JSON
    logger, with C{system} naming the worker.
    """
    admin = adjacentFreePorts(2)
    records = jsonLogged(
        tmp_path,
        freePort(),
        admin,
        "--workers=2",
        "--fsync=never",
        meanwhile=lambda: waitFor(lambda: healthy(admin) and healthy(admin + 1), "both workers"),
    )
    for system in ("worker-0", "worker-1"):
        messages = [r["message"] for r in records if r.get("system") == system]
        assert "Server Shut Down." in messages, (system, messages)
