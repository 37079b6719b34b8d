"""
The twistd plugin, its options and the service tree it builds.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceMaker, MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError

from mixingest.funnel import Funnel
from mixingest.journal.fsync import FsyncPolicy
from mixingest.journal.service import Journal
from mixingest.queues.forwarding import ForwardingQueue
from mixingest.queues.urls import JournalTarget, RedisTarget
from mixingest.tap import Options, makeService
from tests.daemon import twistdCommand


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_defaults() -> None:
    options = parse()
    assert options["listen"] == ["tcp:8000"]
    assert options["data-dir"] == "mixingest-data"
    assert isinstance(options["queue"], JournalTarget)
    assert options["fsync"] == FsyncPolicy.always()
    assert options["max-batch"] == 2000
    assert options["max-body"] == 10 * 1024 * 1024
    assert options["trusted-proxy"] == []
    assert options["route"] == {}
    assert options["import-secrets"] is None
    assert (options["header-timeout"], options["body-timeout"]) == (10.0, 30.0)


def test_everything(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.json"
    secrets.write_text("{}")
    options = parse(
        "--listen",
        "tcp:1:interface=127.0.0.1",
        "--listen",
        "unix:/tmp/x.sock",
        "--queue",
        "redis://:pw@127.0.0.1:6380/2",
        "--fsync",
        "interval:50",
        "--max-body",
        "1000",
        "--max-batch",
        "10",
        "--trusted-proxy",
        "10.0.0.0/8",
        "--trusted-proxy",
        "unix",
        "--route",
        "noisy=noisy_events",
        "--import-secrets",
        str(secrets),
    )
    assert options["listen"] == ["tcp:1:interface=127.0.0.1", "unix:/tmp/x.sock"]
    assert isinstance(options["queue"], RedisTarget)
    assert options["fsync"] == FsyncPolicy.every(50)
    assert (options["max-body"], options["max-batch"]) == (1000, 10)
    assert options["trusted-proxy"] == ["10.0.0.0/8", "unix"]
    assert options["route"] == {"noisy": "noisy_events"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fsync", "sometimes"], "--fsync"),
        (["--queue", "amqp://x"], "--queue"),
        (["--max-body", "-1"], "positive"),
        (["--max-batch", "many"], "number"),
        (["--trusted-proxy", "everyone"], "not a network"),
        (["--route", "tok=bad/queue"], "--route"),
        (["--import-secrets", "/nonexistent"], "no such file"),
    ],
)
def test_badOptions(args: list, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(*args)


def test_serviceTree(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    top = makeService(
        parse("--data-dir", str(tmp_path), "--listen", "tcp:0", "--listen", "tcp:0"), reactor
    )
    assert isinstance(top, MultiService)
    kinds = [type(child) for child in top]
    assert kinds[0] is Journal
    assert Funnel in kinds
    assert kinds.index(Funnel) < kinds.index(StreamServerEndpointService)
    assert sum(k is StreamServerEndpointService for k in kinds) == 2


def test_remoteQueueOwnsTheJournal(tmp_path: Path) -> None:
    """
    With a remote queue the store-and-forward service starts and stops the
    journal; adding it to the tree as well would start it twice.
    """
    reactor = MemoryReactorClock()
    top = makeService(
        parse(
            "--data-dir", str(tmp_path), "--queue", "redis://127.0.0.1:1/0", "--shutdown-grace=0"
        ),
        reactor,
    )
    kinds = [type(child) for child in top]
    assert kinds[0] is ForwardingQueue
    assert Journal not in kinds
    top.startService()
    assert (tmp_path / "lock").exists()
    top.stopService()


def test_pluginDiscovered() -> None:
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert makers["mixingest"].options is Options


def test_twistdHelp() -> None:
    out = subprocess.run(
        [*twistdCommand(), "mixingest", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in (
        "--listen",
        "--data-dir",
        "--queue",
        "--import-secrets",
        "--max-body",
        "--max-batch",
        "--trusted-proxy",
        "--fsync",
    ):
        assert option in out
