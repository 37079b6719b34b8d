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
from typing import Any, Dict, List

from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from mixingest.logs import eventAsJSONLine, jsonLogger
from tests.daemon import ROOT, Daemon, freePort, twistdCommand, waitForPort


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


def test_daemonLogsJSONAndAccessLog(tmp_path: Path) -> None:
    port, output = freePort(), tmp_path / "stdout"
    command = [
        *twistdCommand(),
        "--nodaemon",
        "--pidfile=",
        "--logger=mixingest.logs.jsonLogger",
        "mixingest",
        f"--listen=tcp:{port}:interface=127.0.0.1",
        f"--admin-listen=tcp:{freePort()}:interface=127.0.0.1",
        f"--data-dir={tmp_path / 'data'}",
        "--access-log",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with output.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            waitForPort(port, process)
            client = Daemon(tmp_path, port=port)
            assert client.request("/track?data=W10%3D")[0] == 200
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == -signal.SIGTERM
    records = [json.loads(line) for line in output.read_text().splitlines()]
    messages = [r["message"] for r in records]
    assert any('"GET /track?data=W10%3D HTTP/1.1" 200' in m for m in messages), messages
    assert "Server Shut Down." in messages
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)
